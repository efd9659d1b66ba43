"""Bringing backed-up entries back: by event id, or by path (a whole subtree) as of a time.

Rules:
- every blob is verified before anything is written (a corrupt one is refused and nothing is
  restored), and verified again as it is copied;
- never overwrite: when the target exists (and is not already identical) the entry is written
  beside it as `NAME.restored-<id>`, unless `force`;
- each file arrives atomically: temp file in the target directory, fsync, rename, fsync dir;
- mode, mtime and (as root) owner come back as they were.
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
    target: bytes  # where it was written (or found identical)
    # "restored"; "beside" (written as NAME.restored-<id>); "identical" (already there);
    # "kept" (an existing directory, left as it is); "skipped" (a device or socket);
    # "not backed up" (a guard event skipped by policy, or whose staged copy was lost)
    status: str


def restore(
    backups: Backups, events: list[BackupEvent], base: bytes, to: str | None, force: bool
) -> list[Restored]:
    """Restore `events` (parents before children). `base` is the path the user asked for; with
    `to`, it lands as `to/<basename of base>` and the rest keep their place under it."""
    for event in events:
        if event.sha256 is not None:
            verify_blob(backups, event)
    results: list[Restored] = []
    unsaved = _not_backed_up(backups, events)
    made_dirs: list[tuple[bytes, BackupEvent]] = []
    for event in events:
        target = _target(event.path, base, to)
        if event.id in unsaved:
            results.append(Restored(event, target, "not backed up"))
        elif event.kind == "dir":
            results.append(_restore_dir(event, target, force, made_dirs))
        elif event.kind in ("file", "symlink"):
            results.append(_restore_leaf(backups, event, target, force))
        else:
            results.append(_restore_node(event, target, force))
    for path, event in reversed(made_dirs):
        os.utime(path, ns=(event.mtime_ns, event.mtime_ns))
    return results


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


def _target(path: bytes, base: bytes, to: str | None) -> bytes:
    if to is None:
        return path
    destination = os.fsencode(os.path.abspath(to))
    if not os.path.isdir(destination):
        raise UsageError(f"--to {to}: no such directory")
    return destination + b"/" + os.path.basename(base.rstrip(b"/")) + path[len(base.rstrip(b"/")):]


def _ensure_parent(path: bytes) -> None:
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o755, exist_ok=True)


def _beside(target: bytes, event: BackupEvent) -> bytes:
    return target + b".restored-%d" % event.id


def _restore_dir(
    event: BackupEvent, target: bytes, force: bool, made: list[tuple[bytes, BackupEvent]]
) -> Restored:
    st = _lstat(target)
    if st is None:
        _ensure_parent(target)
        os.mkdir(target, 0o700)
        _set_owner_mode(target, event)
        made.append((target, event))
        return Restored(event, target, "restored")
    if stat.S_ISDIR(st.st_mode):
        if force:
            _set_owner_mode(target, event)
            return Restored(event, target, "restored")
        return Restored(event, target, "kept")
    if not force:
        beside = _beside(target, event)
        if _lstat(beside) is None:
            os.mkdir(beside, 0o700)
            _set_owner_mode(beside, event)
            made.append((beside, event))
        return Restored(event, beside, "beside")
    raise BackupError(
        f"cannot restore directory {os.fsdecode(target)}: a non-directory is in the way; "
        "move it, or restore with --to DIR"
    )


def _restore_leaf(backups: Backups, event: BackupEvent, target: bytes, force: bool) -> Restored:
    st = _lstat(target)
    if st is not None:
        if _holds(target, st, event):
            return Restored(event, target, "identical")
        if stat.S_ISDIR(st.st_mode) or not force:
            beside = _beside(target, event)
            beside_st = _lstat(beside)
            if beside_st is not None and _holds(beside, beside_st, event):
                return Restored(event, beside, "identical")
            if beside_st is not None and not force:
                raise BackupError(
                    f"{os.fsdecode(target)} and {os.fsdecode(beside)} both exist; restore "
                    "with --force to overwrite, or --to DIR"
                )
            _write(backups, event, beside)
            return Restored(event, beside, "beside")
    _ensure_parent(target)
    _write(backups, event, target)
    return Restored(event, target, "restored")


def _restore_node(event: BackupEvent, target: bytes, force: bool) -> Restored:
    if not stat.S_ISFIFO(event.mode) or (_lstat(target) is not None and not force):
        return Restored(event, target, "skipped")  # devices and sockets are not recreated
    _ensure_parent(target)
    temp = _temp(target, event)
    _remove_quietly(temp)
    os.mkfifo(temp, 0o600)
    _set_owner_mode(temp, event)
    os.rename(temp, target)
    return Restored(event, target, "restored")


def _write(backups: Backups, event: BackupEvent, target: bytes) -> None:
    temp = _temp(target, event)
    _remove_quietly(temp)
    try:
        with _content(backups, event) as reader:
            if event.kind == "symlink":
                link_target = b""
                while chunk := reader.read(_CHUNK):
                    link_target += chunk
                os.symlink(link_target, temp)
            else:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    while chunk := reader.read(_CHUNK):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _set_owner_mode(temp, event)
        os.utime(temp, ns=(event.mtime_ns, event.mtime_ns), follow_symlinks=False)
        os.rename(temp, target)
    except BlobCorrupt:
        _remove_quietly(temp)
        raise
    except OSError as e:
        _remove_quietly(temp)
        raise BackupError(f"cannot restore {os.fsdecode(target)}: {e.strerror}") from e
    _fsync_dir(os.path.dirname(target))


def _holds(path: bytes, st: os.stat_result, event: BackupEvent) -> bool:
    """Does `path` already hold exactly what the event saved (type, mode and content)?"""
    if stat.S_IFMT(st.st_mode) != stat.S_IFMT(event.mode):
        return False
    if stat.S_IMODE(st.st_mode) != stat.S_IMODE(event.mode) and event.kind != "symlink":
        return False
    if event.sha256 is None:  # a guard event not uploaded yet: no hash to compare with
        return False
    if event.kind == "symlink":
        data = os.readlink(path)
        return hashlib.sha256(data).hexdigest() == event.sha256
    if st.st_size != event.size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == event.sha256


def _set_owner_mode(path: bytes, event: BackupEvent) -> None:
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.chown(path, event.uid, event.gid, follow_symlinks=False)
    if event.kind != "symlink":
        os.chmod(path, stat.S_IMODE(event.mode))


def _temp(target: bytes, event: BackupEvent) -> bytes:
    parent, name = os.path.split(target)
    return parent + b"/.agentctl-restore-%d-%s.tmp" % (event.id, name[:64])


def _lstat(path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def _remove_quietly(path: bytes) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _fsync_dir(path: bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
