"""What a file system of ours is, seen from the FUSE layer: a model behind a small protocol.

agentfs's overlay (`engines/fuse/overlayfs.py`), the filter's per-process views and the guard's
guarded pass-through are each a `FileSystem`: plain methods that take inode numbers, names and
a `Caller`, return plain values (`Attributes`, `Opened`, bytes) and fail with `OSError`. None of
them imports pyfuse3; `adapter.py`, the only `pyfuse3.Operations`, turns FUSE requests into
these calls and their results into replies. What a model must tell the kernel on its own
initiative (a name that changed meaning, data to keep) goes through a `Kernel`.

So a model can be driven without a mount — a unit test calls `lookup`, `unlink`, `rename` and
looks at what it answers and what it told the `Kernel` — and the adapter's tests (every mount
test) prove the translation once for all three.

The contract the adapter relies on:

- `lookup`, `getattr`, `setattr`, `mknod`, `mkdir`, `symlink`, `link` and `create` answer
  `Attributes`; every answer with a non-zero inode that is an *entry* (lookup, the four makers,
  link, create) counts one lookup of that inode, which the kernel gives back with `forget`;
- a listing is read as positions in the list `listing(fh)` returned at offset 0 (`.` and `..`
  first); `listed(fh, name)` gives the entry for one name of it, not counted yet: the adapter
  calls its `settle(taken)` with whether the kernel took it (only then is it counted);
- handle-free mounts (`Policy.handle_free`): `open` and `opendir` fail with ENOSYS, and from
  then on every request that would name a handle names the inode instead (`fh` is the inode).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar


@dataclass(frozen=True)
class Policy:
    """How a mount is served, fixed when it mounts."""

    handle_free: bool = False  # the kernel opens files and lists directories itself
    writeback: bool = False  # the kernel's writeback cache (never on: see cache.py)
    atomic_o_trunc: bool = True  # False: a truncating open arrives as SETATTR
    dot_lookup: bool = True  # the kernel may look up "." and ".." (NFS export)


@dataclass(slots=True)
class Caller:
    """Who sent a request (the thread id FUSE reports, its fs ids, its umask)."""

    uid: int
    gid: int
    pid: int
    umask: int = 0


@dataclass(slots=True, eq=False)
class Attributes:
    """One inode as the kernel is told about it: an entry reply (with how long the kernel may
    keep the name) or an attribute reply. `inode == 0` is a negative entry: the name does not
    exist, remembered for `entry_timeout`."""

    inode: int
    st: os.stat_result | None
    entry_timeout: float = 0.0
    attr_timeout: float = 0.0
    nlink: int | None = None  # None: st's
    owner: tuple[int, int] | None = None  # None: st's uid and gid
    reply: object = field(default=None, repr=False)  # the adapter's reply, built once

    @classmethod
    def negative(cls, timeout: float) -> Attributes:
        return cls(0, None, entry_timeout=timeout)


@dataclass(frozen=True, slots=True)
class Changes:
    """A SETATTR: each field that is not None changes."""

    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class Opened:
    """An OPEN, OPENDIR or CREATE answered: the handle and what the kernel may keep."""

    fh: int
    keep_cache: bool = True  # keep the page cache (a listing, for a directory) from before
    direct_io: bool = False
    cache_readdir: bool = False  # a directory: the kernel may keep this listing


@dataclass(slots=True)
class Listed:
    """One name of a listing: its attributes, and what to do once the kernel took the entry
    or not (None: nothing to count, as for `.` and `..`)."""

    attributes: Attributes
    settle: Callable[[bool], None] | None = None


N = TypeVar("N", contravariant=True)


class LookupCounts(Protocol[N]):
    """An inode table's count of the lookups the kernel holds. A node it just numbered is
    bound with no lookup yet: `entry` counts one once an answer naming it reached the kernel,
    `unused` drops a binding no answer reached."""

    def entry(self, node: N, /) -> object: ...
    def unused(self, node: N, /) -> object: ...


def _or_unused(counts: LookupCounts[N], node: N,
               attributes: Callable[[], Attributes]) -> Attributes:
    try:
        return attributes()
    except BaseException:
        counts.unused(node)
        raise


def counted_entry(counts: LookupCounts[N], node: N,
                  attributes: Callable[[], Attributes]) -> Attributes:
    """The entry answer for `node`, just numbered: counted as a lookup once the answer is
    certain; if its attributes cannot be had, the binding is dropped."""
    answer = _or_unused(counts, node, attributes)
    counts.entry(node)
    return answer


def listed_entry(counts: LookupCounts[N], node: N,
                 attributes: Callable[[], Attributes]) -> Listed:
    """One listed name's entry for `node`, just numbered: counted only if the kernel takes it
    (`Listed.settle`), else the binding is dropped."""
    answer = _or_unused(counts, node, attributes)

    def settle(taken: bool) -> None:
        (counts.entry if taken else counts.unused)(node)

    return Listed(answer, settle)


class Kernel(Protocol):
    """What a model may tell the kernel by itself (FUSE notifications)."""

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        """Forget the cached name `name` in directory `parent` (asynchronously)."""

    def invalidate_inode(self, inode: int, attributes_only: bool = True) -> None:
        """Forget the cached attributes (and, unless `attributes_only`, data) of `inode`."""

    def store(self, inode: int, offset: int, data: memoryview) -> None:
        """Put `data` into the page cache of `inode` at `offset` (raises OSError if refused)."""


class FileSystem(Protocol):
    """The requests a model answers (see the module docstring for the contract)."""

    policy: Policy

    def lookup(self, parent: int, name: bytes, caller: Caller) -> Attributes: ...
    def forget(self, inode: int, count: int) -> bool:
        """Give back `count` lookups; True when the inode is no longer known."""
        ...
    def getattr(self, inode: int, caller: Caller) -> Attributes: ...
    def setattr(self, inode: int, changes: Changes, fh: int | None,
                caller: Caller) -> Attributes: ...
    def readlink(self, inode: int, caller: Caller) -> bytes: ...
    def statfs(self, caller: Caller) -> os.statvfs_result: ...
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
              caller: Caller) -> Attributes: ...
    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attributes: ...
    def symlink(self, parent: int, name: bytes, target: bytes,
                caller: Caller) -> Attributes: ...
    def link(self, inode: int, new_parent: int, new_name: bytes,
             caller: Caller) -> Attributes: ...
    def unlink(self, parent: int, name: bytes, caller: Caller) -> None: ...
    def rmdir(self, parent: int, name: bytes, caller: Caller) -> None: ...
    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int, caller: Caller) -> None: ...
    def open(self, inode: int, flags: int, caller: Caller) -> Opened: ...
    def create(self, parent: int, name: bytes, mode: int, flags: int,
               caller: Caller) -> tuple[Opened, Attributes]: ...
    def read(self, fh: int, offset: int, size: int) -> bytes | memoryview: ...
    def write(self, fh: int, offset: int, data: bytes) -> int: ...
    def fsync(self, fh: int, datasync: bool) -> None: ...
    def release(self, fh: int) -> None: ...
    def opendir(self, inode: int, caller: Caller) -> Opened: ...
    def listing(self, fh: int) -> Sequence[bytes]: ...
    def listed(self, fh: int, name: bytes) -> Listed | None: ...
    def releasedir(self, fh: int) -> None: ...
    def fsyncdir(self, fh: int, datasync: bool) -> None: ...
    def getxattr(self, inode: int, name: bytes, caller: Caller) -> bytes: ...
    def listxattr(self, inode: int, caller: Caller) -> Sequence[bytes]: ...
    def setxattr(self, inode: int, name: bytes, value: bytes, caller: Caller) -> None: ...
    def removexattr(self, inode: int, name: bytes, caller: Caller) -> None: ...
    def close(self) -> None:
        """After the session ended: close what the kernel never released."""
        ...
