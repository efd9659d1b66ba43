"""SQLite as every catalog of the project uses it: WAL, explicit BEGIN IMMEDIATE transactions,
parameterised SQL only, and a schema versioned with PRAGMA user_version and migrated forward."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


def connect(path: str, *, durable: bool = False, any_thread: bool = False) -> sqlite3.Connection:
    """Open a catalog. isolation_level=None: transactions are opened explicitly (BEGIN
    IMMEDIATE) so two agentctl processes never interleave a read-check-write. `durable`: a
    committed transaction is on disk (synchronous=FULL), not only safe from a process crash.
    `any_thread`: the connection may be handed to another thread (never used by two at once)."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=not any_thread)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def migrate(db: sqlite3.Connection, migrations: Sequence[str]) -> None:
    """Apply the migrations the database has not seen yet; migration N sets user_version N."""
    with transaction(db):
        (version,) = db.execute("PRAGMA user_version").fetchone()
        for number, script in enumerate(migrations[version:], start=version + 1):
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {number:d}")
