"""The guard's FUSE operations: a pass-through filesystem over the guarded directory that
stages old content (stage.py) before anything destroys it.

Destructive operations and what is kept before they return:
    unlink                     the file itself (renamed into staging; copied if it has other
                               links or lives on another filesystem)
    rename over a file         the replaced file (hard-linked into staging, else copied)
    rename RENAME_EXCHANGE     a copy of each side (both files live on, swapped)
    open with O_TRUNC,         a copy of the file, when it is not empty and would shrink
    truncate / ftruncate
    rmdir, rename over a dir   the directory's metadata (it was empty: no content)
Writes into the middle of a file are not destructive in this sense and are not staged.

Every access to the host goes through fds: the guarded directory was opened before the mount
(the daemon must never use a path under it: that would re-enter its own mount), each inode
holds an O_PATH fd (inodes.py), and `/proc/self/fd/N` reaches a file directly. The staging dir
(`.isolated-agent-guard` at the top) is invisible through the mount: lookups answer ENOENT,
listings leave it out, and creating or renaming onto that name is refused (EACCES).

Cache contract (one mode): the kernel may cache entries and attributes for `TIMEOUT` seconds
and negative lookups not at all; file data is not kept across opens. Every change made through
the mount is made by this daemon, and the kernel updates its own caches for each request it
sent (an unlinked or replaced name leaves its dentry cache at once, so a staged file can never
still show at its old name). Changes behind the mount — a process that was already working
inside the directory when the guard started — are seen within `TIMEOUT`. Writeback caching is
off, so an error writing to the host (ENOSPC) is reported by write(), not later.

Errors become errnos in one place (`_handler`): OSError -> its errno; anything else is logged
and answered EIO, and the daemon goes on. A staging failure fails the operation (fail closed):
nothing is destroyed that was not first kept.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import pyfuse3
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, RequestContext, SetattrFields

from isolated_agent import libc
from isolated_agent.backup.guard.inodes import ROOT, Inode, InodeTable
from isolated_agent.backup.guard.stage import Pending, Stager
from isolated_agent.backup.guard.staging import STAGING_NAME
from isolated_agent.engines.fuse.replies import entry_attributes, errno_handler, statfs_reply

log = logging.getLogger("guard")

TIMEOUT = 1.0
T = TypeVar("T")


_handler = errno_handler(log)


@dataclass
class _Handle:
    inode: Inode
    fd: int


class GuardOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, root_fd: int, root_path: bytes, stager: Stager) -> None:
        super().__init__()
        self.inodes = InodeTable(root_fd, root_path)
        self.stager = stager
        self._files: dict[int, _Handle] = {}
        self._dirs: dict[int, tuple[Inode, list[bytes] | None]] = {}
        self._next_handle = 1
        self._root = self.inodes.get(ROOT)
        self._as_root = os.geteuid() == 0

    # -- helpers ----------------------------------------------------------------------------

    def _attributes(self, inode: Inode, st: os.stat_result | None = None) -> EntryAttributes:
        st = st if st is not None else os.stat(inode.fd)
        attrs = entry_attributes(st, inode.number, TIMEOUT, TIMEOUT)
        return attrs

    def _entry(self, parent: Inode, name: bytes) -> EntryAttributes:
        inode, st = self.inodes.lookup(parent, name)
        try:
            attrs = self._attributes(inode, st)
        except BaseException:
            self.inodes.unused(inode)
            raise
        self.inodes.entry(inode)
        return attrs

    def _hidden(self, parent: Inode, name: bytes) -> bool:
        return parent.number == ROOT and name == STAGING_NAME

    def _refuse_hidden(self, parent: Inode, name: bytes) -> None:
        if self._hidden(parent, name):
            raise OSError(errno.EACCES, "reserved for the guard's staging dir")

    def _handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _give_to(self, parent: Inode, name: bytes, ctx: RequestContext) -> None:
        """A new entry made by the (root) daemon belongs to the caller; its group is the
        directory's when that is set-group-ID, as the kernel would have made it."""
        if not self._as_root or (ctx.uid == 0 and ctx.gid == 0):
            return
        parent_st = os.stat(parent.fd)
        gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else ctx.gid
        os.chown(name, ctx.uid, gid, dir_fd=parent.fd, follow_symlinks=False)

    def _stat_child(self, parent: Inode, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    # -- lookups and attributes -------------------------------------------------------------

    @_handler
    def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        parent = self.inodes.get(parent_inode)
        if self._hidden(parent, name):
            raise OSError(errno.ENOENT, "hidden")
        if name in (b".", b".."):
            # Never resolve ".." on the host: from a child of DIR it climbs onto DIR, which is
            # our own mount point, and the walk would re-enter this very mount.
            node = parent if name == b"." or parent.number == ROOT else \
                self.inodes.get(parent.parent)
            self.inodes.entry(node)
            return self._attributes(node)
        return self._entry(parent, name)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for number, count in inode_list:
            try:
                self.inodes.forget(number, count)
            except Exception:  # must not fail
                log.exception("guard: forget(%d, %d) failed", number, count)

    @_handler
    def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        return self._attributes(self.inodes.get(inode))

    @_handler
    def setattr(self, inode_number: int, attr: EntryAttributes, fields: SetattrFields,
                fh: int | None, ctx: RequestContext) -> EntryAttributes:
        inode = self.inodes.get(inode_number)
        st = os.stat(inode.fd)
        is_link = stat.S_ISLNK(st.st_mode)
        if fields.update_size:
            self._truncate(inode, st, attr.st_size, fh)
        if fields.update_mode and not is_link:
            os.chmod(inode.proc_path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if is_link:
                parent = self.inodes.get(inode.parent)
                os.chown(inode.name, uid, gid, dir_fd=parent.fd, follow_symlinks=False)
            else:
                os.chown(inode.proc_path, uid, gid)
        if fields.update_atime or fields.update_mtime:
            times = (attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                     attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
            if is_link:
                parent = self.inodes.get(inode.parent)
                os.utime(inode.name, ns=times, dir_fd=parent.fd, follow_symlinks=False)
            else:
                os.utime(inode.proc_path, ns=times)
        return self._attributes(inode)

    def _truncate(self, inode: Inode, st: os.stat_result, size: int, fh: int | None) -> None:
        pending = None
        if stat.S_ISREG(st.st_mode) and size < st.st_size:
            reader = os.open(inode.proc_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                pending = self.stager.before_truncate(reader, self.inodes.path(inode), st, size)
            finally:
                os.close(reader)
        try:
            if fh is not None and fh in self._files:
                os.ftruncate(self._files[fh].fd, size)
            else:
                os.truncate(inode.proc_path, size)
        except BaseException:
            self.stager.undo(pending)
            raise
        self.stager.done(pending)

    @_handler
    def readlink(self, inode: int, ctx: RequestContext) -> bytes:
        return os.readlink(b"", dir_fd=self.inodes.get(inode).fd)

    @_handler
    def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        return statfs_reply(os.statvfs(self._root.proc_path))

    @_handler
    def access(self, inode: int, mode: int, ctx: RequestContext) -> bool:
        return True  # mounted with default_permissions: the kernel checks the mode bits

    # -- creating ---------------------------------------------------------------------------

    @_handler
    def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
              ctx: RequestContext) -> EntryAttributes:
        parent = self.inodes.get(parent_inode)
        self._refuse_hidden(parent, name)
        os.mknod(name, mode, rdev, dir_fd=parent.fd)
        self._give_to(parent, name, ctx)
        return self._entry(parent, name)

    @_handler
    def mkdir(self, parent_inode: int, name: bytes, mode: int,
              ctx: RequestContext) -> EntryAttributes:
        parent = self.inodes.get(parent_inode)
        self._refuse_hidden(parent, name)
        os.mkdir(name, mode, dir_fd=parent.fd)
        self._give_to(parent, name, ctx)
        return self._entry(parent, name)

    @_handler
    def symlink(self, parent_inode: int, name: bytes, target: bytes,
                ctx: RequestContext) -> EntryAttributes:
        parent = self.inodes.get(parent_inode)
        self._refuse_hidden(parent, name)
        os.symlink(target, name, dir_fd=parent.fd)
        self._give_to(parent, name, ctx)
        return self._entry(parent, name)

    @_handler
    def link(self, inode_number: int, new_parent_inode: int, new_name: bytes,
             ctx: RequestContext) -> EntryAttributes:
        inode = self.inodes.get(inode_number)
        parent = self.inodes.get(new_parent_inode)
        self._refuse_hidden(parent, new_name)
        os.link(inode.proc_path, new_name, dst_dir_fd=parent.fd, follow_symlinks=True)
        return self._entry(parent, new_name)

    # -- destroying: staged first -----------------------------------------------------------

    @_handler
    def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        parent = self.inodes.get(parent_inode)
        if self._hidden(parent, name):
            raise OSError(errno.ENOENT, "hidden")
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        self.stager.unlink(parent.fd, name, self.inodes.child_path(parent, name), st)

    @_handler
    def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        parent = self.inodes.get(parent_inode)
        if self._hidden(parent, name):
            raise OSError(errno.ENOENT, "hidden")
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        os.rmdir(name, dir_fd=parent.fd)
        self.stager.removed_dir(self.inodes.child_path(parent, name), st)

    @_handler
    def rename(self, old_parent_inode: int, old_name: bytes, new_parent_inode: int,
               new_name: bytes, flags: int, ctx: RequestContext) -> None:
        old_parent = self.inodes.get(old_parent_inode)
        new_parent = self.inodes.get(new_parent_inode)
        if self._hidden(old_parent, old_name):
            raise OSError(errno.ENOENT, "hidden")
        self._refuse_hidden(new_parent, new_name)
        source = os.stat(old_name, dir_fd=old_parent.fd, follow_symlinks=False)
        target = self._stat_child(new_parent, new_name)
        new_path = self.inodes.child_path(new_parent, new_name)
        pending: list[Pending | None] = []
        removed_dir = None
        try:
            if target is not None and (target.st_dev, target.st_ino) != (
                    source.st_dev, source.st_ino):
                if flags & libc.RENAME_EXCHANGE:
                    old_path = self.inodes.child_path(old_parent, old_name)
                    pending.append(self.stager.before_replace(
                        new_parent.fd, new_name, new_path, target, "exchange", copy=True))
                    pending.append(self.stager.before_replace(
                        old_parent.fd, old_name, old_path, source, "exchange", copy=True))
                elif not flags & libc.RENAME_NOREPLACE:
                    if stat.S_ISDIR(target.st_mode):
                        removed_dir = target
                    else:
                        pending.append(self.stager.before_replace(
                            new_parent.fd, new_name, new_path, target, "rename"))
            libc.renameat2(old_parent.fd, old_name, new_parent.fd, new_name, flags)
        except BaseException:
            for each in pending:
                self.stager.undo(each)
            raise
        for each in pending:
            self.stager.done(each)
        if removed_dir is not None:
            self.stager.removed_dir(new_path, removed_dir, "rename")
        self.inodes.moved((source.st_dev, source.st_ino), new_parent, new_name)
        if flags & libc.RENAME_EXCHANGE and target is not None:
            self.inodes.moved((target.st_dev, target.st_ino), old_parent, old_name)

    # -- files ------------------------------------------------------------------------------

    def _open_host(self, inode: Inode, flags: int) -> int:
        """Open the host file for `flags`, keeping its old content first if O_TRUNC would
        destroy it."""
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
        pending = None
        if flags & os.O_TRUNC:  # Linux truncates even with O_RDONLY | O_TRUNC
            st = os.stat(inode.fd)
            if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                reader = os.open(inode.proc_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    pending = self.stager.before_truncate(reader, self.inodes.path(inode), st, 0)
                finally:
                    os.close(reader)
        try:
            fd = os.open(inode.proc_path, flags | os.O_CLOEXEC)
        except BaseException:
            self.stager.undo(pending)
            raise
        self.stager.done(pending)
        return fd

    def _file_info(self, inode: Inode, fd: int) -> FileInfo:
        handle = self._handle()
        self._files[handle] = _Handle(inode, fd)
        self.inodes.entry(inode)  # an open file keeps its inode (and fd) bound
        return FileInfo(fh=handle, keep_cache=False, direct_io=False)

    @_handler
    def open(self, inode_number: int, flags: int, ctx: RequestContext) -> FileInfo:
        inode = self.inodes.get(inode_number)
        return self._file_info(inode, self._open_host(inode, flags))

    @_handler
    def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
               ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        parent = self.inodes.get(parent_inode)
        self._refuse_hidden(parent, name)
        try:
            fd = os.open(name, (flags & ~os.O_TRUNC) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, mode, dir_fd=parent.fd)
            created = True
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            fd, created = -1, False  # it appeared behind the kernel's back: open it as it is
        try:
            if created:
                self._give_to(parent, name, ctx)
            attrs = self._entry(parent, name)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        inode = self.inodes.get(attrs.st_ino)
        if not created:
            try:
                fd = self._open_host(inode, flags)
            except BaseException:
                self.inodes.forget(inode.number, 1)
                raise
        return self._file_info(inode, fd), attrs

    @_handler
    def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self._files[fh].fd, size, off)

    @_handler
    def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(self._files[fh].fd, buf, off)

    @_handler
    def flush(self, fh: int) -> None:
        raise FUSEError(errno.ENOSYS)  # writes go straight to the host file

    @_handler
    def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(self._files[fh].fd)

    @_handler
    def release(self, fh: int) -> None:
        handle = self._files.pop(fh)
        try:
            os.close(handle.fd)
        finally:
            self.inodes.forget(handle.inode.number, 1)

    # -- directories ------------------------------------------------------------------------

    @_handler
    def opendir(self, inode_number: int, ctx: RequestContext) -> int:
        inode = self.inodes.get(inode_number)
        if not inode.is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        handle = self._handle()
        self._dirs[handle] = (inode, None)
        self.inodes.entry(inode)  # an open directory keeps its inode bound
        return handle

    @_handler
    def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Offsets index a listing taken when the stream starts, so paging and telldir see
        each name once. `.` and `..` come first and, like the kernel, are not counted as
        lookups."""
        directory, names = self._dirs[fh]
        if names is None or start_id == 0:
            fd = os.open(directory.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                names = [b".", b"..", *sorted(os.fsencode(n) for n in os.listdir(fd))]
            finally:
                os.close(fd)
            if directory.number == ROOT:
                names = [n for n in names if n != STAGING_NAME]
            self._dirs[fh] = (directory, names)
        for position in range(start_id, len(names)):
            if names[position] in (b".", b".."):
                if names[position] == b"." or directory.number == ROOT:
                    attrs = self._attributes(directory)
                else:  # the parent we know, never ".." on the host (see lookup)
                    attrs = self._attributes(self.inodes.get(directory.parent))
                if not pyfuse3.readdir_reply(token, names[position], attrs, position + 1):
                    return
                continue
            try:
                inode, st = self.inodes.lookup(directory, names[position])
            except FileNotFoundError:
                continue  # removed since the listing was taken
            try:
                attrs = self._attributes(inode, st)
                accepted = pyfuse3.readdir_reply(token, names[position], attrs, position + 1)
            except BaseException:
                self.inodes.unused(inode)
                raise
            if not accepted:
                self.inodes.unused(inode)
                return
            self.inodes.entry(inode)

    @_handler
    def releasedir(self, fh: int) -> None:
        inode, _ = self._dirs.pop(fh)
        self.inodes.forget(inode.number, 1)

    @_handler
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        inode, _ = self._dirs[fh]
        fd = os.open(inode.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- xattrs -----------------------------------------------------------------------------

    def _xattr_path(self, inode: Inode) -> str:
        if stat.S_ISLNK(os.stat(inode.fd).st_mode):
            raise OSError(errno.EPERM, "no extended attributes on symlinks here")
        return inode.proc_path

    @_handler
    def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        return os.getxattr(self._xattr_path(self.inodes.get(inode)), name)

    @_handler
    def listxattr(self, inode: int, ctx: RequestContext) -> list[bytes]:
        node = self.inodes.get(inode)
        if stat.S_ISLNK(os.stat(node.fd).st_mode):
            return []
        return [os.fsencode(n) for n in os.listxattr(node.proc_path)]

    @_handler
    def setxattr(self, inode: int, name: bytes, value: bytes, ctx: RequestContext) -> None:
        os.setxattr(self._xattr_path(self.inodes.get(inode)), name, value)

    @_handler
    def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        os.removexattr(self._xattr_path(self.inodes.get(inode)), name)

    # -- end --------------------------------------------------------------------------------

    def release_all(self) -> None:
        for handle in self._files.values():
            with contextlib.suppress(OSError):
                os.close(handle.fd)
        self._files.clear()
        self._dirs.clear()
        self.inodes.close()
