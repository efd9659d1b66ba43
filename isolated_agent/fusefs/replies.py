"""What every pyfuse3 file system of ours shares: the one place an exception becomes an errno,
the conversion of stat results into replies, and whether pyfuse3 allows handle-free mounts.

Used by the one adapter (`adapter.py`) that serves agentfs, the filter and the guard.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pyfuse3
from pyfuse3 import EntryAttributes, FUSEError

from isolated_agent.fusefs import accounting
from isolated_agent.fusefs.daemon_log import FAILED_MARK

T = TypeVar("T")

_STAT_FIELDS = ("st_mode", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize", "st_blocks",
                "st_atime_ns", "st_mtime_ns", "st_ctime_ns")


def handle_free_supported() -> bool:
    """Whether this pyfuse3 passes the inode for requests without a handle (and lets
    atomic O_TRUNC be declined): the build in `packaging/pyfuse3/`. Then a file system can
    answer the first OPEN and OPENDIR with ENOSYS, and the kernel opens files and directories
    itself from then on (and keeps their data and listings cached)."""
    extensions: frozenset[str] = getattr(pyfuse3, "EXTENSIONS", frozenset())
    return {"inode_without_handle", "atomic_o_trunc_optional"} <= extensions


def listing_cache_supported() -> bool:
    """Whether this pyfuse3 lets OPENDIR ask the kernel to keep the listing it reads
    (FOPEN_CACHE_DIR): the build in `packaging/pyfuse3/`."""
    extensions: frozenset[str] = getattr(pyfuse3, "EXTENSIONS", frozenset())
    return {"cache_readdir", "opendir_file_info"} <= extensions


def errno_handler(
    log: logging.Logger,
) -> Callable[[Callable[..., T]], Callable[..., Coroutine[Any, Any, T]]]:
    """Decorate a synchronous request handler as the async one pyfuse3 calls.

    An `OSError` is answered with its errno; anything else is a bug — logged with its
    traceback and answered with EIO — and the daemon goes on serving.
    """

    def decorate(fn: Callable[..., T]) -> Callable[..., Coroutine[Any, Any, T]]:
        operation = fn.__name__

        @functools.wraps(fn)
        async def wrapper(self: Any, *args: Any) -> T:
            try:
                return fn(self, *args)
            except FUSEError:
                raise
            except OSError as e:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s%r: %s", operation, _brief(args), e, exc_info=True)
                raise FUSEError(e.errno or errno.EIO) from None
            except Exception:
                log.exception("%s%r " + FAILED_MARK, operation, _brief(args))
                raise FUSEError(errno.EIO) from None

        return accounting.counted(operation, wrapper)

    return decorate


def _brief(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a for a in args if isinstance(a, (int, bytes)))


def entry_attributes(
    st: os.stat_result,
    inode: int,
    entry_timeout: float,
    attr_timeout: float,
    nlink: int | None = None,
) -> EntryAttributes:
    """An entry/attribute reply for `st` under inode number `inode` (also its st_ino)."""
    attrs = EntryAttributes()
    attrs.st_ino = inode
    attrs.entry_timeout = entry_timeout
    attrs.attr_timeout = attr_timeout
    attrs.st_nlink = st.st_nlink if nlink is None else nlink
    for field in _STAT_FIELDS:
        setattr(attrs, field, getattr(st, field))
    return attrs


def statfs_reply(st: os.statvfs_result) -> pyfuse3.StatvfsData:
    data = pyfuse3.StatvfsData()
    for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                 "f_favail", "f_namemax"):
        setattr(data, name, getattr(st, name))
    return data
