"""SQLite as every catalog of the project uses it: WAL, explicit BEGIN IMMEDIATE transactions,
parameterised SQL only, and a schema versioned with PRAGMA user_version and migrated forward."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


def connect(path: str, *, durable: bool = False, any_thread: bool = False) -> sqlite3.Connection:
    """Open a catalog. isolation_level=None: transactions are opened explicitly (BEGIN
    IMMEDIATE) so two agentctl processes never interleave a read-check-write. `durable`: a
    committed transaction is on disk (synchronous=FULL), not only safe from a process crash.
    `any_thread`: the connection may be handed to another thread (never used by two at once)."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=not any_thread)
    _use_wal(db)
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
    return db


def _use_wal(db: sqlite3.Connection) -> None:
    """Switch a new database to WAL (it stays so). The switch needs an exclusive lock and
    SQLite does not wait for it (no busy handler): two processes creating the catalog at once
    would see "database is locked", so retry for as long as the connection timeout."""
    for _ in range(600):
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e):
                raise
            time.sleep(0.05)
    db.execute("PRAGMA journal_mode=WAL")  # one last time: its error is the one to report


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
