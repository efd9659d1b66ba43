"""Carrying a commit out on the host: the operations of a plan, each safe to redo.

An operation is one of
    remove  delete a host entry (a directory only once its entries are gone)
    put     make the host entry at a path what the env has there (file, symlink, dir, node)
    link    make the host path a hard link of another host path (links made in the env)

Files arrive atomically: renamed from the env's layer when they leave it (same filesystem: no
data is copied), otherwise copied to a temp file beside the target, fsynced and renamed over it.
Nothing is ever replaced or removed that was not backed up first: each operation that touches an
existing host entry checks the entry is still the one the backup holds (same inode, same ctime)
and backs it up again if it changed since.

Privileges: unless the plan says to keep them (`commit --keep-setuid`), no file reaches the host
setuid, setgid or with file capabilities, whichever way it gets there — a file moved out of the
layer loses them in the layer just before the rename (so the host never holds the privileged
file, not even for a moment), a copy is made without them, and a hard link is never made to an
inode that has them (a cleared copy is written instead). A host file that already had them and
is replaced loses them too: the commit writes the env's version, and cannot tell a legitimate
setuid helper from one a job planted. Directories keep setgid (group inheritance).

Every path is reached through `fdpath`: as it is when the kernel takes it, through directory fds
when it is longer than PATH_MAX (a job can build such a tree).

Redo after a crash (`resume=True`) decides from what it finds: a move is done when its source
left the layer; a replacement when the host path no longer holds the old inode; an addition when
the path exists; a removal when the path is gone or holds another inode.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from isolated_agent.env.changeset import (
    CAPABILITY_XATTR,
    PRIVILEGE_BITS,
    data_xattrs,
    has_capabilities,
    unprivileged_mode,
)
from isolated_agent.overlay.format import is_private_xattr
from isolated_agent.system import fdpath, libc

Identity = tuple[int, int, int]  # (st_ino, st_ctime_ns, st_mode) of a host entry at plan time

REMOVE, PUT, LINK = "remove", "put", "link"
_COPY_CHUNK = 1 << 30


@dataclass
class Op:
    index: int
    action: str  # REMOVE, PUT or LINK
    root: int
    rel: bytes
    host: bytes  # absolute host path
    kind: str  # what is removed or put: file, dir, symlink, fifo, socket, char, block
    old: Identity | None  # the host entry this op replaces or removes, as planned
    backup: bool  # the old entry must be in the backup store before the op runs
    source: bytes | None = None  # the env's entry (put, link)
    move: bool = False  # put by renaming the source out of the env's layer
    link_to: bytes | None = None  # link: the host path to link to
    source_ino: int = 0  # the inode of `source` at plan time (tells redo where a swap stands)
    stash: bool = False  # the old entry may go into the backup store itself (see Applier)
    mode: int = 0
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    # Give the host setuid/setgid bits and file capabilities as the env has them. A journal
    # written before this field existed reads as False: the safe default.
    keep_privileges: bool = False

    def to_json(self) -> dict[str, Any]:
        # Bytes paths as surrogate-escaped text: JSON keeps them exactly (as \udcXX escapes)
        # and os.fsencode gives back the same bytes.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("rel", "host", "source", "link_to"):
            if data[key] is not None:
                data[key] = os.fsdecode(data[key])
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Op:
        data = dict(data)
        for key in ("rel", "host", "source", "link_to"):
            if data.get(key) is not None:
                data[key] = os.fsencode(data[key])
        if data.get("old") is not None:
            data["old"] = tuple(data["old"])
        return cls(**data)


def _is_the_hashed_file(st: os.stat_result, ino: int, ctime_ns: int) -> bool:
    return (
        stat.S_ISREG(st.st_mode) and st.st_nlink == 1
        and st.st_ino == ino and st.st_ctime_ns == ctime_ns
    )


def identity(st: os.stat_result) -> Identity:
    return (st.st_ino, st.st_ctime_ns, st.st_mode)


lstat_or_none = fdpath.lstat_or_none


Rebackup = Callable[[bytes], None]
Adopt = Callable[[bytes, str], None]  # (path, sha256): that file becomes the blob
Forget = Callable[[bytes, str], None]  # (host path, sha256): that blob will not arrive


class Applier:
    """Runs operations in order; a failing operation is recorded and the rest go on.

    Stashing: when the backup store shares the host's filesystem, a host file that a commit
    replaces or deletes is not copied into the store — the backup phase only hashes it and
    records the event, and here the file itself is moved into the store as that blob
    (`adopt`): a removal renames it there; a replacement swaps it with the new entry
    (renameat2 RENAME_EXCHANGE, atomic at the host path), then renames it there from where the
    new entry was. No data is copied and no inode freed. Before that, the file must still be
    exactly what was hashed (same inode, same ctime, one link); otherwise it is backed up by
    copy like any other and its pending event is dropped (`forget`). Redo tells where a swap
    stands from inode numbers: the old inode at the new entry's place means "swapped, not yet
    stored".
    """

    def __init__(
        self, commit_id: str, rebackup: Rebackup, resume: bool,
        stash: dict[int, str] | None = None, adopt: Adopt | None = None,
        forget: Forget | None = None,
    ) -> None:
        self.commit_id = commit_id
        self.rebackup = rebackup  # back a host path up now (it changed since the backup phase)
        self.resume = resume
        self.stash = stash or {}  # op index -> sha256 of the host file to stash
        self.adopt = adopt
        self.forget = forget
        self.as_root = os.geteuid() == 0
        self.problems: dict[int, str] = {}

    def run(self, op: Op) -> None:
        try:
            digest = self.stash.get(op.index)
            if digest is not None and self._stashed(op, digest):
                return
            if op.action == REMOVE:
                self._remove(op)
            elif op.action == LINK:
                self._link(op)
            elif op.kind == "dir":
                self._put_dir(op)
            else:
                self._put(op)
        except OSError as e:
            self.problems[op.index] = f"{os.fsdecode(op.host)}: {e.strerror or e}"

    # -- stashing ---------------------------------------------------------------------------

    def _stashed(self, op: Op, digest: str) -> bool:
        """Carry out `op` by moving the old host file into the store; False when that is not
        (or no longer) possible and the op must run the ordinary way."""
        assert op.old is not None and self.adopt is not None and self.forget is not None
        old_ino, old_ctime, _ = op.old
        host = lstat_or_none(op.host)
        if op.action == REMOVE:
            if host is None:
                return True  # stored already
            if _is_the_hashed_file(host, old_ino, old_ctime):
                try:
                    self.adopt(op.host, digest)
                except OSError:
                    self.forget(op.host, digest)  # still on the host: nothing to keep
                    raise
                return True
            if self.resume and host.st_ino != old_ino:
                return True  # removed earlier; what is there now is not ours to touch
            self.forget(op.host, digest)
            return False
        carrier = op.source if op.move else self._temp(op)
        assert carrier is not None
        held = lstat_or_none(carrier)
        if held is not None and held.st_ino == old_ino:
            self.adopt(carrier, digest)  # swapped before a crash, not yet stored
            return True
        if op.move and held is None:
            return True  # done
        if host is None or not _is_the_hashed_file(host, old_ino, old_ctime):
            if self.resume and host is not None and host.st_ino != old_ino and held is None:
                return True  # done
            self.forget(op.host, digest)
            return False
        if op.move:
            _strip_overlay_xattrs(carrier)
            if not op.keep_privileges:
                drop_privileges(carrier)
        else:
            _remove_quietly(carrier)
            self._materialise(op, carrier)
        fdpath.renameat2(carrier, op.host, libc.RENAME_EXCHANGE)
        try:
            self.adopt(carrier, digest)
        except OSError:
            # Swap back: the host keeps its file, the env its entry; the op failed as a whole.
            fdpath.renameat2(carrier, op.host, libc.RENAME_EXCHANGE)
            self.forget(op.host, digest)
            raise
        return True

    def finish_dir(self, op: Op) -> None:
        """Dir times last: every entry written into a dir changes its mtime."""
        st = lstat_or_none(op.host)
        if st is not None and stat.S_ISDIR(st.st_mode):
            try:
                fdpath.lutime(op.host, (op.atime_ns, op.mtime_ns))
            except OSError as e:
                self.problems.setdefault(op.index, f"{os.fsdecode(op.host)}: {e.strerror}")

    # -- removal ----------------------------------------------------------------------------

    def _remove(self, op: Op) -> None:
        st = lstat_or_none(op.host)
        if st is None:
            return
        if not self._still_planned(op, st, redo=self.resume):
            return
        if stat.S_ISDIR(st.st_mode):
            try:
                fdpath.rmdir(op.host)
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise OSError(
                        e.errno, "the host added entries to it during the commit; it was kept"
                    ) from e
                raise
        else:
            fdpath.unlink(op.host)

    def _still_planned(self, op: Op, st: os.stat_result, redo: bool) -> bool:
        """May `op` touch the host entry `st`? Backs it up again if it changed since the backup.
        On a redo, an entry other than the planned one means the op ran already: False."""
        if op.old is None:
            # An entry appeared where the plan expected none.
            if redo:
                return False
            if not stat.S_ISDIR(st.st_mode):
                self.rebackup(op.host)
            return True
        ino, ctime_ns, _ = op.old
        if st.st_ino != ino:
            if redo:
                return False
            self.rebackup(op.host)  # replaced by someone during the commit: keep theirs too
            return True
        if st.st_ctime_ns != ctime_ns and not stat.S_ISDIR(st.st_mode) and op.backup:
            self.rebackup(op.host)  # changed in place since the backup was taken
        return True

    # -- puts -------------------------------------------------------------------------------

    def _put(self, op: Op) -> None:
        assert op.source is not None
        if op.move and lstat_or_none(op.source) is None:
            return  # moved by an earlier run
        st = lstat_or_none(op.host)
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, "a directory is in the way on the host")
            # A move whose source is still in the layer has certainly not run, so what is on
            # the host is not ours: no redo ambiguity.
            if not self._still_planned(op, st, redo=self.resume and not op.move):
                return
        if op.move:
            _strip_overlay_xattrs(op.source)
            if not op.keep_privileges:
                drop_privileges(op.source)
            try:
                fdpath.rename(op.source, op.host)
                return
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
        temp = self._temp(op)
        _remove_quietly(temp)
        try:
            self._materialise(op, temp)
            fdpath.rename(temp, op.host)
        except BaseException:
            _remove_quietly(temp)
            raise

    def _materialise(self, op: Op, temp: bytes) -> None:
        assert op.source is not None
        if op.kind == "file":
            copy_file(op.source, temp, op.mode)
        elif op.kind == "symlink":
            fdpath.symlink(fdpath.readlink(op.source), temp)
        else:
            mode = op.mode if op.keep_privileges else unprivileged_mode(op.mode)
            fdpath.mknod(temp, mode, op.rdev)
        self._set_metadata(op, temp)

    def _set_metadata(self, op: Op, path: bytes) -> None:
        assert op.source is not None
        set_metadata(op.source, path, op.mode, op.uid, op.gid, op.atime_ns, op.mtime_ns,
                     keep_privileges=op.keep_privileges)

    def _put_dir(self, op: Op) -> None:
        st = lstat_or_none(op.host)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, "a file is in the way on the host")
        if st is None:
            fdpath.mkdir(op.host, 0o700)
            if op.source is not None and fdpath.is_dir(op.source):
                copy_xattrs(op.source, op.host)
        if self.as_root and (st is None or (st.st_uid, st.st_gid) != (op.uid, op.gid)):
            fdpath.lchown(op.host, op.uid, op.gid)
        if st is None or stat.S_IMODE(st.st_mode) != stat.S_IMODE(op.mode):
            fdpath.chmod(op.host, stat.S_IMODE(op.mode))
        if st is not None and op.source is not None and fdpath.is_dir(op.source):
            sync_data_xattrs(op.source, op.host)

    def _link(self, op: Op) -> None:
        assert op.link_to is not None
        st = lstat_or_none(op.host)
        anchor = lstat_or_none(op.link_to)
        if st is not None:
            if anchor is not None and (st.st_ino, st.st_dev) == (anchor.st_ino, anchor.st_dev):
                return  # linked already
            if stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, "a directory is in the way on the host")
            if not self._still_planned(op, st, redo=self.resume):
                return
        temp = self._temp(op)
        _remove_quietly(temp)
        try:
            linked = True
            try:
                fdpath.link(op.link_to, temp)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOENT, errno.EPERM, errno.EMLINK):
                    raise
                linked = False  # cannot link there: a copy of the same data
            if linked and not op.keep_privileges and _privileged(temp):
                # The anchor is privileged (the host's own setuid program, or an anchor whose
                # put failed): another name of it would carry that to this path.
                fdpath.unlink(temp)
                linked = False
            if not linked:
                self._materialise(op, temp)
            fdpath.rename(temp, op.host)
        except BaseException:
            _remove_quietly(temp)
            raise

    def _temp(self, op: Op) -> bytes:
        parent = os.path.dirname(op.host)
        return parent + b"/.agentctl-%s-%d.tmp" % (self.commit_id[:12].encode(), op.index)


def copy_file(source: bytes, target: bytes, mode: int) -> None:
    """Copy the data of `source` to a new file `target` (kernel-side copy), flushed to disk."""
    src = fdpath.open_fd(source, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        dst = fdpath.open_fd(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            size = os.fstat(src).st_size
            copied = 0
            while copied < size:
                try:
                    count = os.copy_file_range(src, dst, min(_COPY_CHUNK, size - copied))
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    count = os.sendfile(dst, src, None, min(_COPY_CHUNK, size - copied))
                if count == 0:
                    break
                copied += count
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def set_metadata(
    source: bytes, path: bytes, mode: int, uid: int, gid: int, atime_ns: int, mtime_ns: int,
    *, keep_privileges: bool = False,
) -> None:
    """Give the new entry `path` the xattrs of `source` and the given owner (when root),
    permissions and times — as `cp -a` would; without setuid, setgid and file capabilities
    unless `keep_privileges`."""
    copy_xattrs(source, path)
    if os.geteuid() == 0:
        fdpath.lchown(path, uid, gid)
    if not keep_privileges:
        mode = unprivileged_mode(mode)
    if not stat.S_ISLNK(mode):
        fdpath.chmod(path, stat.S_IMODE(mode))
    if keep_privileges and stat.S_ISREG(mode):
        # After the chown: the kernel drops file capabilities on every chown.
        try:
            value = fdpath.getxattr(source, CAPABILITY_XATTR)
        except OSError:
            pass
        else:
            with fdpath.xattr_path(path) as name:
                os.setxattr(name, CAPABILITY_XATTR, value, follow_symlinks=False)
    fdpath.lutime(path, (atime_ns, mtime_ns))


def drop_privileges(path: bytes) -> None:
    """Clear setuid, setgid and file capabilities of the regular file `path`, in place. Raises
    if they cannot be cleared: the caller must then not carry the file to the host."""
    st = fdpath.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return
    if not st.st_mode & PRIVILEGE_BITS and not has_capabilities(path):
        return
    # Through a descriptor of exactly the file checked (no symlink swapped in meanwhile).
    fd = fdpath.open_fd(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EAGAIN, "changed while its privileges were cleared")
        try:
            os.removexattr(fd, CAPABILITY_XATTR)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
        os.fchmod(fd, stat.S_IMODE(unprivileged_mode(st.st_mode)))
    finally:
        os.close(fd)


def _privileged(path: bytes) -> bool:
    st = fdpath.lstat(path)
    return bool(st.st_mode & PRIVILEGE_BITS) or (
        stat.S_ISREG(st.st_mode) and has_capabilities(path)
    )


def sync_data_xattrs(source: bytes, target: bytes) -> None:
    """Make `target`'s data xattrs (changeset.data_xattrs) exactly `source`'s, in place."""
    wanted, present = data_xattrs(source), data_xattrs(target)
    with fdpath.xattr_path(target) as name:
        for key in present.keys() - wanted.keys():
            os.removexattr(name, key, follow_symlinks=False)
        for key, value in wanted.items():
            if present.get(key) != value:
                os.setxattr(name, key, value, follow_symlinks=False)


def copy_xattrs(source: bytes, target: bytes) -> None:
    """Copy extended attributes, except overlayfs's own (format metadata, never user data) and
    file capabilities (`set_metadata` sets those, when kept, after the owner)."""
    values: dict[str, bytes] = {}
    try:
        with fdpath.xattr_path(source) as source_name:
            for name in os.listxattr(source_name, follow_symlinks=False):
                if is_private_xattr(name) or name == CAPABILITY_XATTR:
                    continue
                with contextlib.suppress(OSError):
                    values[name] = os.getxattr(source_name, name, follow_symlinks=False)
    except OSError:
        return
    if not values:
        return
    with fdpath.xattr_path(target) as target_name:
        for name, value in values.items():
            with contextlib.suppress(OSError):  # e.g. security.* without the privilege
                os.setxattr(target_name, name, value, follow_symlinks=False)


def _strip_overlay_xattrs(path: bytes) -> None:
    try:
        with fdpath.xattr_path(path) as short:
            for name in os.listxattr(short, follow_symlinks=False):
                if is_private_xattr(name):
                    with contextlib.suppress(OSError):
                        os.removexattr(short, name, follow_symlinks=False)
    except OSError:
        return


def _remove_quietly(path: bytes) -> None:
    with contextlib.suppress(OSError):
        fdpath.unlink(path)
