"""The on-disk format of an env's upper layer: Linux overlayfs, `userxattr` flavour (DESIGN §3).

- whiteout: a character device 0/0 named like the hidden entry;
- opaque directory: xattr `user.overlay.opaque = "y"` on an upper directory;
- the work dir sits beside upper, on the same filesystem.

Every engine, diff and commit read and write exactly this, so layers are interchangeable.
"""

from __future__ import annotations

import os
import stat

from isolated_agent.system import fdpath

OPAQUE_XATTR = "user.overlay.opaque"
OPAQUE_VALUE = b"y"


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque_dir(path: str | bytes) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == OPAQUE_VALUE
    except OSError:
        return False


def make_whiteout(path: str | bytes) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def make_opaque(path: str | bytes) -> None:
    os.setxattr(path, OPAQUE_XATTR, OPAQUE_VALUE, follow_symlinks=False)


# -- fd-relative forms, for code that reaches its layers through directory fds ---------------

# Every xattr under this prefix belongs to the overlay itself: hidden from the merged view and
# never copied up (the kernel does the same in `userxattr` mode).
PRIVATE_XATTR_PREFIX = "user.overlay."


def fd_path(fd: int) -> str:
    """A path that names exactly the object behind `fd` (an O_PATH fd included): the kernel's
    magic link, resolved without looking at any name, so it can never re-enter a mount made
    over the layer."""
    return f"/proc/self/fd/{fd}"


def is_whiteout_stat(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque_fd(dir_fd: int) -> bool:
    """Whether the directory behind `dir_fd` (O_PATH is fine) carries the opaque marker."""
    try:
        return os.getxattr(fd_path(dir_fd), OPAQUE_XATTR) == OPAQUE_VALUE
    except OSError:
        return False


def make_whiteout_at(dir_fd: int, name: bytes) -> None:
    os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)


def make_opaque_fd(dir_fd: int) -> None:
    os.setxattr(fd_path(dir_fd), OPAQUE_XATTR, OPAQUE_VALUE)


# On a directory made anew by a squash (env/squash.py): when the env first took over what the
# directory stands for, in nanoseconds since the epoch — the birth time of the oldest layer
# entry it replaces, which the new directory's own birth time no longer tells.
TAKEN_XATTR = PRIVATE_XATTR_PREFIX + "agentctl.taken"


def taken_time_ns(path: bytes) -> int | None:
    """When the env took the entry at `path` (a layer's) over: its `TAKEN_XATTR`, or else its
    birth time; None when the filesystem keeps neither."""
    try:
        return int(fdpath.getxattr(path, TAKEN_XATTR))
    except (OSError, ValueError):
        pass
    try:
        return fdpath.birth_time_ns(path)
    except OSError:
        return None


def is_private_xattr(name: str | bytes) -> bool:
    text = os.fsdecode(name)
    return text.startswith(PRIVATE_XATTR_PREFIX)
