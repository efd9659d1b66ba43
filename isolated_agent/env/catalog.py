"""The catalog: one SQLite database (WAL mode, parameterised SQL only) that lists the envs and
their managed roots. Later issues add commits and backups as further tables; the schema is
versioned with `PRAGMA user_version` and migrated forward in `_MIGRATIONS`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass

from isolated_agent.system import sqlite

_MIGRATIONS: list[str] = [
    # version 1
    """
    CREATE TABLE envs (
        id      TEXT PRIMARY KEY,
        name    TEXT NOT NULL UNIQUE,
        created REAL NOT NULL
    );
    CREATE TABLE roots (
        env_id  TEXT NOT NULL REFERENCES envs(id) ON DELETE CASCADE,
        idx     INTEGER NOT NULL,
        path    BLOB NOT NULL,          -- host path as bytes: names need not be UTF-8
        PRIMARY KEY (env_id, idx)
    );
    """,
]


@dataclass(frozen=True)
class EnvRecord:
    id: str
    name: str
    created: float
    roots: tuple[str, ...]


class Catalog:
    def __init__(self, path: str) -> None:
        self._db = sqlite.connect(path)
        sqlite.migrate(self._db, _MIGRATIONS)

    def close(self) -> None:
        self._db.close()

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite.transaction(self._db)

    # -- envs ---------------------------------------------------------------------------------

    def add_env(self, env_id: str, name: str, roots: list[str]) -> EnvRecord:
        created = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO envs (id, name, created) VALUES (?, ?, ?)", (env_id, name, created)
            )
            db.executemany(
                "INSERT INTO roots (env_id, idx, path) VALUES (?, ?, ?)",
                [(env_id, i, os.fsencode(p)) for i, p in enumerate(roots)],
            )
        return EnvRecord(env_id, name, created, tuple(roots))

    def remove_env(self, env_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM envs WHERE id = ?", (env_id,))

    def name_taken(self, name: str) -> bool:
        row = self._db.execute("SELECT 1 FROM envs WHERE name = ?", (name,)).fetchone()
        return row is not None

    def find_env(self, name_or_id: str) -> EnvRecord | None:
        row = self._db.execute(
            "SELECT id, name, created FROM envs WHERE name = ? OR id = ? ORDER BY name = ? DESC",
            (name_or_id, name_or_id, name_or_id),
        ).fetchone()
        return None if row is None else self._record(row)

    def list_envs(self) -> list[EnvRecord]:
        rows = self._db.execute("SELECT id, name, created FROM envs ORDER BY created, name")
        return [self._record(row) for row in rows.fetchall()]

    def _record(self, row: tuple[str, str, float]) -> EnvRecord:
        env_id, name, created = row
        paths = self._db.execute(
            "SELECT path FROM roots WHERE env_id = ? ORDER BY idx", (env_id,)
        ).fetchall()
        return EnvRecord(env_id, name, created, tuple(os.fsdecode(p) for (p,) in paths))
