"""Writes that survive a crash, and the small checks that go with them.

The journal of a commit and the blob store both rely on the same two rules: data is written
whole (a short write is continued, never dropped), and a new name is durable only once its
directory has been fsynced too.
"""

from __future__ import annotations

import os

from isolated_agent.system import libc


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd` (os.write may write less than it was given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: str) -> None:
    """Make the names in directory `path` (a file just created or renamed there) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: str) -> None:
    """Make everything written to the filesystem holding directory `path` durable (syncfs):
    cheaper than an fsync per file when many were written at once."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc.syncfs(fd)
    finally:
        os.close(fd)


def process_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is not): the owner of a lock file or a
    staging dir may still use it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
