"""Saving host entries into the backup store before anything replaces or deletes them.

A capture reads each entry once (hashing as it copies into the blob store), then records every
event in one catalog transaction. Order (must): all blobs durable, then the events durable, then
the caller may touch the host. If anything fails no event is recorded and the caller must leave
the host alone.

An *adoptable* file (the store is on its filesystem, it has one link) is only hashed: its blob
will be the file itself, moved into the store by the commit at the moment it replaces or
deletes it (`LocalBlobStore.adopt`), so no byte is copied. Its event is recorded now.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from collections.abc import Callable, Collection, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import BinaryIO

from isolated_agent.backup import Backups
from isolated_agent.backup.catalog import BackupEvent, now
from isolated_agent.system import fdpath

Advance = Callable[[int], None]
_CHUNK = 1 << 20


def entry_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    return "other"


@dataclass
class Captured:
    events: dict[bytes, BackupEvent] = field(default_factory=dict)  # by host path
    # Files only hashed, whose blob is the file itself, still to be moved into the store (by
    # `LocalBlobStore.adopt`) when the commit replaces or deletes it: host path -> sha256.
    to_adopt: dict[bytes, str] = field(default_factory=dict)


def capture(
    backups: Backups,
    paths: Sequence[bytes],
    *,
    reason: str,
    env_id: str | None = None,
    env_name: str | None = None,
    commit_id: str | None = None,
    advance: Advance | None = None,
    adoptable: Collection[bytes] = frozenset(),
) -> Captured:
    """Back up each existing host entry in `paths` (absolute) and record its event.

    Paths that no longer exist are skipped: there is nothing of theirs to lose. A path in
    `adoptable` that is a regular file with a single link is only hashed: the caller moves the
    file itself into the store before it replaces or deletes it (see `Captured.to_adopt`).
    """
    result = Captured()
    pending: list[BackupEvent] = []
    when = now()
    with backups.blobs.batch():
        for path in paths:
            event = _save(backups, path, reason, when, env_id, env_name, commit_id,
                          path in adoptable, result.to_adopt)
            if event is not None:
                pending.append(event)
            if advance is not None:
                advance(1)
    ids = backups.catalog.add(pending)
    for event, event_id in zip(pending, ids, strict=True):
        object.__setattr__(event, "id", event_id)  # frozen for callers; filled in once, here
        result.events[event.path] = event
    return result


def _save(
    backups: Backups,
    path: bytes,
    reason: str,
    when: float,
    env_id: str | None,
    env_name: str | None,
    commit_id: str | None,
    adoptable: bool,
    to_adopt: dict[bytes, str],
) -> BackupEvent | None:
    with ExitStack() as stack:
        try:  # paths longer than PATH_MAX too
            dir_fd, name = stack.enter_context(fdpath.at(path))
        except FileNotFoundError:  # a directory above it is gone: nothing of it to lose
            return None
        stored = _store(backups, path, dir_fd, name, adoptable, to_adopt)
    if stored is None:
        return None
    st, kind, digest, size = stored
    return BackupEvent(
        id=0,
        path=path,
        reason=reason,
        time=when,
        kind=kind,
        size=size,
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        sha256=digest,
        env_id=env_id,
        env_name=env_name,
        commit_id=commit_id,
    )


def _store(
    backups: Backups, path: bytes, dir_fd: int | None, name: bytes, adoptable: bool,
    to_adopt: dict[bytes, str],
) -> tuple[os.stat_result, str, str | None, int] | None:
    """Put `name` (in `dir_fd`) in the blob store, or mark it for adoption: its metadata,
    kind, digest and size; None when it is gone."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    kind = entry_kind(st.st_mode)
    digest: str | None = None
    size = 0
    if kind == "file":
        # O_NONBLOCK: should a fifo have taken the file's place meanwhile, do not hang on it.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb", buffering=0) as file:
            st = os.fstat(fd)  # the metadata of exactly what is read
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EAGAIN, "changed while being backed up", os.fsdecode(path))
            if adoptable and st.st_nlink == 1:
                digest = _hash(file, st.st_size)
                if not backups.blobs.exists(digest):
                    to_adopt[path] = digest
            else:
                digest = backups.blobs.put(file)
        size = st.st_size
    elif kind == "symlink":
        target = os.readlink(name, dir_fd=dir_fd)
        digest = backups.blobs.put(io.BytesIO(target))
        size = len(target)
    return st, kind, digest, size


def _hash(file: BinaryIO, size: int) -> str:
    if size <= _CHUNK:
        return hashlib.sha256(file.read(_CHUNK + 1)).hexdigest()  # the common small file
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    while count := file.readinto(buffer):  # type: ignore[attr-defined]
        digest.update(view[:count])
    return digest.hexdigest()
