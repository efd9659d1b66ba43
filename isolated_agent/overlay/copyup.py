"""Copy-up: put one lower object into upper, complete or not at all (DESIGN §5.2).

- The caller decides *when* (write intent only); this module decides *how*.
- The copy is built under a temporary name in the work dir, which sits on upper's filesystem:
  data, owner (where permitted), xattrs (except the overlay's own), mode, and only then is it
  renamed into place with RENAME_NOREPLACE. A failure at any step (ENOSPC, EIO, an injected
  fault) removes the temporary and leaves upper exactly as it was. The lower is only ever read.
- Data streams, never through memory as a whole: FICLONE where the filesystem shares extents
  (btrfs, xfs), else copy_file_range over each data extent (holes stay holes, found with
  SEEK_DATA/SEEK_HOLE), else sendfile, else pread/pwrite in 1 MiB chunks.
- No fsync: a copy-up is as durable as any other write to the env; the temp-then-rename order
  is what guarantees nobody ever sees a half-copied file.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
from collections.abc import Callable

from isolated_agent.overlay.format import fd_path, is_private_xattr
from isolated_agent.system import libc

CHUNK = 1 << 20

# Called at named points with the entry's name; raises to simulate a failure (tests only).
FaultHook = Callable[[str, bytes], None]

# Errors meaning "this filesystem cannot do that fast path": fall back to the next one.
_UNSUPPORTED = {
    errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EBADF
}

_counter = itertools.count()


def temp_name() -> bytes:
    """A name in the work dir no other copy-up (of this process or an earlier one) uses."""
    return b"#agentfs.%d.%d" % (os.getpid(), next(_counter))


def open_for_reading(fd: int) -> int:
    """Reopen the object behind an O_PATH fd for reading, without touching its atime."""
    path = fd_path(fd)
    try:
        return os.open(path, os.O_RDONLY | os.O_NOATIME | os.O_CLOEXEC)
    except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy `size` bytes from `src` to `dst` (both real fds), keeping holes."""
    if size == 0:
        return
    try:
        libc.ficlone(dst, src)
        return
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            if e.errno not in _UNSUPPORTED:
                raise
            data, hole = offset, size  # no sparse-file support: copy it all
        else:
            hole = min(os.lseek(src, data, os.SEEK_HOLE), size)
        if data >= size:
            break
        _copy_range(src, dst, data, hole - data)
        offset = hole
    os.ftruncate(dst, size)  # a trailing hole, and the exact size


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    end = offset + count
    position = offset
    try:
        while position < end:
            done = os.copy_file_range(src, dst, end - position, position, position)
            if done == 0:
                return  # the source got shorter: copy what there is
            position += done
        return
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
    while position < end:  # portable fallback, bounded memory
        chunk = os.pread(src, min(CHUNK, end - position), position)
        if not chunk:
            return
        written = 0
        while written < len(chunk):
            written += os.pwrite(dst, chunk[written:], position + written)
        position += len(chunk)


def copy_xattrs(src_fd: int, dst_fd: int) -> None:
    """Copy every xattr but the overlay's own (both fds may be O_PATH)."""
    copy_xattrs_between(fd_path(src_fd), fd_path(dst_fd))


def copy_xattrs_between(src: str | int, dst: str | int) -> None:
    """Copy every xattr but the overlay's own, between two paths (a final symlink followed)
    or two open, not O_PATH, descriptors."""
    try:
        names = os.listxattr(src)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            return
        raise
    for name in names:
        if is_private_xattr(name):
            continue
        try:
            value = os.getxattr(src, name)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
                continue  # vanished, or a namespace we may list but not read
            raise
        os.setxattr(dst, name, value)


def set_owner(dir_fd: int, name: bytes, uid: int, gid: int) -> None:
    """chown where permitted: root always can; an unprivileged daemon keeps its own ids."""
    if uid == os.geteuid() and gid == os.getegid():
        return
    try:
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    except PermissionError:
        if os.geteuid() == 0:
            raise


def copy_up_object(
    src_fd: int,
    st: os.stat_result,
    work_fd: int,
    dest_dir_fd: int,
    dest_name: bytes,
    with_data: bool = True,
    fault: FaultHook | None = None,
) -> int:
    """Copy the lower object behind `src_fd` (O_PATH) to `dest_name` in the upper directory
    `dest_dir_fd`, which must not hold that name. Returns an O_PATH fd of the new object.
    `with_data=False` copies a regular file empty (it is about to be truncated anyway)."""
    tmp = temp_name()
    kind = stat.S_IFMT(st.st_mode)
    created = False
    try:
        if kind == stat.S_IFREG:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=work_fd)
            created = True
            try:
                if with_data and st.st_size:
                    src = open_for_reading(src_fd)
                    try:
                        copy_data(src, out, st.st_size)
                    finally:
                        os.close(src)
            finally:
                os.close(out)
        elif kind == stat.S_IFDIR:
            os.mkdir(tmp, 0o700, dir_fd=work_fd)
            created = True
        elif kind == stat.S_IFLNK:
            os.symlink(os.readlink(b"", dir_fd=src_fd), tmp, dir_fd=work_fd)
            created = True
        else:  # fifo, socket, device
            os.mknod(tmp, kind | 0o600, st.st_rdev, dir_fd=work_fd)
            created = True
        if fault is not None:
            fault("copy_up", dest_name)
        set_owner(work_fd, tmp, st.st_uid, st.st_gid)
        if kind != stat.S_IFLNK:
            tmp_fd = os.open(tmp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=work_fd)
            try:
                copy_xattrs(src_fd, tmp_fd)
                os.chmod(fd_path(tmp_fd), stat.S_IMODE(st.st_mode))
            finally:
                os.close(tmp_fd)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=work_fd, follow_symlinks=False)
        libc.renameat2(work_fd, tmp, dest_dir_fd, dest_name, libc.RENAME_NOREPLACE)
        created = False
    finally:
        if created:
            remove_temp(work_fd, tmp)
    return os.open(dest_name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dest_dir_fd)


def remove_temp(work_fd: int, name: bytes) -> None:
    """Best-effort removal of a temporary in the work dir (a file or an empty dir)."""
    try:
        os.unlink(name, dir_fd=work_fd)
    except IsADirectoryError:
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=work_fd)
    except OSError:
        pass
