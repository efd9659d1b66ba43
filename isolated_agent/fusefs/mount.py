"""Mount-table helpers for agentfs mounts: is it mounted, unmount it (even when its daemon
died), raise its read-ahead.

A daemon that dies without unmounting leaves its mount point answering ENOTCONN ("transport
endpoint is not connected") — never the lower files: the kernel does not fall through. `unmount`
recovers from that state: a dead FUSE connection is detached lazily, since nothing it could
still write can reach the layers.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time

import trio  # type: ignore[import-untyped]

from isolated_agent.system import libc
from isolated_agent.system.mountinfo import MountEntry, read_mountinfo

# How far the kernel reads ahead in a FUSE mount that `raise_readahead` tuned: READs of up to
# 1 MiB instead of 128 KiB, a sequential first read of a large file in 8× fewer round trips.
READAHEAD_KIB = 1024


class NotMounted(Exception):
    pass


def raise_readahead(path: str) -> bool:
    """Raise the read-ahead of the FUSE mount at `path` to READAHEAD_KIB. FUSE_INIT can only
    lower it below the 128 KiB default; its backing device's sysfs knob, writable by root
    alone, can raise it, for this mount only and for as long as it exists. Read from the mount
    table, never from the mount itself: a stat would wait for the daemon. Returns whether it
    was raised; failing is harmless (reads just take more requests)."""
    entry = mount_entry(path)
    if not is_fuse_mount(entry):
        return False
    assert entry is not None
    knob = f"/sys/class/bdi/{entry.device}/read_ahead_kb"
    try:
        with open(knob) as f:
            if int(f.read()) >= READAHEAD_KIB:
                return False
        with open(knob, "w") as f:
            f.write(str(READAHEAD_KIB))
    except (OSError, ValueError):
        return False
    return True


async def raise_readahead_when_initialized(initialized: trio.Event, path: str) -> None:
    """`raise_readahead` once FUSE_INIT is answered (`initialized` is set by the file system's
    `init`, and the request loop sends the reply before any other task runs): the kernel sets
    the read-ahead from that reply, over anything set before."""
    await initialized.wait()
    raise_readahead(path)


class UnmountFailed(Exception):
    pass


def mount_entry(path: str) -> MountEntry | None:
    """The topmost mount at exactly `path`, if any."""
    target = os.path.abspath(path)
    found = None
    for entry in read_mountinfo():
        if entry.mount_point == target:
            found = entry
    return found


def is_fuse_mount(entry: MountEntry | None) -> bool:
    return entry is not None and entry.fstype.split(".")[0] == "fuse"


def is_dead(path: str) -> bool:
    """A FUSE mount whose daemon is gone answers ENOTCONN. Asked with statfs, which always
    reaches the daemon: a stat may be answered from the attributes the kernel cached."""
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def unmount(path: str, lazy: bool = False) -> None:
    """Unmount the agentfs (or any FUSE) mount at `path`. Raises NotMounted, UnmountFailed."""
    target = os.path.abspath(path)
    entry = mount_entry(target)
    if entry is None:
        raise NotMounted(f"{target} is not a mount point")
    if not is_fuse_mount(entry):
        raise UnmountFailed(f"{target} is a {entry.fstype} mount, not agentfs; not touching it")
    lazy = lazy or is_dead(target)
    if os.geteuid() == 0:
        try:
            libc.umount(target, libc.MNT_DETACH if lazy else 0)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise UnmountFailed(
                    f"{target} is busy: a process works in it or holds a file open there"
                ) from e
            raise UnmountFailed(f"cannot unmount {target}: {os.strerror(e.errno or 0)}") from e
        return
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount is None:
        raise UnmountFailed("fusermount3 is not installed (package fuse3)")
    result = subprocess.run(
        [fusermount, "-u", *(["-z"] if lazy else []), target], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise UnmountFailed(result.stderr.strip() or f"fusermount3 -u {target} failed")


def wait_unmounted(path: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while mount_entry(path) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wait_exited(pid: int, timeout: float = 10.0) -> bool:
    """Wait for a process that is not our child to exit (poll /proc)."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and not _is_zombie(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
