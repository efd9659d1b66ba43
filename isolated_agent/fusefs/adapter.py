"""The one pyfuse3 adapter: FUSE requests in, calls of a `FileSystem` model, replies out.

Everything that is about FUSE rather than about a file system lives here, once: the
conversion of requests (`Caller`, `Changes`) and of answers (`Attributes` -> EntryAttributes,
`Opened` -> FileInfo), the one place an exception becomes an errno (`replies.errno_handler`),
lookup counts given back (`forget`, which may not fail), the paging of listings (a listing is
taken at offset 0 and read by position, so paging, seekdir and telldir see each name once), and
the answers every model of ours gives alike: FLUSH is refused once (writes go straight to the
backing files, so nothing is left to flush at close) and ACCESS is always granted (every mount
uses default_permissions: the kernel checks the mode bits).

Handlers never await: each request runs to completion before the next one starts, so a model
(which is not thread-safe) sees one request at a time, and may answer `read` from one reused
buffer (pyfuse3 copies it into the reply before it reads the next request).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence

import pyfuse3
import trio  # type: ignore[import-untyped]
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, RequestContext, SetattrFields

from isolated_agent.fusefs import accounting, fastloop
from isolated_agent.fusefs.model import Attributes, Caller, Changes, FileSystem, Opened
from isolated_agent.fusefs.replies import entry_attributes, errno_handler, statfs_reply

log = logging.getLogger("fusefs")
_handler = errno_handler(log)


class FuseKernel:
    """The `Kernel` of a mounted session: FUSE notifications through pyfuse3."""

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)

    def invalidate_inode(self, inode: int, attributes_only: bool = True) -> None:
        pyfuse3.invalidate_inode(inode, attr_only=attributes_only)

    def store(self, inode: int, offset: int, data: memoryview) -> None:
        pyfuse3.notify_store(inode, offset, data)  # type: ignore[arg-type]  # any buffer


def reply(attributes: Attributes) -> EntryAttributes:
    """The EntryAttributes for `attributes`, built once and kept with them (a model that keeps
    its answers, as agentfs's attribute cache does, has them converted once)."""
    built = attributes.reply
    if built is not None:
        return built  # type: ignore[return-value]
    if attributes.st is None:
        built = EntryAttributes()
        built.st_ino = 0
        built.entry_timeout = attributes.entry_timeout
    else:
        built = entry_attributes(attributes.st, attributes.inode, attributes.entry_timeout,
                                 attributes.attr_timeout, attributes.nlink)
        if attributes.owner is not None:
            built.st_uid, built.st_gid = attributes.owner
    attributes.reply = built
    return built


def _caller(ctx: RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.pid, ctx.umask)


def _file_info(opened: Opened) -> FileInfo:
    if opened.cache_readdir:
        return FileInfo(fh=opened.fh, keep_cache=opened.keep_cache,
                        direct_io=opened.direct_io, cache_readdir=True)
    return FileInfo(fh=opened.fh, keep_cache=opened.keep_cache, direct_io=opened.direct_io)


class Adapter(pyfuse3.Operations):
    def __init__(self, model: FileSystem) -> None:
        super().__init__()
        self.model = model
        policy = model.policy
        self.supports_dot_lookup = policy.dot_lookup
        self.enable_writeback_cache = policy.writeback
        self.enable_atomic_o_trunc = policy.atomic_o_trunc
        self._handle_free = policy.handle_free
        # The listing each directory stream reads: by handle, or handle-free by inode (then
        # until the stream ends: the kernel reads it once, from offset 0, into its cache).
        self._streams: dict[int, Sequence[bytes]] = {}
        self.initialized = trio.Event()  # set when FUSE_INIT arrives (its reply follows at once)

    def init(self) -> None:
        self.initialized.set()

    def close(self) -> None:
        """After the session ended."""
        self._streams.clear()
        self.model.close()

    # -- lookups and attributes -----------------------------------------------------------------

    @_handler
    def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        return reply(self.model.lookup(parent_inode, name, _caller(ctx)))

    async def _forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            try:
                if self.model.forget(inode, count) and self._handle_free:
                    self._streams.pop(inode, None)
            except Exception:  # must not fail: log the bug and go on
                log.exception("forget(%d, %d) failed", inode, count)

    forget = accounting.counted("forget", _forget)

    @_handler
    def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        return reply(self.model.getattr(inode, _caller(ctx)))

    @_handler
    def setattr(self, inode: int, attr: EntryAttributes, fields: SetattrFields, fh: int | None,
                ctx: RequestContext) -> EntryAttributes:
        changes = Changes(
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return reply(self.model.setattr(inode, changes, fh, _caller(ctx)))

    @_handler
    def readlink(self, inode: int, ctx: RequestContext) -> bytes:
        return self.model.readlink(inode, _caller(ctx))

    @_handler
    def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        return statfs_reply(self.model.statfs(_caller(ctx)))

    @_handler
    def access(self, inode: int, mode: int, ctx: RequestContext) -> bool:
        return True  # mounted with default_permissions: the kernel checks the mode bits

    # -- creating and removing ------------------------------------------------------------------

    @_handler
    def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
              ctx: RequestContext) -> EntryAttributes:
        return reply(self.model.mknod(parent_inode, name, mode, rdev, _caller(ctx)))

    @_handler
    def mkdir(self, parent_inode: int, name: bytes, mode: int,
              ctx: RequestContext) -> EntryAttributes:
        return reply(self.model.mkdir(parent_inode, name, mode, _caller(ctx)))

    @_handler
    def symlink(self, parent_inode: int, name: bytes, target: bytes,
                ctx: RequestContext) -> EntryAttributes:
        return reply(self.model.symlink(parent_inode, name, target, _caller(ctx)))

    @_handler
    def link(self, inode: int, new_parent_inode: int, new_name: bytes,
             ctx: RequestContext) -> EntryAttributes:
        return reply(self.model.link(inode, new_parent_inode, new_name, _caller(ctx)))

    @_handler
    def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        self.model.unlink(parent_inode, name, _caller(ctx))

    @_handler
    def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        self.model.rmdir(parent_inode, name, _caller(ctx))

    @_handler
    def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
               name_new: bytes, flags: int, ctx: RequestContext) -> None:
        self.model.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags,
                          _caller(ctx))

    # -- files ----------------------------------------------------------------------------------

    @_handler
    def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        return _file_info(self.model.open(inode, flags, _caller(ctx)))

    @_handler
    def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
               ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        opened, attributes = self.model.create(parent_inode, name, mode, flags, _caller(ctx))
        return _file_info(opened), reply(attributes)

    @_handler
    def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        return self.model.read(fh, off, size)

    @_handler
    def write(self, fh: int, off: int, buf: bytes) -> int:
        if len(buf) >= fastloop.BULK_WRITE:
            fastloop.rest()  # leave the CPU to the writeback of what it writes
        return self.model.write(fh, off, buf)

    @_handler
    def flush(self, fh: int) -> None:
        # Writes go straight to the backing file: nothing to flush. ENOSYS tells the kernel
        # never to send FLUSH again, saving a round trip on every close().
        raise FUSEError(errno.ENOSYS)

    @_handler
    def fsync(self, fh: int, datasync: bool) -> None:
        self.model.fsync(fh, datasync)

    @_handler
    def release(self, fh: int) -> None:
        self.model.release(fh)

    # -- directories ----------------------------------------------------------------------------

    @_handler
    def opendir(self, inode: int, ctx: RequestContext) -> int | FileInfo:  # type: ignore[override]
        opened = self.model.opendir(inode, _caller(ctx))
        # A bare handle where the kernel may not keep the listing: what every pyfuse3 takes.
        return _file_info(opened) if opened.cache_readdir else opened.fh

    @_handler
    def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        names = self._streams.get(fh) if start_id else None
        if names is None:
            names = self._streams[fh] = self.model.listing(fh)
        if start_id >= len(names):
            if self._handle_free:
                del self._streams[fh]  # the stream ended: the kernel has the whole listing
            return
        for position in range(start_id, len(names)):
            name = names[position]
            listed = self.model.listed(fh, name)
            if listed is None:
                continue  # removed since the listing was taken
            try:
                taken = pyfuse3.readdir_reply(token, name, reply(listed.attributes),
                                              position + 1)
            except BaseException:
                if listed.settle is not None:
                    listed.settle(False)
                raise
            if listed.settle is not None:
                listed.settle(taken)
            if not taken:
                return

    @_handler
    def releasedir(self, fh: int) -> None:
        self._streams.pop(fh, None)
        self.model.releasedir(fh)

    @_handler
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.model.fsyncdir(fh, datasync)

    # -- xattrs ---------------------------------------------------------------------------------

    @_handler
    def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        return self.model.getxattr(inode, name, _caller(ctx))

    @_handler
    def listxattr(self, inode: int, ctx: RequestContext) -> list[bytes]:
        return list(self.model.listxattr(inode, _caller(ctx)))

    @_handler
    def setxattr(self, inode: int, name: bytes, value: bytes, ctx: RequestContext) -> None:
        self.model.setxattr(inode, name, value, _caller(ctx))

    @_handler
    def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        self.model.removexattr(inode, name, _caller(ctx))
