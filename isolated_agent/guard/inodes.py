"""The guard's inode table: which host file each FUSE inode number stands for.

The numbers and lookup counts are fusefs's one inode table (`fusefs.inodes.InodeTable`, with
its invariants); what this module adds is what the guard binds to a number: the host file
itself, in the style of libfuse's passthrough_hp — each inode the kernel holds is an O_PATH fd
to the host file, keyed by the file's (st_dev, st_ino). While bound, the fd keeps the host
file alive, so its (st_dev, st_ino) cannot be reused by another file: the key identifies it.
Inode 1 is the guarded directory, opened before the mount.

Numbers are stable (`InodeNumbers` with the guarded directory's device as slot 0), so a file
keeps its number across forget/lookup cycles and a file on DIR's own filesystem shows its own
st_ino: git's index, which records st_ino, stays valid across `guard start` and `stop` (else
every first `git status` re-reads every file).

Each inode also remembers the directory and name it was last seen under (`parent`, `name`):
exact for directories (they have one name, kept current by the guard's own renames), the
latest name for files — used to tell the catalog which path a truncated file had.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from isolated_agent.fusefs.inodes import ROOT_INODE, InodeNumbers, InodeTable

if TYPE_CHECKING:
    from isolated_agent.guard.behind import Watcher

ROOT = ROOT_INODE
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
DATA_FDS = 256


@dataclass
class Inode:
    fd: int  # O_PATH | O_NOFOLLOW: the host file itself
    key: tuple[int, int]  # (st_dev, st_ino)
    is_dir: bool
    parent: int  # inode number of the directory it was last seen in (ROOT for the root)
    name: bytes
    number: int = 0  # given by the table; 0 while unbound

    @property
    def proc_path(self) -> str:
        """A path that reaches the host file directly (never through the guard's mount)."""
        return f"/proc/self/fd/{self.fd}"


class HostInodeTable(InodeTable[Inode]):
    def __init__(self, root_fd: int, root_path: bytes, watcher: Watcher | None = None) -> None:
        """`watcher`: told of every directory while it is bound (behind.py)."""
        st = os.fstat(root_fd)
        numbering = InodeNumbers(first_slot=0)  # DIR's own files keep their st_ino
        numbering.slot(st.st_dev)
        root = Inode(root_fd, (st.st_dev, st.st_ino), True, ROOT, b"")
        super().__init__(root, numbering)
        self.root_path = root_path
        self.watcher = watcher
        self._by_key: dict[tuple[int, int], Inode] = {}
        self._data: OrderedDict[tuple[int, bool], int] = OrderedDict()  # (number, write) -> fd
        self._bound(root)

    def lookup(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        """The inode of `name` in `parent` (bound with no lookup yet if new) and its stat.
        The caller must follow with `entry()` once the kernel has the reply, or `unused()`."""
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
        inode = Inode(fd, key, _is_dir(st.st_mode), parent.number, name)
        self.bind(inode, self.numbering.stable(*key))
        return inode, st

    def known(self, parent: Inode, name: bytes) -> Inode | None:
        """The bound inode of `name` in `parent`, if the kernel holds one."""
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except OSError:
            return None
        return self._by_key.get((st.st_dev, st.st_ino))

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
            parent = self.get_or_none(inode.parent)
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
        for inode in list(self._objects.values()):
            if inode.number != ROOT:
                with contextlib.suppress(OSError):
                    os.close(inode.fd)
        self._objects.clear()
        self._by_key.clear()

    # -- what binding means for a host file ---------------------------------------------

    def _bound(self, inode: Inode) -> None:
        self._by_key[inode.key] = inode
        if inode.is_dir and self.watcher is not None:
            self.watcher.watch(inode.number, inode.proc_path)

    def _unbound(self, inode: Inode) -> None:
        if self._by_key.get(inode.key) is inode:
            del self._by_key[inode.key]
        number = inode.number
        if inode.is_dir and self.watcher is not None:
            self.watcher.unwatch(number)
        for write in (False, True):
            fd = self._data.pop((number, write), None)
            if fd is not None:
                os.close(fd)
        os.close(inode.fd)


def _is_dir(mode: int) -> bool:
    return (mode & 0o170000) == 0o040000
