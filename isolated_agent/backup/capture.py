"""Saving host entries into the backup store before anything replaces or deletes them.

A capture reads each entry once (hashing as it copies into the blob store), then records every
event in one catalog transaction. Order (must): all blobs durable, then the events durable, then
the caller may touch the host. If anything fails no event is recorded and the caller must leave
the host alone.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Callable, Sequence

from isolated_agent.backup import Backups
from isolated_agent.backup.catalog import BackupEvent, now

Advance = Callable[[int], None]


def entry_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    return "other"


def capture(
    backups: Backups,
    paths: Sequence[bytes],
    *,
    reason: str,
    env_id: str | None = None,
    env_name: str | None = None,
    commit_id: str | None = None,
    advance: Advance | None = None,
) -> dict[bytes, BackupEvent]:
    """Back up each existing host entry in `paths` (absolute); returns its event by path.

    Paths that no longer exist are skipped: there is nothing of theirs to lose.
    """
    pending: list[BackupEvent] = []
    when = now()
    with backups.blobs.batch():
        for path in paths:
            event = _save(backups, path, reason, when, env_id, env_name, commit_id)
            if event is not None:
                pending.append(event)
            if advance is not None:
                advance(1)
    ids = backups.catalog.add(pending)
    saved: dict[bytes, BackupEvent] = {}
    for event, event_id in zip(pending, ids, strict=True):
        object.__setattr__(event, "id", event_id)  # frozen for callers; filled in once, here
        saved[event.path] = event
    return saved


def _save(
    backups: Backups,
    path: bytes,
    reason: str,
    when: float,
    env_id: str | None,
    env_name: str | None,
    commit_id: str | None,
) -> BackupEvent | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    kind = entry_kind(st.st_mode)
    digest: str | None = None
    size = 0
    if kind == "file":
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb", buffering=0) as file:
            st = os.fstat(fd)  # the metadata of exactly what is read
            digest = backups.blobs.put(file)
        size = st.st_size
    elif kind == "symlink":
        target = os.readlink(path)
        digest = backups.blobs.put(io.BytesIO(target))
        size = len(target)
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

