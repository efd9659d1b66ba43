"""Paths of any length: descriptor-relative access, for the changeset, diff, commit and the
backup store (capture, adopt).

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from isolated_agent.system import libc

PATH_LIMIT = 4095  # bytes of a path the kernel takes (PATH_MAX counts the terminating NUL)
DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
DIR_READ = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_AT_FDCWD = -100
T = TypeVar("T")


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
    form: the xattr calls, statx through libc): the kernel's magic link of the fd."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


@contextmanager
def xattr_path(path: bytes) -> Iterator[bytes]:
    """A path the xattr calls accept for `path`, of any length; use with
    follow_symlinks=False."""
    with at(path) as (dir_fd, name):
        yield name if dir_fd is None else child_path(dir_fd, name)


# -- the calls, for paths of any length ----------------------------------------------------------
# Each takes the short path straight to the kernel (no context manager on that path: a commit
# makes several of these calls per file) and goes through `at` only past PATH_LIMIT.


def _call(function: Callable[..., T], path: bytes, *args: Any, **kwargs: Any) -> T:
    """`function(path, ...)`, or `function(name, ..., dir_fd=...)` for a long path."""
    if len(path) <= PATH_LIMIT:
        return function(path, *args, **kwargs)
    with at(path) as (dir_fd, name):
        return function(name, *args, dir_fd=dir_fd, **kwargs)


def _call2(function: Callable[..., T], source: bytes, target: bytes, **kwargs: Any) -> T:
    """`function(source, target, ...)` for two paths, either of which may be long."""
    if len(source) <= PATH_LIMIT and len(target) <= PATH_LIMIT:
        return function(source, target, **kwargs)
    with at(source) as (source_fd, source_name), at(target) as (target_fd, target_name):
        return function(source_name, target_name, src_dir_fd=source_fd,
                        dst_dir_fd=target_fd, **kwargs)


def lstat(path: bytes) -> os.stat_result:
    return _call(os.stat, path, follow_symlinks=False)


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
        return stat.S_ISDIR(_call(os.stat, path).st_mode)
    except (OSError, ValueError):
        return False


def open_fd(path: bytes, flags: int, mode: int = 0o777) -> int:
    return _call(os.open, path, flags | os.O_CLOEXEC, mode)


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


@contextmanager
def dir_at(dir_fd: int, name: bytes) -> Iterator[int | None]:
    """`open_dir_at`, closed when the `with` block ends."""
    fd = open_dir_at(dir_fd, name)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


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
    with at(path) as (dir_fd, name):
        return os.readlink(name, dir_fd=dir_fd)


def unlink(path: bytes) -> None:
    _call(os.unlink, path)


def rmdir(path: bytes) -> None:
    _call(os.rmdir, path)


def mkdir(path: bytes, mode: int) -> None:
    _call(os.mkdir, path, mode)


def symlink(target: bytes, path: bytes) -> None:
    if len(path) <= PATH_LIMIT:
        return os.symlink(target, path)
    with at(path) as (dir_fd, name):
        os.symlink(target, name, dir_fd=dir_fd)


def mknod(path: bytes, mode: int, rdev: int) -> None:
    _call(os.mknod, path, mode, rdev)


def chmod(path: bytes, mode: int) -> None:
    """chmod, following a final symlink (as os.chmod; Linux has no lchmod)."""
    _call(os.chmod, path, mode)


def lchown(path: bytes, uid: int, gid: int) -> None:
    _call(os.chown, path, uid, gid, follow_symlinks=False)


def lutime(path: bytes, ns: tuple[int, int]) -> None:
    _call(os.utime, path, ns=ns, follow_symlinks=False)


def rename(source: bytes, target: bytes) -> None:
    _call2(os.rename, source, target)


def link(source: bytes, target: bytes) -> None:
    """A hard link `target` to `source` (a final symlink is linked, not followed)."""
    _call2(os.link, source, target, follow_symlinks=False)


def renameat2(source: bytes, target: bytes, flags: int) -> None:
    with at(source) as (source_fd, source_name), at(target) as (target_fd, target_name):
        libc.renameat2(_AT_FDCWD if source_fd is None else source_fd, source_name,
                       _AT_FDCWD if target_fd is None else target_fd, target_name, flags)


def birth_time_ns(path: bytes) -> int | None:
    return _call(libc.birth_time_ns, path)


def getxattr(path: bytes, attribute: str) -> bytes:
    """The xattr `attribute` of `path` itself (a final symlink is not followed)."""
    if len(path) <= PATH_LIMIT:
        return os.getxattr(path, attribute, follow_symlinks=False)
    with xattr_path(path) as short:
        return os.getxattr(short, attribute, follow_symlinks=False)
