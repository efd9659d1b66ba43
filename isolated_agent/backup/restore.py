"""Bringing backed-up entries back: by event id, or by path (a whole subtree) as of a time.

Rules:
- every blob is verified before anything is written (a corrupt one is refused and nothing is
  restored), and verified again as it is copied;
- never overwrite: when the target exists (and is not already identical) the entry is written
  beside it as `NAME.restored-<id>`, unless `force`;
- each file arrives atomically: temp file in the target directory, fsync, rename, fsync dir;
- mode, mtime and (as root) owner come back as they were;
- never through a symlink: every target is reached one component at a time from a directory
  fd (`/`, or the `--to` DIR), O_NOFOLLOW|O_DIRECTORY, and written with *at calls relative to
  its parent's fd — so no symlink a commit (or anyone) put on the way is followed, and paths
  longer than PATH_MAX work. A symlink (or any non-directory) in an entry's own place is a
  taken name like any other (the entry goes beside it, a directory with its subtree); one on
  the way to an entry blocks that entry, which is reported and not restored.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import hashlib
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

from isolated_agent.backup import Backups
from isolated_agent.backup.catalog import BackupEvent
from isolated_agent.errors import BackupError, BackupNotFound, BlobCorrupt, UsageError

_CHUNK = 1 << 20
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)")
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: float | None = None) -> float:
    """A point in time: seconds since the epoch, an ISO 8601 date/time (local time unless it
    says otherwise), or an age such as 30m, 2h, 3d, 1w (that long ago)."""
    text = text.strip()
    now = time.time() if now is None else now
    relative = _RELATIVE.fullmatch(text)
    if relative:
        return now - float(relative.group(1)) * _UNITS[relative.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{text!r} is not a time: use e.g. 2026-03-01, '2026-03-01 14:30', 2h (ago), "
            "or seconds since the epoch"
        ) from None
    if moment.tzinfo is None:
        return time.mktime(moment.timetuple()) + moment.microsecond / 1e6
    return calendar.timegm(moment.utctimetuple()) + moment.microsecond / 1e6


def find_event(backups: Backups, event_id: int) -> BackupEvent:
    event = backups.catalog.get(event_id)
    if event is None:
        raise BackupNotFound(
            f"no backup with id {event_id}; `agentctl backup list` shows the ones there are"
        )
    return event


def events_for_path(backups: Backups, path: bytes, at: float | None) -> list[BackupEvent]:
    """The newest event, no later than `at`, of `path` and of each path under it."""
    events = backups.catalog.latest(path, at)
    if not events:
        when = "" if at is None else " as of that time"
        raise BackupNotFound(
            f"no backup of {os.fsdecode(path)}{when}; `agentctl backup list --path` shows them"
        )
    return events


@dataclass(frozen=True)
class Restored:
    event: BackupEvent
    target: bytes  # where it was written (or found identical); "blocked": the component in the way
    # "restored"; "beside" (written as NAME.restored-<id>); "identical" (already there);
    # "kept" (an existing directory, left as it is); "skipped" (a device or socket);
    # "not backed up" (a guard event skipped by policy, or whose staged copy was lost);
    # "blocked" (a directory on the way is now a symlink or a non-directory: nothing written)
    status: str
    detail: str = ""  # "blocked": what is in the way, e.g. "a symlink to /elsewhere"


class _Blocked(Exception):
    """A component on the way to a target is not a directory (a symlink, a file): restore does
    not write through it."""

    def __init__(self, where: bytes, what: str) -> None:
        super().__init__(os.fsdecode(where))
        self.where = where
        self.what = what


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
Parts = tuple[bytes, ...]


class _Walker:
    """Directories of the targets, opened one component at a time from a start directory (`/`,
    or the `--to` DIR) with O_NOFOLLOW|O_DIRECTORY relative to the previous component's fd, so
    a symlink anywhere on the way is met, never followed, and no path handed to the kernel is
    longer than one name (targets may be longer than PATH_MAX). Missing directories are created
    on the way (0755, as `mkdir -p`). The last directory stays open: a subtree restored in path
    order descends from it instead of walking from the start again."""

    def __init__(self, start: bytes) -> None:
        self.start = start
        # The start itself is opened as named: `/`, or a DIR the user chose with --to.
        self._start_fd = os.open(start, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cached: tuple[Parts, int] | None = None

    def shown(self, parts: Parts) -> bytes:
        return self.start.rstrip(b"/") + b"/" + b"/".join(parts)

    def directory(self, parts: Parts) -> int:
        """An fd of the directory `parts` (relative to the start), owned by the walker."""
        fd, done, owned = self._start_fd, 0, False
        if self._cached is not None and parts[: len(self._cached[0])] == self._cached[0]:
            fd, done = self._cached[1], len(self._cached[0])
        for depth in range(done, len(parts)):
            child = self._open_child(fd, parts, depth)
            if owned:
                os.close(fd)
            fd, owned = child, True
        if owned:
            self._drop_cache()
            self._cached = (parts, fd)
        return fd

    def _open_child(self, fd: int, parts: Parts, depth: int) -> int:
        """The directory parts[depth] in `fd`, made when missing; never through a symlink."""
        try:
            return self._open_dir(fd, parts, depth)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):  # made by someone else meanwhile
                os.mkdir(parts[depth], 0o755, dir_fd=fd)
        return self._open_dir(fd, parts, depth)

    def _open_dir(self, fd: int, parts: Parts, depth: int) -> int:
        try:
            return os.open(parts[depth], _DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            where = self.shown(parts[: depth + 1])
            raise _Blocked(where, _what(fd, parts[depth])) from None

    def _drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def close(self) -> None:
        self._drop_cache()
        os.close(self._start_fd)


def _what(fd: int, name: bytes) -> str:
    """What an entry that is not a directory is, for a message."""
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return "something else"
    if stat.S_ISLNK(st.st_mode):
        with contextlib.suppress(OSError):
            return f"a symlink to {os.fsdecode(os.readlink(name, dir_fd=fd))}"
        return "a symlink"
    if stat.S_ISREG(st.st_mode):
        return "a file"
    return "a special file"


def restore(
    backups: Backups, events: list[BackupEvent], base: bytes, to: str | None, force: bool
) -> list[Restored]:
    """Restore `events` (parents before children). `base` is the path the user asked for; with
    `to`, it lands as `to/<basename of base>` and the rest keep their place under it.

    No symlink on the way to a target is followed (see `_Walker`): an entry whose own place is
    taken, by a symlink or anything else, is written beside it as for any taken name, and a
    directory written beside takes its subtree with it; an entry below a directory that is now
    a symlink (or a file) is not restored at all — status "blocked" — since there is no
    directory of its own to put it in, and writing through the link would land elsewhere."""
    for event in events:
        if event.sha256 is not None:
            verify_blob(backups, event)
    start, relative = _start(base, to)
    walker = _Walker(start)
    try:
        return _restore_all(backups, walker, events, base, relative, force)
    finally:
        walker.close()


def _restore_all(
    backups: Backups, walker: _Walker, events: list[BackupEvent], base: bytes,
    relative: Callable[[bytes], Parts], force: bool,
) -> list[Restored]:
    results: list[Restored] = []
    unsaved = _not_backed_up(backups, events)
    made_dirs: list[tuple[Parts, BackupEvent]] = []
    moved: dict[Parts, Parts] = {}  # directories restored beside: their subtree follows them
    for event in events:
        parts = _moved(relative(event.path), moved)
        if event.id in unsaved:
            results.append(Restored(event, walker.shown(parts), "not backed up"))
            continue
        try:
            if event.kind == "dir":
                result, landed = _restore_dir(walker, event, parts, force, made_dirs)
                if landed != parts:
                    moved[parts] = landed
            elif event.kind in ("file", "symlink"):
                result = _restore_leaf(backups, walker, event, parts, force)
            else:
                result = _restore_node(walker, event, parts, force)
        except _Blocked as blocked:
            result = Restored(event, blocked.where, "blocked", blocked.what)
        results.append(result)
    for parts, event in reversed(made_dirs):
        with contextlib.suppress(_Blocked, OSError):  # changed meanwhile: its time is moot
            os.utime(parts[-1], ns=(event.mtime_ns, event.mtime_ns),
                     dir_fd=walker.directory(parts[:-1]), follow_symlinks=False)
    return results


def _moved(parts: Parts, moved: dict[Parts, Parts]) -> Parts:
    """`parts`, under the place its nearest moved ancestor directory was restored to."""
    if moved:
        for depth in range(len(parts) - 1, 0, -1):
            landed = moved.get(parts[:depth])
            if landed is not None:
                return landed + parts[depth:]
    return parts


def _not_backed_up(backups: Backups, events: list[BackupEvent]) -> set[int]:
    """Guard events whose content was never kept (skipped on purpose, or lost before upload)."""
    result: set[int] = set()
    for event in events:
        if event.sha256 is None and event.kind in ("file", "symlink"):
            item = backups.catalog.item(event.id)
            if item is not None and item.state in ("skipped", "failed"):
                result.add(event.id)
    return result


def _content(backups: Backups, event: BackupEvent) -> BinaryIO:
    """The saved content of an event: its blob, or, for a guard event not uploaded yet, its
    staged copy."""
    if event.sha256 is not None:
        return backups.blobs.get(event.sha256)
    return backups.open_staged(event)


def verify_blob(backups: Backups, event: BackupEvent) -> None:
    assert event.sha256 is not None
    with backups.blobs.get(event.sha256) as reader:
        while reader.read(_CHUNK):
            pass


def _start(base: bytes, to: str | None) -> tuple[bytes, Callable[[bytes], Parts]]:
    """The directory the walk starts from, and the components of a saved path below it: the
    path itself under `/`, or, with `to`, `<basename of base>/<the rest>` under `to`."""
    if to is None:
        return b"/", _components
    destination = os.fsencode(os.path.abspath(to))
    if not os.path.isdir(destination):
        raise UsageError(f"--to {to}: no such directory")
    top = base.rstrip(b"/")
    name = os.path.basename(top)
    return destination, lambda path: (name, *_components(path[len(top):]))


def _components(path: bytes) -> Parts:
    return tuple(part for part in path.split(b"/") if part)


def _beside(name: bytes, event: BackupEvent) -> bytes:
    return name + b".restored-%d" % event.id


def _restore_dir(
    walker: _Walker, event: BackupEvent, parts: Parts, force: bool,
    made: list[tuple[Parts, BackupEvent]],
) -> tuple[Restored, Parts]:
    """Restore a directory; returns the result and where its subtree goes."""
    fd = walker.directory(parts[:-1])
    name = parts[-1]
    st = _lstat(fd, name)
    if st is None:
        os.mkdir(name, 0o700, dir_fd=fd)
        _set_owner_mode(fd, name, event)
        made.append((parts, event))
        return Restored(event, walker.shown(parts), "restored"), parts
    if stat.S_ISDIR(st.st_mode):
        if force:
            _set_owner_mode(fd, name, event)
            return Restored(event, walker.shown(parts), "restored"), parts
        return Restored(event, walker.shown(parts), "kept"), parts
    if not force:
        beside = (*parts[:-1], _beside(name, event))
        if _lstat(fd, beside[-1]) is None:
            os.mkdir(beside[-1], 0o700, dir_fd=fd)
            _set_owner_mode(fd, beside[-1], event)
            made.append((beside, event))
        # else one made by an earlier restore; were it a symlink now, the walk refuses it
        return Restored(event, walker.shown(beside), "beside"), beside
    raise BackupError(
        f"cannot restore directory {os.fsdecode(walker.shown(parts))}: a non-directory is in "
        "the way; move it, or restore with --to DIR"
    )


def _restore_leaf(
    backups: Backups, walker: _Walker, event: BackupEvent, parts: Parts, force: bool
) -> Restored:
    fd = walker.directory(parts[:-1])
    name = parts[-1]
    st = _lstat(fd, name)
    if st is not None:
        if _holds(fd, name, st, event):
            return Restored(event, walker.shown(parts), "identical")
        if stat.S_ISDIR(st.st_mode) or not force:
            beside = (*parts[:-1], _beside(name, event))
            beside_st = _lstat(fd, beside[-1])
            if beside_st is not None and _holds(fd, beside[-1], beside_st, event):
                return Restored(event, walker.shown(beside), "identical")
            if beside_st is not None and not force:
                raise BackupError(
                    f"{os.fsdecode(walker.shown(parts))} and {os.fsdecode(walker.shown(beside))}"
                    " both exist; restore with --force to overwrite, or --to DIR"
                )
            _write(backups, event, fd, beside[-1], walker.shown(beside))
            return Restored(event, walker.shown(beside), "beside")
    _write(backups, event, fd, name, walker.shown(parts))
    return Restored(event, walker.shown(parts), "restored")


def _restore_node(walker: _Walker, event: BackupEvent, parts: Parts, force: bool) -> Restored:
    if not stat.S_ISFIFO(event.mode):
        return Restored(event, walker.shown(parts), "skipped")  # devices, sockets: not recreated
    fd = walker.directory(parts[:-1])
    name = parts[-1]
    if _lstat(fd, name) is not None and not force:
        return Restored(event, walker.shown(parts), "skipped")
    temp = _temp(name, event)
    _remove_quietly(fd, temp)
    os.mkfifo(temp, 0o600, dir_fd=fd)
    _set_owner_mode(fd, temp, event)
    os.rename(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
    return Restored(event, walker.shown(parts), "restored")


def _write(backups: Backups, event: BackupEvent, dir_fd: int, name: bytes, shown: bytes) -> None:
    """Write the event's content as `name` in `dir_fd`: a temp file beside it, fsync, rename."""
    temp = _temp(name, event)
    _remove_quietly(dir_fd, temp)
    try:
        with _content(backups, event) as reader:
            if event.kind == "symlink":
                link_target = b""
                while chunk := reader.read(_CHUNK):
                    link_target += chunk
                os.symlink(link_target, temp, dir_fd=dir_fd)
                _set_owner_mode(dir_fd, temp, event)
                os.utime(temp, ns=(event.mtime_ns, event.mtime_ns), dir_fd=dir_fd,
                         follow_symlinks=False)
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(temp, flags, 0o600, dir_fd=dir_fd)
                try:
                    while chunk := reader.read(_CHUNK):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                    if os.geteuid() == 0:
                        with contextlib.suppress(OSError):
                            os.fchown(fd, event.uid, event.gid)
                    os.fchmod(fd, stat.S_IMODE(event.mode))  # after chown, which drops set-id
                    os.utime(fd, ns=(event.mtime_ns, event.mtime_ns))
                    os.fsync(fd)
                finally:
                    os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BlobCorrupt:
        _remove_quietly(dir_fd, temp)
        raise
    except OSError as e:
        _remove_quietly(dir_fd, temp)
        raise BackupError(f"cannot restore {os.fsdecode(shown)}: {e.strerror}") from e
    os.fsync(dir_fd)


