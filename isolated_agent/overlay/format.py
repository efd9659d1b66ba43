"""The on-disk format of an env's upper layer: Linux overlayfs, `userxattr` flavour (DESIGN §3).

- whiteout: a character device 0/0 named like the hidden entry;
- opaque directory: xattr `user.overlay.opaque = "y"` on an upper directory;
- the work dir sits beside upper, on the same filesystem.

Every engine, diff and commit read and write exactly this, so layers are interchangeable.
"""

from __future__ import annotations

import os
import stat

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
