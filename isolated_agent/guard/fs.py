"""The guard as a `FileSystem` model (fusefs/model.py): a pass-through file system over the
guarded directory that stages old content (stage.py) before anything destroys it. The one
FUSE adapter (fusefs/adapter.py) serves it.

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

Cache contract. Handle-free (with the pyfuse3 of packaging/pyfuse3, `handle_free`): the
first OPEN and OPENDIR are answered ENOSYS, so the kernel opens files and directories itself
from then on, keeps every file's data and every listing in its caches across opens, and keeps
entries (negative ones too) and attributes for `TIMEOUT`: a second pass over a guarded tree
sends the daemon nothing, and the daemon does work only where something changes. Reads and
writes name their inode and go through its shared descriptors (`HostInodeTable.data_fd`); atomic
O_TRUNC is declined, so a truncating open arrives as a SETATTR and is staged as truncate(2)
is. What keeps these caches true:
  - every change made through the mount is this daemon's answer to a request, and the kernel
    updates its own caches for each request it sent: an unlinked or replaced name leaves its
    dentry cache at once (a staged file never shows at its old name); a truncation drops the
    file's cached pages; a write updates them;
  - the daemon's own work is invisible in the tree (staging lives in the hidden staging dir;
    a copy kept before a truncation changes nothing visible);
  - a change made behind the mount — by a process that was inside DIR before the guard
    started (`guard start` names those), through a hard link outside DIR, by the backup daemon
    restoring beside a file — is reported by inotify on the directory (behind.py), and the
    daemon makes the kernel forget the entry and the attributes concerned between two
    requests; the kernel then asks again and, seeing a new mtime or size, drops the file's
    cached data (auto_inval_data). So such a change is seen within a request or two, not at
    once: a reader through the mount racing a writer behind it can read the old data once.
With handles (a pyfuse3 without those extensions): attributes and entries for
`SHORT_TIMEOUT`, negative lookups not at all, file data not kept across opens; changes behind
the mount are seen within `SHORT_TIMEOUT`. Writeback caching is off in both, so an error
writing to the host (ENOSPC) is reported by write(), not later.

Errors are OSErrors, answered with their errno by the adapter (anything else is logged and
answered EIO, and the daemon goes on). A staging failure fails the operation (fail closed):
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

from isolated_agent.backup.staging import STAGING_NAME
from isolated_agent.fusefs.handles import Handles
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
from isolated_agent.guard.behind import Place, Watcher
from isolated_agent.guard.inodes import ROOT, HostInodeTable, Inode
from isolated_agent.guard.stage import Pending, Stager
from isolated_agent.system import libc

log = logging.getLogger("guard")

TIMEOUT = 24 * 3600.0  # handle-free: the kernel keeps what it learnt (contract above)
SHORT_TIMEOUT = 1.0  # with handles (a pyfuse3 without the extensions)


def _enosys() -> OSError:
    return OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))


@dataclass
class _Handle:
    inode: Inode
    fd: int


class GuardFileSystem:
    def __init__(self, root_fd: int, root_path: bytes, stager: Stager, kernel: Kernel,
                 handle_free: bool) -> None:
        """`handle_free`: wherever pyfuse3 allows it (`replies.handle_free_supported`; see
        the cache contract above)."""
        self.handle_free = handle_free
        self.kernel = kernel
        # A truncating open arrives as a SETATTR when handle-free: staged like truncate(2).
        self.policy = Policy(handle_free=handle_free, atomic_o_trunc=not handle_free)
        # Long-lived caches need to hear of changes made behind the mount (behind.py).
        self.behind = Watcher() if self.handle_free else None
        self.inodes = HostInodeTable(root_fd, root_path, self.behind)
        self.stager = stager
        self.timeout = TIMEOUT if self.handle_free else SHORT_TIMEOUT
        self._files: Handles[_Handle] = Handles()
        self._dirs: Handles[Inode] = Handles()
        self._root = self.inodes.get(ROOT)
        self._as_root = os.geteuid() == 0

    # -- helpers ----------------------------------------------------------------------------

    def _attributes(self, inode: Inode, st: os.stat_result | None = None) -> Attributes:
        st = st if st is not None else os.stat(inode.fd)
        return Attributes(inode.number, st, self.timeout, self.timeout)

    def _entry(self, parent: Inode, name: bytes) -> Attributes:
        inode, st = self.inodes.lookup(parent, name)
        return counted_entry(self.inodes, inode, lambda: self._attributes(inode, st))

    def _hidden(self, parent: Inode, name: bytes) -> bool:
        return parent.number == ROOT and name == STAGING_NAME

    def _refuse_hidden(self, parent: Inode, name: bytes) -> None:
        if self._hidden(parent, name):
            raise OSError(errno.EACCES, "reserved for the guard's staging dir")

    def _give_to(self, parent: Inode, name: bytes, caller: Caller) -> None:
        """A new entry made by the (root) daemon belongs to the caller; its group is the
        directory's when that is set-group-ID, as the kernel would have made it."""
        if not self._as_root or (caller.uid == 0 and caller.gid == 0):
            return
        parent_st = os.stat(parent.fd)
        gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else caller.gid
        os.chown(name, caller.uid, gid, dir_fd=parent.fd, follow_symlinks=False)

    def _stat_child(self, parent: Inode, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _settle(self, *places: Place) -> None:
        """After a change to `places` (directory inode, name): its inotify events are ours."""
        if self.behind is not None:
            self.behind.settle(places)

    def _places(self, inode: Inode) -> tuple[Place, Place]:
        """Where inotify reports a change of `inode`: under its name, and (a directory) itself."""
        return (inode.parent, inode.name), (inode.number, b"")

    def invalidate_behind(self) -> None:
        """Between requests: make the kernel forget what changed behind the mount. Only
        attributes and entries: the kernel drops a file's cached data itself once it sees the
        new mtime or size, and invalidating data here could wait on a page whose READ is
        queued for this very thread."""
        assert self.behind is not None
        changes = self.behind.take()
        if self.behind.overflowed:
            self.behind.overflowed = False
            log.warning("guard: inotify queue overflow: forgetting every cached attribute")
            for number in self.inodes.numbers():
                with contextlib.suppress(OSError):
                    self.kernel.invalidate_inode(number)
        for change in changes:
            directory = self.inodes.get_or_none(change.directory)
            if directory is None:
                continue
            if not change.name:
                targets = [directory.number]
            elif change.namespace:
                self.kernel.invalidate_entry(directory.number, change.name)
                targets = [directory.number]
            else:
                child = self.inodes.known(directory, change.name)
                targets = [child.number] if child is not None else []
            for number in targets:
                with contextlib.suppress(OSError):  # the kernel forgot it meanwhile
                    self.kernel.invalidate_inode(number)

    # -- lookups and attributes -------------------------------------------------------------

    def lookup(self, parent_inode: int, name: bytes, caller: Caller) -> Attributes:
        parent = self.inodes.get(parent_inode)
        if name in (b".", b".."):
            # Never resolve ".." on the host: from a child of DIR it climbs onto DIR, which is
            # our own mount point, and the walk would re-enter this very mount.
            node = parent if name == b"." or parent.number == ROOT else \
                self.inodes.get(parent.parent)
            self.inodes.entry(node)
            return self._attributes(node)
        try:
            if self._hidden(parent, name):
                raise OSError(errno.ENOENT, "hidden")
            return self._entry(parent, name)
        except FileNotFoundError:
            if not self.handle_free:
                raise
            # The kernel remembers that the name does not exist (git asks for a .gitignore
            # in every directory, every time), until a create through the mount or inotify
            # says otherwise.
            return Attributes.negative(self.timeout)

    def forget(self, number: int, count: int) -> bool:
        return self.inodes.forget(number, count)

    def getattr(self, inode: int, caller: Caller) -> Attributes:
        return self._attributes(self.inodes.get(inode))

    def setattr(self, inode_number: int, changes: Changes, fh: int | None,
                caller: Caller) -> Attributes:
        inode = self.inodes.get(inode_number)
        st = os.stat(inode.fd)
        is_link = stat.S_ISLNK(st.st_mode)
        if changes.size is not None:
            self._truncate(inode, st, changes.size, fh)
        if changes.mode is not None and not is_link:
            os.chmod(inode.proc_path, stat.S_IMODE(changes.mode))
        if changes.uid is not None or changes.gid is not None:
            uid = changes.uid if changes.uid is not None else -1
            gid = changes.gid if changes.gid is not None else -1
            if is_link:
                parent = self.inodes.get(inode.parent)
                os.chown(inode.name, uid, gid, dir_fd=parent.fd, follow_symlinks=False)
            else:
                os.chown(inode.proc_path, uid, gid)
        if changes.atime_ns is not None or changes.mtime_ns is not None:
            times = (changes.atime_ns if changes.atime_ns is not None else st.st_atime_ns,
                     changes.mtime_ns if changes.mtime_ns is not None else st.st_mtime_ns)
            if is_link:
                parent = self.inodes.get(inode.parent)
                os.utime(inode.name, ns=times, dir_fd=parent.fd, follow_symlinks=False)
            else:
                os.utime(inode.proc_path, ns=times)
        self._settle(*self._places(inode))
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
            handle = None if self.handle_free else self._files.get(fh)
            if handle is not None:
                os.ftruncate(handle.fd, size)
            else:
                os.truncate(inode.proc_path, size)
        except BaseException:
            self.stager.undo(pending)
            raise
        finally:
            self._settle(*self._places(inode))
        self.stager.done(pending)

    def readlink(self, inode: int, caller: Caller) -> bytes:
        return os.readlink(b"", dir_fd=self.inodes.get(inode).fd)

    def statfs(self, caller: Caller) -> os.statvfs_result:
        return os.statvfs(self._root.proc_path)

    # -- creating ---------------------------------------------------------------------------

    def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
              caller: Caller) -> Attributes:
        parent = self.inodes.get(parent_inode)
        self._refuse_hidden(parent, name)
        try:
            os.mknod(name, mode, rdev, dir_fd=parent.fd)
            self._give_to(parent, name, caller)
        finally:
            self._settle((parent.number, name))
        return self._entry(parent, name)

    def mkdir(self, parent_inode: int, name: bytes, mode: int,
              caller: Caller) -> Attributes:
        parent = self.inodes.get(parent_inode)
        self._refuse_hidden(parent, name)
        try:
            os.mkdir(name, mode, dir_fd=parent.fd)
            self._give_to(parent, name, caller)
        finally:
            self._settle((parent.number, name))
        return self._entry(parent, name)

    def symlink(self, parent_inode: int, name: bytes, target: bytes,
                caller: Caller) -> Attributes:
        parent = self.inodes.get(parent_inode)
        self._refuse_hidden(parent, name)
        try:
            os.symlink(target, name, dir_fd=parent.fd)
            self._give_to(parent, name, caller)
        finally:
            self._settle((parent.number, name))
        return self._entry(parent, name)

    def link(self, inode_number: int, new_parent_inode: int, new_name: bytes,
             caller: Caller) -> Attributes:
        inode = self.inodes.get(inode_number)
        parent = self.inodes.get(new_parent_inode)
        self._refuse_hidden(parent, new_name)
        try:
            os.link(inode.proc_path, new_name, dst_dir_fd=parent.fd, follow_symlinks=True)
        finally:
            self._settle((parent.number, new_name))
        return self._entry(parent, new_name)

    # -- destroying: staged first -----------------------------------------------------------

    def unlink(self, parent_inode: int, name: bytes, caller: Caller) -> None:
        parent = self.inodes.get(parent_inode)
        if self._hidden(parent, name):
            raise OSError(errno.ENOENT, "hidden")
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        try:
            self.stager.unlink(parent.fd, name, self.inodes.child_path(parent, name), st)
        finally:
            self._settle((parent.number, name))

    def rmdir(self, parent_inode: int, name: bytes, caller: Caller) -> None:
        parent = self.inodes.get(parent_inode)
        if self._hidden(parent, name):
            raise OSError(errno.ENOENT, "hidden")
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        try:
            os.rmdir(name, dir_fd=parent.fd)
        finally:
            self._settle((parent.number, name))
        self.stager.removed_dir(self.inodes.child_path(parent, name), st)

    def rename(self, old_parent_inode: int, old_name: bytes, new_parent_inode: int,
               new_name: bytes, flags: int, caller: Caller) -> None:
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
        finally:
            self._settle((old_parent.number, old_name), (new_parent.number, new_name))
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
        finally:
            self._settle(*self._places(inode))
        self.stager.done(pending)
        return fd

    def _opened(self, inode: Inode, fd: int) -> Opened:
        handle = self._files.add(_Handle(inode, fd))
        self.inodes.entry(inode)  # an open file keeps its inode (and fd) bound
        return Opened(handle, keep_cache=False)

    def open(self, inode_number: int, flags: int, caller: Caller) -> Opened:
        if self.handle_free:
            raise _enosys()  # the kernel opens files itself from now on
        inode = self.inodes.get(inode_number)
        return self._opened(inode, self._open_host(inode, flags))

    def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
               caller: Caller) -> tuple[Opened, Attributes]:
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
                self._give_to(parent, name, caller)
            attributes = self._entry(parent, name)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            self._settle((parent.number, name))
        inode = self.inodes.get(attributes.inode)
        if not created:
            try:
                fd = self._open_host(inode, flags)
            except BaseException:
                self.inodes.forget(inode.number, 1)
                raise
        if self.handle_free:
            os.close(fd)  # later reads and writes name the inode (HostInodeTable.data_fd)
            return Opened(0, keep_cache=True), attributes
        return self._opened(inode, fd), attributes

    def _data_fd(self, fh: int, write: bool) -> int:
        if self.handle_free:  # `fh` is the inode
            return self.inodes.data_fd(self.inodes.get(fh), write)
        return self._files[fh].fd

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self._data_fd(fh, False), size, offset)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        if not self.handle_free:
            return os.pwrite(self._files[fh].fd, data, offset)
        inode = self.inodes.get(fh)
        try:
            return os.pwrite(self.inodes.data_fd(inode, True), data, offset)
        finally:
            self._settle(*self._places(inode))

    def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(self._data_fd(fh, False))

    def release(self, fh: int) -> None:
        if self.handle_free:
            return  # a created file's (its handle was 0): nothing to close
        handle = self._files.pop(fh)
        try:
            os.close(handle.fd)
        finally:
            self.inodes.forget(handle.inode.number, 1)

    # -- directories ------------------------------------------------------------------------

    def opendir(self, inode_number: int, caller: Caller) -> Opened:
        if self.handle_free:
            raise _enosys()  # the kernel opens and caches listings itself
        inode = self.inodes.get(inode_number)
        if not inode.is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        self.inodes.entry(inode)  # an open directory keeps its inode bound
        return Opened(self._dirs.add(inode))

    def _directory(self, fh: int) -> Inode:
        return self.inodes.get(fh) if self.handle_free else self._dirs[fh]

    def listing(self, fh: int) -> Sequence[bytes]:
        """`.` and `..` first; the staging dir left out."""
        directory = self._directory(fh)
        fd = os.open(directory.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            names = [b".", b"..", *sorted(os.fsencode(n) for n in os.listdir(fd))]
        finally:
            os.close(fd)
        if directory.number == ROOT:
            names = [n for n in names if n != STAGING_NAME]
        return names

    def listed(self, fh: int, name: bytes) -> Listed | None:
        directory = self._directory(fh)
        if name in (b".", b".."):  # like the kernel, not counted as lookups
            if name == b"." or directory.number == ROOT:
                return Listed(self._attributes(directory))
            # the parent we know, never ".." on the host (see lookup)
            return Listed(self._attributes(self.inodes.get(directory.parent)))
        try:
            inode, st = self.inodes.lookup(directory, name)
        except FileNotFoundError:
            return None  # removed since the listing was taken
        return listed_entry(self.inodes, inode, lambda: self._attributes(inode, st))

    def releasedir(self, fh: int) -> None:
        self.inodes.forget(self._dirs.pop(fh).number, 1)

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        inode = self._directory(fh)
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

    def getxattr(self, inode: int, name: bytes, caller: Caller) -> bytes:
        return os.getxattr(self._xattr_path(self.inodes.get(inode)), name)

    def listxattr(self, inode: int, caller: Caller) -> Sequence[bytes]:
        node = self.inodes.get(inode)
        if stat.S_ISLNK(os.stat(node.fd).st_mode):
            return []
        return [os.fsencode(n) for n in os.listxattr(node.proc_path)]

    def setxattr(self, inode: int, name: bytes, value: bytes, caller: Caller) -> None:
        node = self.inodes.get(inode)
        try:
            os.setxattr(self._xattr_path(node), name, value)
        finally:
            self._settle(*self._places(node))

    def removexattr(self, inode: int, name: bytes, caller: Caller) -> None:
        node = self.inodes.get(inode)
        try:
            os.removexattr(self._xattr_path(node), name)
        finally:
            self._settle(*self._places(node))

    # -- end --------------------------------------------------------------------------------

    def close(self) -> None:
        """After the session ended: close everything."""
        for handle in self._files:
            with contextlib.suppress(OSError):
                os.close(handle.fd)
        self._files.clear()
        self._dirs.clear()
        self.inodes.close()
        if self.behind is not None:
            self.behind.close()
