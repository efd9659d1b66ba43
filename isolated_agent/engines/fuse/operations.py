"""The pyfuse3 adapter: FUSE requests in, overlay calls, FUSE replies out. No overlay rule here.

Errors become errnos in one place, `_handler`: an `OSError` from the overlay is answered with
its errno; anything else is a bug — logged with its traceback and answered with EIO — and the
daemon goes on serving. `forget` may not fail at all, so it only logs.

Handlers never await: each request runs to completion before the next one starts, so the
overlay (which is not thread-safe) sees one operation at a time — which is also what lets
`read` reply from one reused buffer.

Attributes are cached per inode between requests that change something: read-only traffic
(a tree walked, grepped, read) is answered without a system call for attributes, and any
request that may change some attribute (a write, a create, a rename, ...) drops the whole
cache, so nothing stale is ever served.

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
from typing import TypeVar

import pyfuse3
import trio  # type: ignore[import-untyped]
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, RequestContext, SetattrFields

from isolated_agent.engines.id_swap import IdSwap
from isolated_agent.fusefs.cache import CacheMode
from isolated_agent.fusefs.inodes import ROOT_INODE, InodeTable
from isolated_agent.fusefs.replies import (
    entry_attributes,
    errno_handler,
    handle_free_supported,
    statfs_reply,
)
from isolated_agent.overlay.merge import Overlay
from isolated_agent.overlay.node import Node
from isolated_agent.overlay.rename import rename

log = logging.getLogger("agentfs")

T = TypeVar("T")

# Files up to this size are pushed into the page cache at OPEN (see Operations._push).
PUSH_MAX = 256 * 1024


_handler = errno_handler(log)


@dataclass
class _File:
    node: Node
    fd: int | None  # its own fd when opened for writing; None: reads use the node's reader


@dataclass
class _Dir:
    node: Node
    names: list[bytes] | None = None


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True

    def __init__(self, overlay: Overlay, cache: CacheMode, handle_free: bool | None = None,
                 id_swap: IdSwap | None = None) -> None:
        """`handle_free`: None chooses it whenever the cache mode and pyfuse3 allow it.
        `id_swap`: owners as a root job over another user's tree sees them (id_swap.py)."""
        super().__init__()
        self.overlay = overlay
        self.cache = cache
        self.id_swap = id_swap
        self.inodes = InodeTable(overlay)
        self.enable_writeback_cache = cache.writeback
        if handle_free is None:
            handle_free = cache.keep_cache and handle_free_supported()
        self.handle_free = handle_free
        self.enable_atomic_o_trunc = not handle_free
        self._listings: dict[int, list[bytes]] = {}  # handle-free: a directory's listing stream
        self.initialized = trio.Event()  # set when FUSE_INIT arrives (its reply follows at once)
        self._files: dict[int, _File] = {}
        self._dirs: dict[int, _Dir] = {}
        self._next_handle = 1
        self._attribute_cache: dict[int, tuple[Node, EntryAttributes]] = {}
        self._pushed: weakref.WeakSet[Node] = weakref.WeakSet()  # content in the page cache
        self._writers: dict[Node, int] = {}  # open writable handles per node
        self._buffer = bytearray(1 << 20)
        overlay.on_stale_entry = self._stale_entry

    # -- helpers --------------------------------------------------------------------------------

    def _attributes(self, node: Node, inode: int) -> EntryAttributes:
        cached = self._attribute_cache.get(inode)
        if cached is not None and cached[0] is node:
            return cached[1]
        st, nlink = self.overlay.getattr(node)
        attrs = entry_attributes(st, inode, self.cache.entry_timeout, self.cache.attr_timeout,
                                 nlink)
        if self.id_swap is not None:
            attrs.st_uid, attrs.st_gid = self._owners(attrs.st_uid, attrs.st_gid)
        self._attribute_cache[inode] = (node, attrs)
        return attrs

    def _changed(self) -> None:
        """A request may have changed attributes or data: forget every cached one."""
        self._attribute_cache.clear()
        self._pushed.clear()
        self.overlay.changed()

    def _entry(self, node: Node) -> EntryAttributes:
        """An entry reply for `node`: the lookup count goes up once the reply is certain."""
        inode = self.inodes.number(node)
        try:
            attrs = self._attributes(node, inode)
        except BaseException:
            self.inodes.unused(node)
            raise
        self.inodes.entry(node)
        return attrs

    def _negative(self) -> EntryAttributes:
        attrs = EntryAttributes()
        attrs.st_ino = 0  # the kernel remembers the name does not exist, for entry_timeout
        attrs.entry_timeout = self.cache.negative_timeout
        return attrs

    def _handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _stale_entry(self, parent: Node, name: bytes) -> None:
        if parent.nodeid:
            pyfuse3.invalidate_entry_async(parent.nodeid, name, ignore_enoent=True)

    def _owner(self, ctx: RequestContext) -> tuple[int, int]:
        """Who owns on disk what the caller creates."""
        return self._owners(ctx.uid, ctx.gid)

    def _owners(self, uid: int, gid: int) -> tuple[int, int]:
        """The owner on disk of one the view shows, and the other way round (a swap is its
        own inverse: id_swap.py); unchanged without a swap."""
        if self.id_swap is None:
            return uid, gid
        return self.id_swap.swap_uid(uid), self.id_swap.swap_gid(gid)

    def init(self) -> None:
        self.initialized.set()

    # -- lookups and attributes -----------------------------------------------------------------

    @_handler
    def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        parent = self.inodes.node(parent_inode)
        if name == b".":
            node = parent
        elif name == b"..":
            node = self.overlay.parent_of(parent)
        else:
            try:
                node = self.overlay.lookup(parent, name)
            except FileNotFoundError:
                if self.cache.negative_timeout:
                    return self._negative()
                raise
        return self._entry(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            try:
                self.inodes.forget(inode, count)
                if not self.inodes.lookup_count(inode):
                    self._listings.pop(inode, None)
            except Exception:  # must not fail: log the bug and go on
                log.exception("agentfs: forget(%d, %d) failed", inode, count)

    @_handler
    def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        return self._attributes(self.inodes.node(inode), inode)

    @_handler
    def setattr(
        self,
        inode: int,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: int | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        node = self.inodes.node(inode)
        self._changed()
        uid, gid = self._owners(attr.st_uid, attr.st_gid)
        self.overlay.setattr(
            node,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=uid if fields.update_uid else None,
            gid=gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self._attributes(node, inode)

    @_handler
    def readlink(self, inode: int, ctx: RequestContext) -> bytes:
        return self.overlay.readlink(self.inodes.node(inode))

    @_handler
    def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        return statfs_reply(self.overlay.statfs())

    @_handler
    def access(self, inode: int, mode: int, ctx: RequestContext) -> bool:
        return True  # mounted with default_permissions: the kernel checks the mode bits

    # -- creating and removing ------------------------------------------------------------------

    @_handler
    def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        parent = self.inodes.node(parent_inode)
        self._changed()
        return self._entry(self.overlay.mknod(parent, name, mode, rdev, self._owner(ctx)))

    @_handler
    def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: RequestContext
    ) -> EntryAttributes:
        parent = self.inodes.node(parent_inode)
        self._changed()
        return self._entry(self.overlay.mkdir(parent, name, mode, self._owner(ctx)))

    @_handler
    def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: RequestContext
    ) -> EntryAttributes:
        parent = self.inodes.node(parent_inode)
        self._changed()
        return self._entry(self.overlay.symlink(parent, name, target, self._owner(ctx)))

    @_handler
    def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: RequestContext
    ) -> EntryAttributes:
        node = self.inodes.node(inode)
        parent = self.inodes.node(new_parent_inode)
        self._changed()
        return self._entry(self.overlay.link(node, parent, new_name))

    @_handler
    def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        self._changed()
        self.overlay.unlink(self.inodes.node(parent_inode), name)

    @_handler
    def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        self._changed()
        self.overlay.rmdir(self.inodes.node(parent_inode), name)

    @_handler
    def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: RequestContext,
    ) -> None:
        self._changed()
        rename(
            self.overlay,
            self.inodes.node(parent_inode_old),
            name_old,
            self.inodes.node(parent_inode_new),
            name_new,
            flags,
        )

    # -- files ----------------------------------------------------------------------------------

    def _open_flags(self, flags: int) -> int:
        if self.cache.writeback and flags & os.O_ACCMODE == os.O_WRONLY:
            # The kernel may read pages of a file opened write-only to fill partial pages.
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    def _file_info(self, node: Node, fd: int | None) -> FileInfo:
        handle = self._handle()
        self._files[handle] = _File(node, fd)
        self.overlay.ref(node)
        if fd is not None:
            self._writers[node] = self._writers.get(node, 0) + 1
        return FileInfo(fh=handle, keep_cache=self.cache.keep_cache)

    @_handler
    def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        if self.handle_free:
            raise FUSEError(errno.ENOSYS)  # the kernel opens files itself from now on
        node = self.inodes.node(inode)
        if flags & os.O_ACCMODE == os.O_RDONLY and not flags & os.O_TRUNC:
            # Pushed and unchanged since: it opened then, and its content is in the page
            # cache; a READ (after the kernel dropped that) opens the reader itself. Else
            # open it now: failing here, not at the first read.
            if node not in self._pushed:
                self._push(node, inode, self.overlay.reader(node))
            return self._file_info(node, None)
        self._changed()
        return self._file_info(node, self.overlay.open(node, self._open_flags(flags)))

    def _push(self, node: Node, inode: int, fd: int) -> None:
        """Hand a small file's content to the kernel's page cache along with the OPEN reply
        (notify_store), so that reading it needs no READ round trip. Only in the cache mode
        that keeps the page cache across opens, once per content (any change clears the
        record), and never while a writable handle is open: a write the kernel has put in its
        page cache but not yet sent must not be overwritten with older data."""
        if not self.cache.keep_cache or node in self._pushed or self._writers.get(node):
            return
        size = self._attributes(node, inode).st_size
        if not 0 < size <= PUSH_MAX or not stat.S_ISREG(node.file_type):
            return
        view = memoryview(self._buffer)[:size]
        got = os.preadv(fd, [view], 0)
        try:
            pyfuse3.notify_store(inode, 0, view[:got])  # type: ignore[arg-type]  # any buffer
        except OSError as e:  # only an optimisation: the kernel will send READs instead
            log.debug("agentfs: notify_store(%d) failed: %s", inode, e)
            return
        self._pushed.add(node)

    @_handler
    def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        parent = self.inodes.node(parent_inode)
        self._changed()
        node, fd = self.overlay.create(parent, name, mode, self._open_flags(flags),
                                       self._owner(ctx))
        try:
            attrs = self._entry(node)
        except BaseException:
            os.close(fd)
            raise
        if self.handle_free:
            os.close(fd)  # later writes name the inode and use the node's shared fd
            return FileInfo(fh=0, keep_cache=True), attrs
        return self._file_info(node, fd), attrs

    @_handler
    def read(self, fh: int, off: int, size: int) -> memoryview:  # type: ignore[override]
        """Into one reused buffer (pyfuse3 copies it into its reply before the next request
        is read): no allocation per request. A read-only handle reads through the node's
        shared reader, which follows a copy-up made through another handle."""
        if self.handle_free:
            fd = self.overlay.reader(self.inodes.node(fh))
        else:
            handle = self._files[fh]
            fd = handle.fd if handle.fd is not None else self.overlay.reader(handle.node)
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        view = memoryview(self._buffer)[:size]
        return view[: os.preadv(fd, [view], off)]

    @_handler
    def write(self, fh: int, off: int, buf: bytes) -> int:
        self._changed()
        if self.handle_free:
            return os.pwrite(self.overlay.writer(self.inodes.node(fh)), buf, off)
        fd = self._files[fh].fd
        if fd is None:
            raise FUSEError(errno.EBADF)
        return os.pwrite(fd, buf, off)

    @_handler
    def flush(self, fh: int) -> None:
        # Nothing to flush: writes go straight to the backing file. ENOSYS tells the kernel
        # never to send FLUSH again, saving a round trip on every close().
        raise FUSEError(errno.ENOSYS)

    @_handler
    def fsync(self, fh: int, datasync: bool) -> None:
        if self.handle_free:
            node = self.inodes.node(fh)
            fd = self.overlay.reader(node) if node.in_upper else None  # lower: never written
        else:
            fd = self._files[fh].fd
        if fd is not None:
            (os.fdatasync if datasync else os.fsync)(fd)

    @_handler
    def release(self, fh: int) -> None:
        if self.handle_free:
            return  # only a created file's (its handle was 0): nothing to close
        handle = self._files.pop(fh)
        try:
            if handle.fd is not None:
                os.close(handle.fd)
                count = self._writers.pop(handle.node, 1) - 1
                if count:
                    self._writers[handle.node] = count
        finally:
            self.overlay.unref(handle.node)

    # -- directories ----------------------------------------------------------------------------

    @_handler
    def opendir(self, inode: int, ctx: RequestContext) -> int:
        if self.handle_free:
            raise FUSEError(errno.ENOSYS)  # the kernel opens and caches listings itself
        node = self.inodes.node(inode)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        handle = self._handle()
        self._dirs[handle] = _Dir(node)
        self.overlay.ref(node)
        return handle

    @_handler
    def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Offsets are positions in a listing taken when the stream starts (offset 0), so
        paging, seekdir and telldir see each name exactly once; `.` and `..` come first.
        Handle-free there is no handle to keep the listing in, so it is kept per directory
        (`fh` is the inode) until the stream ends: the kernel reads it once, from offset 0,
        into its cache, and later readers and seeks are served from there."""
        if self.handle_free:
            directory = self.inodes.node(fh)
            names = self._listings.get(fh) if start_id else None
            if names is None:
                names = self._listings[fh] = [b".", b"..",
                                              *self.overlay.listdir(directory)]
            if start_id >= len(names):
                del self._listings[fh]  # the stream ended: the kernel has the whole listing
        else:
            handle = self._dirs[fh]
            directory = handle.node
            if handle.names is None or start_id == 0:
                handle.names = [b".", b"..", *self.overlay.listdir(directory)]
            names = handle.names
        for position in range(start_id, len(names)):
            name = names[position]
            if name == b".":
                reply = pyfuse3.readdir_reply(
                    token, name, self._attributes(directory, directory.nodeid or ROOT_INODE),
                    position + 1)
            elif name == b"..":
                parent = self.overlay.parent_of(directory)
                inode = self.inodes.number(parent)
                try:
                    reply = pyfuse3.readdir_reply(
                        token, name, self._attributes(parent, inode), position + 1)
                finally:
                    self.inodes.unused(parent)
            else:
                try:
                    node = self.overlay.lookup(directory, name)
                except FileNotFoundError:
                    continue  # removed since the listing was taken
                inode = self.inodes.number(node)
                try:
                    attrs = self._attributes(node, inode)
                    reply = pyfuse3.readdir_reply(token, name, attrs, position + 1)
                except BaseException:
                    self.inodes.unused(node)
                    raise
                if reply:
                    self.inodes.entry(node)
                else:
                    self.inodes.unused(node)
            if not reply:
                return

    @_handler
    def releasedir(self, fh: int) -> None:
        handle = self._dirs.pop(fh)
        self.overlay.unref(handle.node)

    @_handler
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        node = self.inodes.node(fh) if self.handle_free else self._dirs[fh].node
        self.overlay.fsync_dir(node)

    # -- xattrs ---------------------------------------------------------------------------------

    @_handler
    def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        return self.overlay.getxattr(self.inodes.node(inode), name)

    @_handler
    def listxattr(self, inode: int, ctx: RequestContext) -> list[bytes]:
        return self.overlay.listxattr(self.inodes.node(inode))

    @_handler
    def setxattr(self, inode: int, name: bytes, value: bytes, ctx: RequestContext) -> None:
        self._changed()
        self.overlay.setxattr(self.inodes.node(inode), name, value)

    @_handler
    def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        self._changed()
        self.overlay.removexattr(self.inodes.node(inode), name)

    # -- end ------------------------------------------------------------------------------------

    def release_all(self) -> None:
        """After the session ended: close what the kernel never released."""
        for handle in self._files.values():
            if handle.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(handle.fd)
        self._files.clear()
        self._dirs.clear()
