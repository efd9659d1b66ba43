"""The backup catalog: one row per backup event (a host entry saved before something replaced or
deleted it), in its own SQLite database beside the blobs (`backup/catalog.sqlite`, WAL mode,
parameterised SQL only).

Why a database of its own rather than tables in the env catalog: the backup store is
self-contained — blobs plus the record of what they were — so it can be inspected, copied or moved
as one directory, outlives envs, and the guard daemon (a later issue) can write to it at a high
rate without holding the env catalog's lock.

An event keeps the original path as bytes (names need not be UTF-8), why it was saved (`commit`,
`guard`, ...), when, what it was (file, symlink, dir, other), its size, mode, owner, mtime and the
sha256 of its content (files: the data; symlinks: the target; dirs and others: none), and the env
and commit it belongs to. Rows are only ever added, or removed when the commit that added them is
rolled back.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
]

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


class BackupCatalog:
    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed event is on disk before the host file it describes is replaced.
        self._db.execute("PRAGMA synchronous=FULL")
        self._migrate()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._transaction() as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number:d}")

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
        with self._transaction() as db:
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
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM events WHERE commit_id = ?", (commit_id,))
            return cursor.rowcount

    def forget(self, commit_id: str, path: bytes, digest: str) -> None:
        """Drop the event of `path` in a commit whose blob will not arrive (the file changed
        before it could be moved into the store; it is backed up again under a new event)."""
        with self._transaction() as db:
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
