"""The catalog: one SQLite database (WAL mode, parameterised SQL only) that lists the envs, their
managed roots, the frozen layers and the checkpoints (DESIGN §11). The schema is versioned with
`PRAGMA user_version` and migrated forward in `_MIGRATIONS`.

A stack is a list of frozen layers, bottom first; an env has one (under its live upper), and so
does every checkpoint (what the env's view was when it was taken: its layers, the upper frozen
into the top one). A layer is kept while a stack names it.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
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
    # version 2: layer stacks
    """
    CREATE TABLE layers (
        id      TEXT PRIMARY KEY,
        created REAL NOT NULL
    );
    CREATE TABLE env_layers (
        env_id   TEXT NOT NULL REFERENCES envs(id) ON DELETE CASCADE,
        pos      INTEGER NOT NULL,      -- 0 is the bottom layer, right over the host
        layer_id TEXT NOT NULL REFERENCES layers(id),
        PRIMARY KEY (env_id, pos)
    );
    CREATE TABLE checkpoints (
        id      TEXT PRIMARY KEY,
        env_id  TEXT NOT NULL REFERENCES envs(id) ON DELETE CASCADE,
        created REAL NOT NULL,
        message TEXT NOT NULL,
        kind    TEXT NOT NULL           -- 'user', 'rolled-away' (kept by a rollback), 'fork'
    );
    CREATE TABLE checkpoint_layers (
        checkpoint_id TEXT NOT NULL REFERENCES checkpoints(id) ON DELETE CASCADE,
        pos           INTEGER NOT NULL,
        layer_id      TEXT NOT NULL REFERENCES layers(id),
        PRIMARY KEY (checkpoint_id, pos)
    );
    CREATE INDEX env_layers_by_layer ON env_layers(layer_id);
    CREATE INDEX checkpoint_layers_by_layer ON checkpoint_layers(layer_id);
    """,
]


@dataclass(frozen=True)
class EnvRecord:
    id: str
    name: str
    created: float
    roots: tuple[str, ...]


ROLLED_AWAY, FORK = "rolled-away", "fork"  # checkpoint kinds besides "user"


@dataclass(frozen=True)
class CheckpointRecord:
    id: str
    env_id: str
    created: float
    message: str
    layers: tuple[str, ...]  # bottom first
    kind: str = "user"  # or ROLLED_AWAY, FORK
    # A live checkpoint (not stored): how long each root's agentfs daemon held the job's
    # requests while it froze the upper, in milliseconds.
    paused_ms: tuple[float, ...] = ()


_CHECKPOINT_COLUMNS = "id, env_id, created, message, kind"


class Catalog:
    def __init__(self, path: str) -> None:
        self._db = sqlite.connect(path)
        sqlite.migrate(self._db, _MIGRATIONS)

    def close(self) -> None:
        self._db.close()

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite.transaction(self._db)

    # -- envs ---------------------------------------------------------------------------------

    def add_env(
        self, env_id: str, name: str, roots: list[str],
        then: Callable[[sqlite3.Connection], None] = lambda db: None,
    ) -> EnvRecord:
        """Add an env; `then(db)` runs in the same transaction (a fork records its stack)."""
        created = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO envs (id, name, created) VALUES (?, ?, ?)", (env_id, name, created)
            )
            db.executemany(
                "INSERT INTO roots (env_id, idx, path) VALUES (?, ?, ?)",
                [(env_id, i, os.fsencode(p)) for i, p in enumerate(roots)],
            )
            then(db)
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

    # -- layer stacks -------------------------------------------------------------------------

    def env_layers(self, env_id: str) -> tuple[str, ...]:
        """The env's frozen layers, bottom first."""
        return self._stack("env_layers", "env_id", env_id)

    def set_env_layers(self, db: sqlite3.Connection, env_id: str, layers: tuple[str, ...]) -> None:
        """Inside a transaction: the env's stack becomes `layers` (bottom first)."""
        db.execute("DELETE FROM env_layers WHERE env_id = ?", (env_id,))
        db.executemany(
            "INSERT INTO env_layers (env_id, pos, layer_id) VALUES (?, ?, ?)",
            [(env_id, pos, layer) for pos, layer in enumerate(layers)],
        )

    def add_layer(self, db: sqlite3.Connection, layer_id: str, created: float) -> None:
        db.execute("INSERT INTO layers (id, created) VALUES (?, ?)", (layer_id, created))

    def has_layer(self, layer_id: str) -> bool:
        row = self._db.execute("SELECT 1 FROM layers WHERE id = ?", (layer_id,)).fetchone()
        return row is not None

    def add_checkpoint(self, db: sqlite3.Connection, record: CheckpointRecord) -> None:
        db.execute(
            "INSERT INTO checkpoints (id, env_id, created, message, kind) VALUES (?, ?, ?, ?, ?)",
            (record.id, record.env_id, record.created, record.message, record.kind),
        )
        db.executemany(
            "INSERT INTO checkpoint_layers (checkpoint_id, pos, layer_id) VALUES (?, ?, ?)",
            [(record.id, pos, layer) for pos, layer in enumerate(record.layers)],
        )

    def checkpoints(self, env_id: str) -> list[CheckpointRecord]:
        """The env's checkpoints, newest first."""
        rows = self._db.execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE env_id = ? "
            "ORDER BY created DESC, rowid DESC", (env_id,)
        ).fetchall()
        return [self._checkpoint(row) for row in rows]

    def find_checkpoint(self, env_id: str, prefix: str) -> list[CheckpointRecord]:
        """The env's checkpoints whose id starts with `prefix` (ids are hex: no LIKE escapes)."""
        rows = self._db.execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints "
            "WHERE env_id = ? AND substr(id, 1, ?) = ?", (env_id, len(prefix), prefix)
        ).fetchall()
        return [self._checkpoint(row) for row in rows]

    def remove_checkpoints(self, db: sqlite3.Connection, kind: str, before: float) -> int:
        """Inside a transaction: drop the checkpoints of `kind` made before `before`."""
        cursor = db.execute("DELETE FROM checkpoints WHERE kind = ? AND created < ?",
                            (kind, before))
        return cursor.rowcount

    def envs_using(self, layers: tuple[str, ...]) -> list[str]:
        """Names of the envs whose stack starts with `layers` (they see that state beneath
        their own changes)."""
        stacks: dict[str, list[str]] = {}
        rows = self._db.execute(
            "SELECT e.name, l.layer_id FROM envs e JOIN env_layers l ON l.env_id = e.id "
            "ORDER BY e.name, l.pos")
        for name, layer in rows:
            stacks.setdefault(name, []).append(layer)
        return [name for name, stack in stacks.items() if tuple(stack[: len(layers)]) == layers]

    def layers_used_by_others(self, env_id: str) -> set[str]:
        """The layers another env's stack or checkpoints name."""
        rows = self._db.execute(
            "SELECT layer_id FROM env_layers WHERE env_id != ? UNION "
            "SELECT l.layer_id FROM checkpoint_layers l JOIN checkpoints c "
            "ON c.id = l.checkpoint_id WHERE c.env_id != ?", (env_id, env_id))
        return {layer for (layer,) in rows.fetchall()}

    def unreferenced_layers(self) -> list[str]:
        rows = self._db.execute(
            "SELECT id FROM layers WHERE id NOT IN (SELECT layer_id FROM env_layers) "
            "AND id NOT IN (SELECT layer_id FROM checkpoint_layers) ORDER BY id"
        )
        return [layer for (layer,) in rows.fetchall()]

    def remove_layers(self, db: sqlite3.Connection, layers: list[str]) -> None:
        db.executemany("DELETE FROM layers WHERE id = ?", [(layer,) for layer in layers])

    def _stack(self, table: str, column: str, owner: str) -> tuple[str, ...]:
        rows = self._db.execute(
            f"SELECT layer_id FROM {table} WHERE {column} = ? ORDER BY pos", (owner,)
        ).fetchall()
        return tuple(layer for (layer,) in rows)

    def _checkpoint(self, row: tuple[str, str, float, str, str]) -> CheckpointRecord:
        checkpoint_id, env_id, created, message, kind = row
        layers = self._stack("checkpoint_layers", "checkpoint_id", checkpoint_id)
        return CheckpointRecord(checkpoint_id, env_id, created, message, layers, kind)
