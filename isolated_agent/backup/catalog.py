"""The backup catalog: one row per backup event (a host entry saved before something replaced or
deleted it), in its own SQLite database beside the blobs (`backup/catalog.sqlite`, WAL mode,
parameterised SQL only).

Why a database of its own rather than tables in the env catalog: the backup store is
self-contained — blobs plus the record of what they were — so it can be inspected, copied or moved
as one directory, outlives envs, and the guard daemon (a later issue) can write to it at a high
rate without holding the env catalog's lock.

Guard items (version 2): an event whose old content the guard staged on the host's filesystem
also has a `guard_items` row that the backup daemon moves through its states:

    staged --claim--> uploading --uploaded+verified--> uploaded --staged copy removed--> purged
       ^                  |
       +-- retry later ---+ (attempts, next_attempt_at with backoff, last_error)
    failed    the staged copy is gone before it was uploaded (reported, never retried)
    skipped   not backed up on purpose (excluded, over the size cap); last_error says why
    recorded  nothing to upload (a removed directory, a fifo): the event is the whole record

`guards` names each guarded directory and its staging dir (path and identity); the staged name
of an item is unique and never reused. The event's sha256 and size are filled in when the
daemon has uploaded and verified the content.

An event keeps the original path as bytes (names need not be UTF-8), why it was saved (`commit`,
`guard`, ...), when, what it was (file, symlink, dir, other), its size, mode, owner, mtime and the
sha256 of its content (files: the data; symlinks: the target; dirs and others: none), and the env
and commit it belongs to. Rows are only ever added, or removed when the commit that added them is
rolled back.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace

from isolated_agent.errors import BackupError, store_full
from isolated_agent.system import sqlite
from isolated_agent.system.durable import sync_filesystem

_MIGRATIONS: list[str] = [
    # version 1
    """
    CREATE TABLE events (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        path      BLOB NOT NULL,
        reason    TEXT NOT NULL,
        time      REAL NOT NULL,
        kind      TEXT NOT NULL,
        size      INTEGER NOT NULL,
        mode      INTEGER NOT NULL,
        uid       INTEGER NOT NULL,
        gid       INTEGER NOT NULL,
        mtime_ns  INTEGER NOT NULL,
        sha256    TEXT,
        env_id    TEXT,
        env_name  TEXT,
        commit_id TEXT
    );
    CREATE INDEX events_by_path ON events (path, time);
    CREATE INDEX events_by_time ON events (time);
    CREATE INDEX events_by_commit ON events (commit_id);
    """,
    # version 2: the guard's staged items and the daemon's work on them
    """
    CREATE TABLE guards (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        dir         BLOB NOT NULL UNIQUE,
        staging     BLOB NOT NULL,
        staging_dev INTEGER NOT NULL,
        staging_ino INTEGER NOT NULL,
        created     REAL NOT NULL
    );
    CREATE TABLE guard_items (
        event_id        INTEGER PRIMARY KEY REFERENCES events (id),
        guard_id        INTEGER NOT NULL REFERENCES guards (id),
        staged_name     TEXT UNIQUE,
        cause           TEXT NOT NULL,
        state           TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_error      TEXT,
        uploaded_at     REAL,
        purged_at       REAL
    );
    CREATE INDEX guard_items_by_state ON guard_items (state, next_attempt_at);
    """,
]

STAGED, UPLOADING, UPLOADED, PURGED = "staged", "uploading", "uploaded", "purged"
FAILED, SKIPPED, RECORDED = "failed", "skipped", "recorded"
STATES = (STAGED, UPLOADING, UPLOADED, PURGED, FAILED, SKIPPED, RECORDED)

_COLUMNS = (
    "id, path, reason, time, kind, size, mode, uid, gid, mtime_ns, sha256, env_id, env_name, "
    "commit_id"
)


@dataclass(frozen=True)
class BackupEvent:
    id: int  # 0 until the catalog has stored it
    path: bytes
    reason: str
    time: float
    kind: str  # "file", "symlink", "dir" or "other"
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    sha256: str | None
    env_id: str | None = None
    env_name: str | None = None
    commit_id: str | None = None


@dataclass(frozen=True)
class GuardRecord:
    id: int
    dir: bytes
    staging: bytes
    staging_dev: int
    staging_ino: int


@dataclass(frozen=True)
class GuardItem:
    event_id: int
    guard_id: int
    staged_name: str | None
    cause: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    uploaded_at: float | None
    purged_at: float | None


@dataclass(frozen=True)
class NewItem:
    """A guard event to record, with its item."""

    event: BackupEvent
    staged_name: str | None
    cause: str
    state: str = STAGED
    note: str | None = None


_ITEM_COLUMNS = (
    "event_id, guard_id, staged_name, cause, state, attempts, next_attempt_at, last_error, "
    "uploaded_at, purged_at"
)


class BackupCatalog:
    def __init__(self, path: str, durable: bool = True) -> None:
        """`durable=False` (the guard's hot path, see guard/staging.py) commits without an
        fsync each: a committed row survives any process crash, and the guard flushes the
        filesystem in groups; on power loss its rows are rebuilt from the staging dir."""
        self.path = path
        with self._room():
            # check_same_thread off: a connection may be handed to another thread (the backup
            # daemon's upload thread), though it is never used by two at once.
            self._db = sqlite.connect(path, durable=durable, any_thread=True)
            sqlite.migrate(self._db, _MIGRATIONS)

    def close(self) -> None:
        self._db.close()

    def sync(self) -> None:
        """Every transaction committed so far, on disk (`durable=False` commits are not)."""
        sync_filesystem(os.path.dirname(os.path.abspath(self.path)))

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite.transaction(self._db)

    @contextmanager
    def _room(self) -> Iterator[None]:
        """A full filesystem, met opening the catalog or recording a commit's events, is a
        BackupError that says which store and what to do. (The guard's and the daemon's writes
        keep sqlite3 errors: they retry, or turn them into ENOSPC themselves.)"""
        try:
            yield
        except sqlite.OutOfSpace as e:
            where = os.path.dirname(os.path.abspath(self.path))
            raise BackupError(
                store_full("the backup store", where, f"{e.free_text} free on its filesystem")
            ) from e

    # -- writing --------------------------------------------------------------------------

    def add(self, events: Iterable[BackupEvent]) -> list[int]:
        """Store the events in one transaction; returns their ids in order."""
        rows = [
            (e.path, e.reason, e.time, e.kind, e.size, e.mode, e.uid, e.gid, e.mtime_ns,
             e.sha256, e.env_id, e.env_name, e.commit_id)
            for e in events
        ]
        if not rows:
            return []
        with self._room(), self._transaction() as db:
            db.executemany(
                "INSERT INTO events (path, reason, time, kind, size, mode, uid, gid, "
                "mtime_ns, sha256, env_id, env_name, commit_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            (last,) = db.execute("SELECT last_insert_rowid()").fetchone()
        # AUTOINCREMENT inside one write transaction hands out consecutive ids.
        return list(range(int(last) - len(rows) + 1, int(last) + 1))

    def remove_commit(self, commit_id: str) -> int:
        """Forget the events of a commit that was rolled back (its host files were never
        touched); returns how many."""
        with self._room(), self._transaction() as db:
            cursor = db.execute("DELETE FROM events WHERE commit_id = ?", (commit_id,))
            return cursor.rowcount

    def forget(self, commit_id: str, path: bytes, digest: str) -> None:
        """Drop the event of `path` in a commit whose blob will not arrive (the file changed
        before it could be moved into the store; it is backed up again under a new event)."""
        with self._room(), self._transaction() as db:
            db.execute(
                "DELETE FROM events WHERE commit_id = ? AND path = ? AND sha256 = ?",
                (commit_id, path, digest),
            )

    # -- reading --------------------------------------------------------------------------

    def get(self, event_id: int) -> BackupEvent | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM events WHERE id = ?", (event_id,)
        ).fetchone()
        return None if row is None else _event(row)

    def find(
        self,
        path: bytes | None = None,
        since: float | None = None,
        until: float | None = None,
        commit_id: str | None = None,
    ) -> list[BackupEvent]:
        """Events oldest first; `path` selects that path and everything under it."""
        where: list[str] = []
        params: list[object] = []
        if path is not None:
            where.append("(path = ? OR (path >= ? AND path < ?))")
            params += [path, *_subtree_bounds(path)]
        if since is not None:
            where.append("time >= ?")
            params.append(since)
        if until is not None:
            where.append("time <= ?")
            params.append(until)
        if commit_id is not None:
            where.append("commit_id = ?")
            params.append(commit_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM events {clause} ORDER BY time, id", params
        ).fetchall()
        return [_event(row) for row in rows]

    def latest(self, path: bytes, at: float | None = None) -> list[BackupEvent]:
        """For `path` and each path under it, its most recent event no later than `at`,
        in path order (parents before children)."""
        newest: dict[bytes, BackupEvent] = {}
        for event in self.find(path=path, until=at):
            newest[event.path] = event  # list() is oldest first: the last one wins
        return [newest[p] for p in sorted(newest)]

    def digests(self) -> dict[str, list[int]]:
        """Every sha256 the catalog refers to, with the ids of the events that do."""
        result: dict[str, list[int]] = {}
        rows = self._db.execute(
            "SELECT sha256, id FROM events WHERE sha256 IS NOT NULL ORDER BY id"
        )
        for digest, event_id in rows:
            result.setdefault(digest, []).append(event_id)
        return result


class GuardCatalog(BackupCatalog):
    """The backup catalog with the guard's and the backup daemon's operations."""

    # -- guards ---------------------------------------------------------------------------

    def register_guard(self, directory: bytes, staging: bytes, dev: int, ino: int) -> int:
        with self._transaction() as db:
            row = db.execute("SELECT id FROM guards WHERE dir = ?", (directory,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO guards (dir, staging, staging_dev, staging_ino, created) "
                    "VALUES (?, ?, ?, ?, ?)", (directory, staging, dev, ino, now()))
                (guard_id,) = db.execute("SELECT last_insert_rowid()").fetchone()
                return int(guard_id)
            db.execute(
                "UPDATE guards SET staging = ?, staging_dev = ?, staging_ino = ? WHERE id = ?",
                (staging, dev, ino, row[0]))
            return int(row[0])

    def guards(self) -> list[GuardRecord]:
        rows = self._db.execute(
            "SELECT id, dir, staging, staging_dev, staging_ino FROM guards ORDER BY id")
        return [GuardRecord(int(i), bytes(d), bytes(s), int(dev), int(ino))
                for i, d, s, dev, ino in rows]

    def guard(self, guard_id: int) -> GuardRecord | None:
        return next((g for g in self.guards() if g.id == guard_id), None)

    # -- items: the guard -----------------------------------------------------------------

    def add_items(self, items: list[NewItem], guard_id: int) -> list[int]:
        """Record guard events and their items in one transaction (the guard's group commit,
        reconcile); returns the event ids in order. A staged name is recorded once (UNIQUE)."""
        ids: list[int] = []
        with self._transaction() as db:
            for item in items:
                assert item.state in STATES
                event = item.event
                (event_id,) = db.execute(
                    "INSERT INTO events (path, reason, time, kind, size, mode, uid, gid, "
                    "mtime_ns, sha256, env_id, env_name, commit_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL) RETURNING id",
                    (event.path, event.reason, event.time, event.kind, event.size, event.mode,
                     event.uid, event.gid, event.mtime_ns, event.sha256)).fetchone()
                db.execute(
                    "INSERT INTO guard_items (event_id, guard_id, staged_name, cause, state, "
                    "last_error) VALUES (?, ?, ?, ?, ?, ?)",
                    (event_id, guard_id, item.staged_name, item.cause, item.state, item.note))
                ids.append(int(event_id))
        return ids

    def remove_item(self, event_id: int) -> None:
        """Undo `add_item`: the operation it was staged for failed, nothing was removed."""
        with self._transaction() as db:
            db.execute("DELETE FROM guard_items WHERE event_id = ?", (event_id,))
            db.execute("DELETE FROM events WHERE id = ?", (event_id,))

    # -- items: the daemon ----------------------------------------------------------------

    def reset_uploading(self) -> int:
        """At start-up: uploads that a crash interrupted are staged again."""
        with self._transaction() as db:
            return db.execute("UPDATE guard_items SET state = ? WHERE state = ?",
                              (STAGED, UPLOADING)).rowcount

    def claim_due(self, when: float, limit: int) -> list[GuardItem]:
        """Take up to `limit` staged items whose time has come: they become `uploading` and
        their attempt count goes up."""
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM guard_items WHERE state = ? "
                "AND next_attempt_at <= ? ORDER BY next_attempt_at, event_id LIMIT ?",
                (STAGED, when, limit)).fetchall()
            db.executemany(
                "UPDATE guard_items SET state = ?, attempts = attempts + 1 WHERE event_id = ?",
                [(UPLOADING, row[0]) for row in rows])
        return [replace(_item(row), state=UPLOADING, attempts=int(row[5]) + 1) for row in rows]

    def mark_uploaded(self, done: list[tuple[int, str, int]]) -> None:
        """(event id, sha256, size) of items whose blob is in the bucket and verified."""
        when = now()
        with self._transaction() as db:
            for event_id, digest, size in done:
                db.execute("UPDATE events SET sha256 = ?, size = ? WHERE id = ?",
                           (digest, size, event_id))
                db.execute(
                    "UPDATE guard_items SET state = ?, uploaded_at = ?, last_error = NULL "
                    "WHERE event_id = ?", (UPLOADED, when, event_id))

    def mark_retry(self, event_id: int, error: str, next_attempt_at: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE guard_items SET state = ?, last_error = ?, next_attempt_at = ? "
                "WHERE event_id = ?", (STAGED, error, next_attempt_at, event_id))

    def mark_failed(self, event_id: int, error: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE guard_items SET state = ?, last_error = ? WHERE event_id = ?",
                       (FAILED, error, event_id))

    def mark_purged(self, event_ids: list[int]) -> None:
        when = now()
        with self._transaction() as db:
            db.executemany(
                "UPDATE guard_items SET state = ?, purged_at = ? WHERE event_id = ? "
                "AND state = ?", [(PURGED, when, event_id, UPLOADED) for event_id in event_ids])

    # -- items: reading -------------------------------------------------------------------

    def item(self, event_id: int) -> GuardItem | None:
        row = self._db.execute(f"SELECT {_ITEM_COLUMNS} FROM guard_items WHERE event_id = ?",
                               (event_id,)).fetchone()
        return None if row is None else _item(row)

    def items(self, state: str | None = None, guard_id: int | None = None) -> list[GuardItem]:
        where: list[str] = []
        params: list[object] = []
        if state is not None:
            where.append("state = ?")
            params.append(state)
        if guard_id is not None:
            where.append("guard_id = ?")
            params.append(guard_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._db.execute(
            f"SELECT {_ITEM_COLUMNS} FROM guard_items {clause} ORDER BY event_id", params)
        return [_item(row) for row in rows]

    def item_by_staged_name(self, staged_name: str) -> GuardItem | None:
        row = self._db.execute(f"SELECT {_ITEM_COLUMNS} FROM guard_items WHERE staged_name = ?",
                               (staged_name,)).fetchone()
        return None if row is None else _item(row)

    def counts(self, guard_id: int | None = None) -> dict[str, int]:
        if guard_id is None:
            rows = self._db.execute("SELECT state, count(*) FROM guard_items GROUP BY state")
        else:
            rows = self._db.execute(
                "SELECT state, count(*) FROM guard_items WHERE guard_id = ? GROUP BY state",
                (guard_id,))
        return {str(state): int(count) for state, count in rows}

    def next_due(self) -> float | None:
        (when,) = self._db.execute(
            "SELECT min(next_attempt_at) FROM guard_items WHERE state = ?", (STAGED,)
        ).fetchone()
        return None if when is None else float(when)


def _item(row: tuple[object, ...]) -> GuardItem:
    (event_id, guard_id, staged_name, cause, state, attempts, next_at, error, uploaded,
     purged) = row
    return GuardItem(
        event_id=int(event_id),  # type: ignore[call-overload]
        guard_id=int(guard_id),  # type: ignore[call-overload]
        staged_name=None if staged_name is None else str(staged_name),
        cause=str(cause),
        state=str(state),
        attempts=int(attempts),  # type: ignore[call-overload]
        next_attempt_at=float(next_at),  # type: ignore[arg-type]
        last_error=None if error is None else str(error),
        uploaded_at=None if uploaded is None else float(uploaded),  # type: ignore[arg-type]
        purged_at=None if purged is None else float(purged),  # type: ignore[arg-type]
    )


def _subtree_bounds(path: bytes) -> tuple[bytes, bytes]:
    # Every path under P sorts in [P + b"/", P + b"0"): "0" is the byte right after "/".
    base = path.rstrip(b"/")
    return base + b"/", base + b"0"


def _event(row: tuple[object, ...]) -> BackupEvent:
    (event_id, path, reason, when, kind, size, mode, uid, gid, mtime_ns, digest, env_id,
     env_name, commit_id) = row
    return BackupEvent(
        id=int(event_id),  # type: ignore[call-overload]
        path=bytes(path),  # type: ignore[call-overload]
        reason=str(reason),
        time=float(when),  # type: ignore[arg-type]
        kind=str(kind),
        size=int(size),  # type: ignore[call-overload]
        mode=int(mode),  # type: ignore[call-overload]
        uid=int(uid),  # type: ignore[call-overload]
        gid=int(gid),  # type: ignore[call-overload]
        mtime_ns=int(mtime_ns),  # type: ignore[call-overload]
        sha256=None if digest is None else str(digest),
        env_id=None if env_id is None else str(env_id),
        env_name=None if env_name is None else str(env_name),
        commit_id=None if commit_id is None else str(commit_id),
    )


def now() -> float:
    return time.time()
