"""agentfs as a `FileSystem` model (fusefs/model.py): inode numbers in, overlay calls, plain
answers out. No overlay rule here (those are `isolated_agent.overlay`), and no FUSE: the one
adapter (`fusefs/adapter.py`) serves it.

Attributes are kept per inode between requests that change something: read-only traffic (a
tree walked, grepped, read) is answered without a system call for attributes, and any request
that may change some attribute (a write, a create, a rename, ...) drops them all, so nothing
stale is ever served.

Handle-free mode (`handle_free`): where the cache mode lets the kernel keep file data and
listings and pyfuse3 passes the inode when a request has no handle (the build in
`packaging/pyfuse3/`), agentfs answers the first OPEN and OPENDIR with ENOSYS. The kernel then
never sends OPEN, OPENDIR, RELEASE or RELEASEDIR again and caches every listing: a second pass
over a tree costs no round trip at all. Reads and writes name their inode; they go through the
node's shared fd (`Overlay.reader` / `Overlay.writer`), and a copy-up happens at the first
write or truncate instead of at an open for writing. Atomic O_TRUNC is declined, so a
truncating open reaches agentfs as a SETATTR.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from isolated_agent.engines.id_swap import IdSwap
from isolated_agent.fusefs.cache import CacheMode
from isolated_agent.fusefs.handles import Handles
from isolated_agent.fusefs.inodes import ROOT_INODE, OverlayInodeTable
from isolated_agent.fusefs.model import (
    Attributes,
    Caller,
    Changes,
    Kernel,
    Listed,
    Opened,
    Policy,
    counted_entry,
    listed_entry,
)
from isolated_agent.overlay.merge import Overlay
from isolated_agent.overlay.node import Node
from isolated_agent.overlay.rename import rename

log = logging.getLogger("agentfs")

# Files up to this size are pushed into the page cache at OPEN (see OverlayFileSystem._push).
PUSH_MAX = 256 * 1024


def _enosys() -> OSError:
    return OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))


@dataclass
class _File:
    node: Node
    fd: int | None  # its own fd when opened for writing; None: reads use the node's reader
    # With an fd of its own: how it was opened (to open it again after a live checkpoint
    # closed the fd, which pointed into the frozen layer).
    flags: int | None = None


class OverlayFileSystem:
    def __init__(self, overlay: Overlay, cache: CacheMode, kernel: Kernel,
                 handle_free: bool = False, id_swap: IdSwap | None = None) -> None:
        """`handle_free`: only where the cache mode keeps data and pyfuse3 allows it
        (`replies.handle_free_supported`). `id_swap`: owners as a root job over another
        user's tree sees them (id_swap.py)."""
        self.overlay = overlay
        self.cache = cache
        self.kernel = kernel
        self.id_swap = id_swap
        self.handle_free = handle_free
        self.policy = Policy(handle_free=handle_free, writeback=cache.writeback,
                             atomic_o_trunc=not handle_free, dot_lookup=True)
        self.inodes = OverlayInodeTable(overlay)
        self._files: Handles[_File] = Handles()
        self._dirs: Handles[Node] = Handles()
        self._attribute_cache: dict[int, tuple[Node, Attributes]] = {}
        self._pushed: weakref.WeakSet[Node] = weakref.WeakSet()  # content in the page cache
        self._writers: dict[Node, int] = {}  # open writable handles per node
        self._buffer = bytearray(1 << 20)
        overlay.on_stale_entry = self._stale_entry

    # -- helpers --------------------------------------------------------------------------------

    def _attributes(self, node: Node, inode: int) -> Attributes:
        cached = self._attribute_cache.get(inode)
        if cached is not None and cached[0] is node:
            return cached[1]
        st, nlink = self.overlay.getattr(node)
        owner = None if self.id_swap is None else self._owners(st.st_uid, st.st_gid)
        attributes = Attributes(inode, st, self.cache.entry_timeout, self.cache.attr_timeout,
                                nlink, owner)
        self._attribute_cache[inode] = (node, attributes)
        return attributes

    def _changed(self) -> None:
        """A request may have changed attributes or data: forget every kept one."""
        self._attribute_cache.clear()
        self._pushed.clear()
        self.overlay.changed()

    def _entry(self, node: Node) -> Attributes:
        """An entry for `node`: the lookup count goes up once the answer is certain."""
        inode = self.inodes.number(node)
        return counted_entry(self.inodes, node, lambda: self._attributes(node, inode))

    def _stale_entry(self, parent: Node, name: bytes) -> None:
        if parent.number:
            self.kernel.invalidate_entry(parent.number, name)

    def _owner(self, caller: Caller) -> tuple[int, int]:
        """Who owns on disk what the caller creates."""
        return self._owners(caller.uid, caller.gid)

    def _owners(self, uid: int, gid: int) -> tuple[int, int]:
        """The owner on disk of one the view shows, and the other way round (a swap is its
        own inverse: id_swap.py); unchanged without a swap."""
        if self.id_swap is None:
            return uid, gid
        return self.id_swap.swap_uid(uid), self.id_swap.swap_gid(gid)

    # -- lookups and attributes -----------------------------------------------------------------

    def lookup(self, parent: int, name: bytes, caller: Caller) -> Attributes:
        directory = self.inodes.get(parent)
        if name == b".":
            node = directory
        elif name == b"..":
            node = self.overlay.parent_of(directory)
        else:
            try:
                node = self.overlay.lookup(directory, name)
            except FileNotFoundError:
                if self.cache.negative_timeout:
                    return Attributes.negative(self.cache.negative_timeout)
                raise
        return self._entry(node)

    def forget(self, inode: int, count: int) -> bool:
        return self.inodes.forget(inode, count)

    def getattr(self, inode: int, caller: Caller) -> Attributes:
        return self._attributes(self.inodes.get(inode), inode)

    def setattr(self, inode: int, changes: Changes, fh: int | None,
                caller: Caller) -> Attributes:
        node = self.inodes.get(inode)
        self._changed()
        uid, gid = changes.uid, changes.gid
        if self.id_swap is not None:  # the owner on disk of the one the caller names
            uid = None if uid is None else self.id_swap.swap_uid(uid)
            gid = None if gid is None else self.id_swap.swap_gid(gid)
        self.overlay.setattr(node, size=changes.size, mode=changes.mode, uid=uid, gid=gid,
                             atime_ns=changes.atime_ns, mtime_ns=changes.mtime_ns)
        return self._attributes(node, inode)

    def readlink(self, inode: int, caller: Caller) -> bytes:
        return self.overlay.readlink(self.inodes.get(inode))

    def statfs(self, caller: Caller) -> os.statvfs_result:
        return self.overlay.statfs()

    # -- creating and removing ------------------------------------------------------------------

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
              caller: Caller) -> Attributes:
        directory = self.inodes.get(parent)
        self._changed()
        return self._entry(self.overlay.mknod(directory, name, mode, rdev, self._owner(caller)))

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attributes:
        directory = self.inodes.get(parent)
        self._changed()
        return self._entry(self.overlay.mkdir(directory, name, mode, self._owner(caller)))

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attributes:
        directory = self.inodes.get(parent)
        self._changed()
        return self._entry(self.overlay.symlink(directory, name, target, self._owner(caller)))

    def link(self, inode: int, new_parent: int, new_name: bytes, caller: Caller) -> Attributes:
        node = self.inodes.get(inode)
        directory = self.inodes.get(new_parent)
        self._changed()
        return self._entry(self.overlay.link(node, directory, new_name))

    def unlink(self, parent: int, name: bytes, caller: Caller) -> None:
        self._changed()
        self.overlay.unlink(self.inodes.get(parent), name)

    def rmdir(self, parent: int, name: bytes, caller: Caller) -> None:
        self._changed()
        self.overlay.rmdir(self.inodes.get(parent), name)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int, caller: Caller) -> None:
        self._changed()
        rename(self.overlay, self.inodes.get(old_parent), old_name,
               self.inodes.get(new_parent), new_name, flags)

    # -- files ----------------------------------------------------------------------------------

    def _open_flags(self, flags: int) -> int:
        if self.cache.writeback and flags & os.O_ACCMODE == os.O_WRONLY:
            # The kernel may read pages of a file opened write-only to fill partial pages.
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    def _opened(self, node: Node, fd: int | None, flags: int | None = None) -> Opened:
        handle = self._files.add(_File(node, fd, flags if fd is not None else None))
        self.overlay.ref(node)
        if fd is not None:
            self._writers[node] = self._writers.get(node, 0) + 1
        return Opened(handle, keep_cache=self.cache.keep_cache)

    def open(self, inode: int, flags: int, caller: Caller) -> Opened:
        if self.handle_free:
            raise _enosys()  # the kernel opens files itself from now on
        node = self.inodes.get(inode)
        if flags & os.O_ACCMODE == os.O_RDONLY and not flags & os.O_TRUNC:
            # Pushed and unchanged since: it opened then, and its content is in the page
            # cache; a READ (after the kernel dropped that) opens the reader itself. Else
            # open it now: failing here, not at the first read.
            if node not in self._pushed:
                self._push(node, inode, self.overlay.reader(node))
            return self._opened(node, None)
        self._changed()
        flags = self._open_flags(flags)
        return self._opened(node, self.overlay.open(node, flags), flags)

    def _push(self, node: Node, inode: int, fd: int) -> None:
        """Hand a small file's content to the kernel's page cache along with the OPEN reply
        (a store notification), so that reading it needs no READ round trip. Only in the
        cache mode that keeps the page cache across opens, once per content (any change
        clears the record), and never while a writable handle is open: a write the kernel has
        put in its page cache but not yet sent must not be overwritten with older data."""
        if not self.cache.keep_cache or node in self._pushed or self._writers.get(node):
            return
        st = self._attributes(node, inode).st
        assert st is not None
        if not 0 < st.st_size <= PUSH_MAX or not stat.S_ISREG(node.file_type):
            return
        view = memoryview(self._buffer)[:st.st_size]
        got = os.preadv(fd, [view], 0)
        try:
            self.kernel.store(inode, 0, view[:got])
        except OSError as e:  # only an optimisation: the kernel will send READs instead
            log.debug("agentfs: notify_store(%d) failed: %s", inode, e)
            return
        self._pushed.add(node)

    def create(self, parent: int, name: bytes, mode: int, flags: int,
               caller: Caller) -> tuple[Opened, Attributes]:
        directory = self.inodes.get(parent)
        self._changed()
        node, fd = self.overlay.create(directory, name, mode, self._open_flags(flags),
                                       self._owner(caller))
        try:
            attributes = self._entry(node)
        except BaseException:
            os.close(fd)
            raise
        if self.handle_free:
            os.close(fd)  # later writes name the inode and use the node's shared fd
            return Opened(0, keep_cache=True), attributes
        return self._opened(node, fd, self._open_flags(flags)), attributes

    def read(self, fh: int, offset: int, size: int) -> memoryview:
        """Into one reused buffer: no allocation per request. A read-only handle reads
        through the node's shared reader, which follows a copy-up made through another
        handle."""
        if self.handle_free:
            fd = self.overlay.reader(self.inodes.get(fh))
        else:
            handle = self._files[fh]
            fd = handle.fd if handle.fd is not None else self.overlay.reader(handle.node)
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        view = memoryview(self._buffer)[:size]
        return view[: os.preadv(fd, [view], offset)]

    def write(self, fh: int, offset: int, data: bytes) -> int:
        self._changed()
        if self.handle_free:
            return os.pwrite(self.overlay.writer(self.inodes.get(fh)), data, offset)
        handle = self._files[fh]
        if handle.fd is None:
            if handle.flags is None:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            # Opened before a live checkpoint froze its file: write to a copy-up.
            handle.fd = self.overlay.open(handle.node, handle.flags & ~os.O_TRUNC)
        return os.pwrite(handle.fd, data, offset)

    def fsync(self, fh: int, datasync: bool) -> None:
        if self.handle_free:
            node = self.inodes.get(fh)
            fd = self.overlay.reader(node) if node.in_upper else None  # lower: never written
        else:
            fd = self._files[fh].fd
        if fd is not None:
            (os.fdatasync if datasync else os.fsync)(fd)

    def release(self, fh: int) -> None:
        if self.handle_free:
            return  # only a created file's (its handle was 0): nothing to close
        handle = self._files.pop(fh)
        try:
            if handle.fd is not None:
                os.close(handle.fd)
            if handle.flags is not None:
                count = self._writers.pop(handle.node, 1) - 1
                if count:
                    self._writers[handle.node] = count
        finally:
            self.overlay.unref(handle.node)

    # -- directories ----------------------------------------------------------------------------

    def opendir(self, inode: int, caller: Caller) -> Opened:
        if self.handle_free:
            raise _enosys()  # the kernel opens and caches listings itself
        node = self.inodes.get(inode)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        self.overlay.ref(node)
        return Opened(self._dirs.add(node))

    def _directory(self, fh: int) -> Node:
        return self.inodes.get(fh) if self.handle_free else self._dirs[fh]

    def listing(self, fh: int) -> Sequence[bytes]:
        return [b".", b"..", *self.overlay.listdir(self._directory(fh))]

    def listed(self, fh: int, name: bytes) -> Listed | None:
        directory = self._directory(fh)
        if name == b".":
            return Listed(self._attributes(directory, directory.number or ROOT_INODE))
        if name == b"..":  # not counted: numbered, and the number let go again
            parent = self.overlay.parent_of(directory)
            inode = self.inodes.number(parent)
            try:
                return Listed(self._attributes(parent, inode))
            finally:
                self.inodes.unused(parent)
        try:
            node = self.overlay.lookup(directory, name)
        except FileNotFoundError:
            return None
        inode = self.inodes.number(node)
        return listed_entry(self.inodes, node, lambda: self._attributes(node, inode))

    def releasedir(self, fh: int) -> None:
        self.overlay.unref(self._dirs.pop(fh))

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.overlay.fsync_dir(self._directory(fh))

    # -- xattrs ---------------------------------------------------------------------------------

    def getxattr(self, inode: int, name: bytes, caller: Caller) -> bytes:
        return self.overlay.getxattr(self.inodes.get(inode), name)

    def listxattr(self, inode: int, caller: Caller) -> Sequence[bytes]:
        return self.overlay.listxattr(self.inodes.get(inode))

    def setxattr(self, inode: int, name: bytes, value: bytes, caller: Caller) -> None:
        self._changed()
        self.overlay.setxattr(self.inodes.get(inode), name, value)

    def removexattr(self, inode: int, name: bytes, caller: Caller) -> None:
        self._changed()
        self.overlay.removexattr(self.inodes.get(inode), name)

    # -- live checkpoints -----------------------------------------------------------------------

    def freeze_upper(self, new_upper: int) -> None:
        """The upper was frozen into a layer (overlay.freeze_upper): close every handle's own
        fd, which points into it; the next write through the handle opens a copy-up."""
        self.overlay.freeze_upper(new_upper)
        for handle in self._files:
            if handle.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(handle.fd)
                handle.fd = None

    # -- end ------------------------------------------------------------------------------------

    def close(self) -> None:
        """After the session ended: close what the kernel never released (the overlay itself
        is its owner's to close)."""
        for handle in self._files:
            if handle.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(handle.fd)
        self._files.clear()
        self._dirs.clear()