def _holds(dir_fd: int, name: bytes, st: os.stat_result, event: BackupEvent) -> bool:
    """Does `name` already hold exactly what the event saved (type, mode and content)?"""
    if stat.S_IFMT(st.st_mode) != stat.S_IFMT(event.mode):
        return False
    if stat.S_IMODE(st.st_mode) != stat.S_IMODE(event.mode) and event.kind != "symlink":
        return False
    if event.sha256 is None:  # a guard event not uploaded yet: no hash to compare with
        return False
    if event.kind == "symlink":
        data = os.readlink(name, dir_fd=dir_fd)
        return hashlib.sha256(data).hexdigest() == event.sha256
    if st.st_size != event.size:
        return False
    digest = hashlib.sha256()
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    with os.fdopen(os.open(name, flags, dir_fd=dir_fd), "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == event.sha256


def _set_owner_mode(dir_fd: int, name: bytes, event: BackupEvent) -> None:
    """Owner (as root) and mode of an entry restore just made or found to be a directory; the
    mode is set without following a symlink (fchmodat's nofollow works for every other type)."""
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.chown(name, event.uid, event.gid, dir_fd=dir_fd, follow_symlinks=False)
    if event.kind != "symlink":
        os.chmod(name, stat.S_IMODE(event.mode), dir_fd=dir_fd, follow_symlinks=False)


def _temp(name: bytes, event: BackupEvent) -> bytes:
    return b".agentctl-restore-%d-%s.tmp" % (event.id, name[:64])


def _lstat(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_quietly(dir_fd: int, name: bytes) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


@dataclass
class VerifyReport:
    checked: int
    corrupt: dict[str, list[int]]  # digest -> ids of the events that need it
    missing: dict[str, list[int]]

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing


def verify_all(backups: Backups, advance: Callable[[int], None] | None = None) -> VerifyReport:
    """Re-hash every blob the catalog refers to, and every blob in the store."""
    wanted = backups.catalog.digests()
    digests = sorted(set(wanted) | set(backups.blobs.list()))
    report = VerifyReport(0, {}, {})
    for digest in digests:
        report.checked += 1
        try:
            with backups.blobs.get(digest) as reader:
                while reader.read(_CHUNK):
                    pass
        except BlobCorrupt:
            report.corrupt[digest] = wanted.get(digest, [])
        except BackupError:
            report.missing[digest] = wanted.get(digest, [])
        if advance is not None:
            advance(1)
    return report
