"""SQLite as every catalog of the project uses it: WAL, explicit BEGIN IMMEDIATE transactions,
parameterised SQL only, and a schema versioned with PRAGMA user_version and migrated forward.

A database that cannot be written because its filesystem is full raises `OutOfSpace` (still a
`sqlite3.OperationalError`) naming the directory and what is left there: SQLite itself says
only "database or disk is full", or, when the WAL index cannot grow, "disk I/O error"."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

_SQLITE_IOERR = 10
_SQLITE_FULL = 13
_LOW_SPACE = 1 << 20  # below this much room an I/O error is taken as the filesystem being full


class OutOfSpace(sqlite3.OperationalError):
    """The filesystem holding a database is full (or out of inodes)."""

    def __init__(self, directory: str, free: int, cause: sqlite3.Error) -> None:
        self.directory = directory
        self.free = free
        # "full" is in the text on purpose: callers that only see str(e) still tell ENOSPC.
        super().__init__(
            f"the filesystem of {directory} is full ({self.free_text} free; SQLite said: "
            f"{cause})"
        )

    @property
    def free_text(self) -> str:
        return _size(self.free)


def connect(path: str, *, durable: bool = False, any_thread: bool = False) -> sqlite3.Connection:
    """Open a catalog. isolation_level=None: transactions are opened explicitly (BEGIN
    IMMEDIATE) so two agentctl processes never interleave a read-check-write. `durable`: a
    committed transaction is on disk (synchronous=FULL), not only safe from a process crash.
    `any_thread`: the connection may be handed to another thread (never used by two at once)."""
    with _space_checked(path):
        db = sqlite3.connect(
            path, timeout=30, isolation_level=None, check_same_thread=not any_thread
        )
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
    with _space_checked(db):
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            # A failed write (SQLITE_FULL, an I/O error) may have rolled the transaction back
            # already: a second ROLLBACK would fail and hide the error that matters.
            if db.in_transaction:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise


def migrate(db: sqlite3.Connection, migrations: Sequence[str]) -> None:
    """Apply the migrations the database has not seen yet; migration N sets user_version N."""
    with transaction(db):
        (version,) = db.execute("PRAGMA user_version").fetchone()
        for number, script in enumerate(migrations[version:], start=version + 1):
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {number:d}")


@contextmanager
def _space_checked(database: str | sqlite3.Connection) -> Iterator[None]:
    """Turn an error that comes from the database's filesystem being full into OutOfSpace."""
    try:
        yield
    except OutOfSpace:
        raise
    except sqlite3.Error as e:
        path = database if isinstance(database, str) else _path_of(database)
        full = _out_of_space(path, e)
        if full is None:
            raise
        raise full from e


def _out_of_space(path: str | None, error: sqlite3.Error) -> OutOfSpace | None:
    code = getattr(error, "sqlite_errorcode", None)
    if path is None or code is None or (code & 0xFF) not in (_SQLITE_FULL, _SQLITE_IOERR):
        return None
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if (code & 0xFF) == _SQLITE_FULL or free < _LOW_SPACE or st.f_favail == 0:
        return OutOfSpace(directory, free, error)
    return None


def _path_of(db: sqlite3.Connection) -> str | None:
    """The file of the main database (None for an in-memory one, or if it cannot be told)."""
    try:
        row = db.execute("PRAGMA database_list").fetchone()
    except sqlite3.Error:
        return None
    return str(row[2]) if row is not None and row[2] else None


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count} {unit}"
        count //= 1024
    return f"{count} GiB"
