"""The guard's inode table: which host file each FUSE inode number stands for.

The agentfs table (fusefs/inodes.py) binds numbers to overlay nodes; the guard has no
overlay, only host files, so it keeps its own small table in the style of libfuse's
passthrough_hp: each inode the kernel holds is an O_PATH fd to the host file, keyed by the
file's (st_dev, st_ino). Both number inodes alike (`fusefs.inodes.InodeNumbers`).

Invariants (a violation is a bug and asserts):
- inode 1 is the guarded directory, opened before the mount; it is never forgotten;
- a lookup count changes only in `entry()` (once per entry reply the kernel accepted: lookup,
  create, mkdir, mknod, symlink, link, each readdirplus entry) and in `forget()`; it never goes
  below zero; at zero the fd is closed and the number unbound;
- while bound, an inode's fd keeps the host file alive, so its (st_dev, st_ino) cannot be
  reused by another file: the key identifies it.

Numbers are stable: `slot(st_dev) << 48 | st_ino` (slots numbered in the order devices are
met, the guarded directory's 0), so a file keeps its number across forget/lookup cycles and
a file on DIR's own filesystem shows its own st_ino: git's index, which records st_ino, stays
valid across `guard start` and `stop` (else every first `git status` re-reads every file). A
number taken by another file (inode 1 is the root's), or an st_ino that does not fit, gets
one from a separate counter range.

Each inode also remembers the directory and name it was last seen under (`parent`, `name`):
exact for directories (they have one name, kept current by the guard's own renames), the
latest name for files — used to tell the catalog which path a truncated file had.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from isolated_agent.fusefs.inodes import InodeNumbers

if TYPE_CHECKING:
    from isolated_agent.guard.behind import Watcher

ROOT = 1
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
DATA_FDS = 256


@dataclass
class Inode:
    number: int
    fd: int  # O_PATH | O_NOFOLLOW: the host file itself
    key: tuple[int, int]  # (st_dev, st_ino)
    is_dir: bool
    parent: int  # inode number of the directory it was last seen in (ROOT for the root)
    name: bytes
    lookups: int = 0

    @property
    def proc_path(self) -> str:
        """A path that reaches the host file directly (never through the guard's mount)."""
        return f"/proc/self/fd/{self.fd}"


class InodeTable:
    def __init__(self, root_fd: int, root_path: bytes, watcher: Watcher | None = None) -> None:
        """`watcher`: told of every directory while it is bound (behind.py)."""
        st = os.fstat(root_fd)
        self.root_path = root_path
        self.watcher = watcher
        self.numbering = InodeNumbers(first_slot=0)  # DIR's own files keep their st_ino
        self.numbering.slot(st.st_dev)
        self._by_number: dict[int, Inode] = {}
        self._by_key: dict[tuple[int, int], Inode] = {}
        self._data: OrderedDict[tuple[int, bool], int] = OrderedDict()  # (number, write) -> fd
        root = Inode(ROOT, root_fd, (st.st_dev, st.st_ino), True, ROOT, b"")
        self._bind(root)

    def __len__(self) -> int:
        return len(self._by_number)

    def __contains__(self, number: int) -> bool:
        return number in self._by_number

    def get(self, number: int) -> Inode:
        inode = self._by_number.get(number)
        if inode is None:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return inode

    def get_or_none(self, number: int) -> Inode | None:
        return self._by_number.get(number)

    def lookup(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """The inode of `name` in `parent` (bound with count 0 if new) and its stat. The
        caller must follow with `entry()` once the kernel has the reply, or `unused()`."""
        fd = os.open(name, _PATH_FLAGS, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino)
        known = self._by_key.get(key)
        if known is not None:
            os.close(fd)
            known.parent, known.name = parent.number, name
            return known, st
        inode = Inode(self._number(key), fd, key, _is_dir(st.st_mode), parent.number, name)
        self._bind(inode)
        return inode, st

    def entry(self, inode: Inode) -> None:
        if inode.number != ROOT:
            inode.lookups += 1

    def unused(self, inode: Inode) -> None:
        """`lookup()` bound an inode the kernel did not take after all."""
        if inode.number != ROOT and inode.lookups == 0:
            self._unbind(inode)

    def forget(self, number: int, count: int) -> None:
        if number == ROOT:
            return
        inode = self._by_number.get(number)
        assert inode is not None, f"forget of unknown inode {number}"
        assert inode.lookups >= count, f"forget({number}, {count}) with {inode.lookups}"
        inode.lookups -= count
        if inode.lookups == 0:
            self._unbind(inode)

    def known(self, parent: Inode, name: bytes) -> Inode | None:
        """The bound inode of `name` in `parent`, if the kernel holds one."""
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except OSError:
            return None
        return self._by_key.get((st.st_dev, st.st_ino))

    def numbers(self) -> list[int]:
        return list(self._by_number)

    def moved(self, key: tuple[int, int], parent: Inode, name: bytes) -> None:
        """A rename through the mount moved the file `key` to `name` in `parent`."""
        inode = self._by_key.get(key)
        if inode is not None:
            inode.parent, inode.name = parent.number, name

    def path(self, inode: Inode) -> bytes:
        """The host path of `inode` as last seen (exact for directories)."""
        parts: list[bytes] = []
        seen = 0
        while inode.number != ROOT:
            parts.append(inode.name)
            parent = self._by_number.get(inode.parent)
            seen += 1
            if parent is None or seen > 4096:  # the chain is gone: say so rather than guess
                return self.root_path + b"/.../" + b"/".join(reversed(parts))
            inode = parent
        return b"/".join([self.root_path, *reversed(parts)])

    def child_path(self, parent: Inode, name: bytes) -> bytes:
        return self.path(parent) + b"/" + name

    def data_fd(self, inode: Inode, write: bool) -> int:
        """A descriptor to read (or write) `inode`'s data with, shared by every open of it
        (handle-free mounts, fs.py). At most DATA_FDS stay open, the least recently used
        closed first: the O_PATH fds already take one per inode the kernel holds, and a tree
        read whole would otherwise need two."""
        key = (inode.number, write)
        fd = self._data.get(key)
        if fd is not None:
            self._data.move_to_end(key)
            return fd
        fd = os.open(inode.proc_path, (os.O_WRONLY if write else os.O_RDONLY) | os.O_CLOEXEC)
        self._data[key] = fd
        if len(self._data) > DATA_FDS:
            os.close(self._data.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        for fd in self._data.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._data.clear()
        for inode in list(self._by_number.values()):
            if inode.number != ROOT:
                with contextlib.suppress(OSError):
                    os.close(inode.fd)
        self._by_number.clear()
        self._by_key.clear()

    # -- binding --------------------------------------------------------------------------

    def _bind(self, inode: Inode) -> None:
        self._by_number[inode.number] = inode
        self._by_key[inode.key] = inode
        if inode.is_dir and self.watcher is not None:
            self.watcher.watch(inode.number, inode.proc_path)

    def _unbind(self, inode: Inode) -> None:
        del self._by_number[inode.number]
        if self._by_key.get(inode.key) is inode:
            del self._by_key[inode.key]
        if inode.is_dir and self.watcher is not None:
            self.watcher.unwatch(inode.number)
        for write in (False, True):
            fd = self._data.pop((inode.number, write), None)
            if fd is not None:
                os.close(fd)
        os.close(inode.fd)

    def _number(self, key: tuple[int, int]) -> int:
        number = self.numbering.stable(*key)
        if number is None or number in self._by_number:
            number = self.numbering.spare()
        return number


def _is_dir(mode: int) -> bool:
    return (mode & 0o170000) == 0o040000
