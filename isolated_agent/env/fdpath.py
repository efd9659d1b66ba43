"""Paths of any length for the changeset, diff and commit: descriptor-relative access.

A job can build a tree deeper than PATH_MAX (4096 bytes with its NUL): `mkdir d; cd d` in a
loop. The kernel refuses such a path in any system call (ENAMETOOLONG), so the walkers of the
changeset and of prune hold a directory fd per level and use the *at calls (`os.open(name,
dir_fd=...)`, `os.stat(name, dir_fd=..., follow_symlinks=False)`, `os.listdir(fd)`), and code
that acts on one path at a time (applying a commit's operations, reading a file for a diff)
goes through `at(path)`, which turns a path into (directory fd, name).

Contract of `at(path)`: a path the kernel accepts as it is (at most PATH_LIMIT bytes) is passed
on unchanged — `(None, path)`, so `dir_fd=None`: exactly the path-based call, at no cost. A
longer one is split: its longest leading part the kernel accepts is opened as given (symlinks
in it resolved, as the kernel would for a short path), then every further directory component
is opened relative to the previous one with O_NOFOLLOW|O_DIRECTORY (a symlink there fails with
ENOTDIR, never leads elsewhere), and the last name is left for the caller's *at call. The fds
are O_PATH and closed when the `with` block ends.

The xattr calls have no *at form: `xattr_path` names such an entry through the kernel's magic
link of its parent fd (`/proc/self/fd/N/name`), which is short and resolves without looking
the long path up again.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from isolated_agent import libc
from isolated_agent.overlay.format import fd_path

PATH_LIMIT = 4095  # bytes of a path the kernel takes (PATH_MAX counts the terminating NUL)
DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_AT_FDCWD = -100


def is_long(path: bytes) -> bool:
    return len(path) > PATH_LIMIT


@contextmanager
def at(path: bytes) -> Iterator[tuple[int | None, bytes]]:
    """(dir_fd, name) that name `path` for an *at call (see the module)."""
    if not is_long(path):
        yield None, path
        return
    parent, _, name = path.rpartition(b"/")
    fd = open_dir_path(parent)
    try:
        yield fd, name
    finally:
        os.close(fd)


def open_dir_path(path: bytes) -> int:
    """An O_PATH fd of the directory `path`, of any length (see the module)."""
    if not is_long(path):
        return os.open(path, DIR_PATH)
    cut = path.rfind(b"/", 0, PATH_LIMIT + 1)
    if cut < 0:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), os.fsdecode(path))
    fd = os.open(path[:cut] or b"/", DIR_PATH)
    try:
        for component in path[cut + 1 :].split(b"/"):
            if not component:
                continue
            child = os.open(component, DIR_PATH | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def child_path(dir_fd: int, name: bytes) -> bytes:
    """A short path naming `name` in the directory behind `dir_fd` (for calls with no *at
    form: the xattr calls, statx through libc)."""
    return os.fsencode(fd_path(dir_fd)) + b"/" + name


@contextmanager
def xattr_path(path: bytes) -> Iterator[bytes]:
    """A path the xattr calls accept for `path`, of any length; use with
    follow_symlinks=False."""
    with at(path) as (dir_fd, name):
        yield name if dir_fd is None else child_path(dir_fd, name)


# -- the calls, for paths of any length ----------------------------------------------------------
# Each takes the short path straight to the kernel (no context manager on that path: a commit
# makes several of these calls per file) and goes through `at` only past PATH_LIMIT.


def lstat(path: bytes) -> os.stat_result:
    if len(path) <= PATH_LIMIT:
        return os.stat(path, follow_symlinks=False)
    with at(path) as (d, name):
        return os.stat(name, dir_fd=d, follow_symlinks=False)


def lstat_or_none(path: bytes) -> os.stat_result | None:
    try:
        return lstat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def is_dir(path: bytes) -> bool:
    """Is `path` a directory (following a final symlink, as os.path.isdir)?"""
    try:
        if len(path) <= PATH_LIMIT:
            st = os.stat(path)
        else:
            with at(path) as (d, name):
                st = os.stat(name, dir_fd=d)
    except (OSError, ValueError):
        return False
    return stat.S_ISDIR(st.st_mode)


def open_fd(path: bytes, flags: int, mode: int = 0o777) -> int:
    if len(path) <= PATH_LIMIT:
        return os.open(path, flags | os.O_CLOEXEC, mode)
    with at(path) as (d, name):
        return os.open(name, flags | os.O_CLOEXEC, mode, dir_fd=d)


def listdir(path: bytes) -> list[bytes]:
    fd = open_fd(path, DIR_READ)
    try:
        return [os.fsencode(name) for name in os.listdir(fd)]
    finally:
        os.close(fd)


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    """lstat of `name` in `dir_fd`; None when there is nothing (or no directory) there."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def open_dir_at(dir_fd: int, name: bytes) -> int | None:
    """An O_PATH fd of the directory `name` in `dir_fd`, never through a symlink; None when
    there is none (a symlink there is none)."""
    try:
        return os.open(name, DIR_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def listdir_at(dir_fd: int) -> list[bytes]:
    """The names in the directory behind `dir_fd` (an O_PATH fd will do)."""
    fd = os.open(".", DIR_READ, dir_fd=dir_fd)
    try:
        return [os.fsencode(name) for name in os.listdir(fd)]
    finally:
        os.close(fd)


def readlink(path: bytes) -> bytes:
    if len(path) <= PATH_LIMIT:
        return os.readlink(path)
    with at(path) as (d, name):
        return os.readlink(name, dir_fd=d)


def unlink(path: bytes) -> None:
    if len(path) <= PATH_LIMIT:
        return os.unlink(path)
    with at(path) as (d, name):
        os.unlink(name, dir_fd=d)


def rmdir(path: bytes) -> None:
    if len(path) <= PATH_LIMIT:
        return os.rmdir(path)
    with at(path) as (d, name):
        os.rmdir(name, dir_fd=d)


def mkdir(path: bytes, mode: int) -> None:
    if len(path) <= PATH_LIMIT:
        return os.mkdir(path, mode)
    with at(path) as (d, name):
        os.mkdir(name, mode, dir_fd=d)


def symlink(target: bytes, path: bytes) -> None:
    if len(path) <= PATH_LIMIT:
        return os.symlink(target, path)
    with at(path) as (d, name):
        os.symlink(target, name, dir_fd=d)


def mknod(path: bytes, mode: int, rdev: int) -> None:
    if len(path) <= PATH_LIMIT:
        return os.mknod(path, mode, rdev)
    with at(path) as (d, name):
        os.mknod(name, mode, rdev, dir_fd=d)


def chmod(path: bytes, mode: int) -> None:
    """chmod, following a final symlink (as os.chmod; Linux has no lchmod)."""
    if len(path) <= PATH_LIMIT:
        return os.chmod(path, mode)
    with at(path) as (d, name):
        os.chmod(name, mode, dir_fd=d)


def lchown(path: bytes, uid: int, gid: int) -> None:
    if len(path) <= PATH_LIMIT:
        return os.chown(path, uid, gid, follow_symlinks=False)
    with at(path) as (d, name):
        os.chown(name, uid, gid, dir_fd=d, follow_symlinks=False)


def lutime(path: bytes, ns: tuple[int, int]) -> None:
    if len(path) <= PATH_LIMIT:
        return os.utime(path, ns=ns, follow_symlinks=False)
    with at(path) as (d, name):
        os.utime(name, ns=ns, dir_fd=d, follow_symlinks=False)


def rename(source: bytes, target: bytes) -> None:
    if len(source) <= PATH_LIMIT and len(target) <= PATH_LIMIT:
        return os.rename(source, target)
    with at(source) as (sd, sname), at(target) as (td, tname):
        os.rename(sname, tname, src_dir_fd=sd, dst_dir_fd=td)


def renameat2(source: bytes, target: bytes, flags: int) -> None:
    with at(source) as (sd, sname), at(target) as (td, tname):
        libc.renameat2(_AT_FDCWD if sd is None else sd, sname,
                       _AT_FDCWD if td is None else td, tname, flags)


def link(source: bytes, target: bytes) -> None:
    """A hard link `target` to `source` (a final symlink is linked, not followed)."""
    if len(source) <= PATH_LIMIT and len(target) <= PATH_LIMIT:
        return os.link(source, target, follow_symlinks=False)
    with at(source) as (sd, sname), at(target) as (td, tname):
        os.link(sname, tname, src_dir_fd=sd, dst_dir_fd=td, follow_symlinks=False)


def birth_time_ns(path: bytes) -> int | None:
    if len(path) <= PATH_LIMIT:
        return libc.birth_time_ns(path)
    with at(path) as (d, name):
        return libc.birth_time_ns(name, dir_fd=d)


def getxattr(path: bytes, attribute: str) -> bytes:
    """The xattr `attribute` of `path` itself (a final symlink is not followed)."""
    if len(path) <= PATH_LIMIT:
        return os.getxattr(path, attribute, follow_symlinks=False)
    with xattr_path(path) as short:
        return os.getxattr(short, attribute, follow_symlinks=False)
