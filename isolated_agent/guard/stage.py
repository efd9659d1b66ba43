"""The guard's staging steps around each destructive operation, with their undo.

`Stager` knows nothing about FUSE: it is given a directory fd and a name (or an open file),
the entry's stat and its path on the host, and performs the write ordering of staging.py:
journal record, item, catalog row — then the operation (unlink) or hands back a `Pending`
that the caller completes (`done`) or undoes (`undo`) after trying the operation (rename,
truncate).

Fail closed: when staging fails (no space, the catalog cannot be written) the operation does
not happen and the caller gets an OSError (ENOSPC, EIO...). Nothing is ever destroyed without
its old content being staged and recorded first — except on purpose (policy.py), and then the
skip itself is recorded.

Catalog rows, two modes. `defer_rows=False` (`guard --sync`, and the tests that drive a Stager
directly): the row is committed before the operation returns. `defer_rows=True` (the guard's
default): the record that must exist before the reply is the item's line in the staging
journal, on the staged item's filesystem; the rows are committed in groups (`flush_rows`:
every few milliseconds, and whenever `ROW_BATCH` are waiting), which costs one SQLite commit
per group instead of one per file. A crash before a group is committed loses no row: the
records are in the journal, and `reconcile` turns them into rows (at the guard's next start,
or by the backup daemon while no guard holds the staging dir). The backup daemon is woken once
a group is committed. The journal is emptied once its rows are on disk (`journal_mark`).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sqlite3
import stat
from collections.abc import Callable
from dataclasses import dataclass

from isolated_agent.backup.catalog import (
    RECORDED,
    SKIPPED,
    STAGED,
    GuardCatalog,
    GuardRecord,
    NewItem,
)
from isolated_agent.backup.staging import StagedRecord, StagingDir
from isolated_agent.guard.policy import Policy
from isolated_agent.system import libc

log = logging.getLogger("guard")

ROW_BATCH = 256  # deferred rows waiting before they are committed at once

# Test hook: "POINT:MARKER[,POINT:MARKER]". At POINT (after-journal, after-stage,
# after-record) for a path containing MARKER the guard SIGKILLs itself, to prove that a crash
# in every window between the steps loses nothing (tests/guard/test_guard_failures.py).
FAULT_ENV = "ISOLATED_AGENT_GUARD_FAULT"
_FAULTS = [tuple(item.split(":", 1)) for item in os.environ.get(FAULT_ENV, "").split(",")
           if ":" in item]


def _crash_point(point: str, path: bytes) -> None:
    for wanted, marker in _FAULTS:
        if wanted == point and os.fsencode(marker) in path:
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Pending:
    """Old content staged and recorded for an operation not done yet."""

    event_id: int | None  # None: its row is waiting for the next group commit
    staged_name: str


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    return "other"


class Stager:
    def __init__(
        self,
        staging: StagingDir,
        catalog: GuardCatalog,
        guard: GuardRecord,
        policy: Policy,
        sync: bool = False,
        wake: Callable[[int], None] = lambda event_id: None,
        skipped: Callable[[bytes, str], None] = lambda path, reason: None,
        defer_rows: bool = False,
    ) -> None:
        self.staging = staging
        self.catalog = catalog
        self.guard = guard
        self.policy = policy
        self.sync = sync
        self.wake = wake
        self.skipped = skipped
        self.defer_rows = defer_rows
        self.rows: list[NewItem] = []  # deferred rows, oldest first
        self.dirty = False  # staged since the last group flush

    # -- unlink -----------------------------------------------------------------------------

    def unlink(self, dir_fd: int, name: bytes, path: bytes, st: os.stat_result,
               cause: str = "unlink") -> None:
        """Remove `name` from `dir_fd`, its old content staged and recorded first. A file with
        one link is renamed into staging (that is the removal); with several links, or on
        another filesystem, it is copied, then unlinked."""
        kind = kind_of(st.st_mode)
        if kind == "dir":
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if kind == "other" or self._skip(path, st, kind, cause):
            os.unlink(name, dir_fd=dir_fd)
            if kind == "other":
                self._record_only(path, st, cause)
            return
        staged = StagingDir.new_name()
        record = StagedRecord.of(path, cause, st, kind)
        self.staging.record(staged, record, self.sync)
        _crash_point("after-journal", path)
        try:
            moved = self._take(dir_fd, name, staged, st, kind, move=True)
        except BaseException:
            self.staging.discard(staged)
            raise
        _crash_point("after-stage", path)
        try:
            event_id = self._record(record, staged, cause)
        except OSError:
            if moved and not self._move_back(dir_fd, name, staged):
                # The file is gone from its place and its staged copy stays with its record:
                # the unlink happened, and the next reconcile records it.
                return
            self.staging.discard(staged)
            raise
        _crash_point("after-record", path)
        if not moved:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except BaseException:
                self._unrecord(event_id, staged)
                raise
        self._woken(event_id)

    # -- rename over an existing entry, truncation, exchange --------------------------------

    def before_replace(self, dir_fd: int, name: bytes, path: bytes, st: os.stat_result,
                       cause: str = "rename", copy: bool = False) -> Pending | None:
        """`name` is about to be replaced by a rename: keep its old content (a hard link in
        staging while it has one link — the rename then only drops the old name — else a
        copy; always a copy with `copy`, for an exchange, after which the file lives on).
        None when there is nothing to keep (a directory, a fifo, a skip)."""
        kind = kind_of(st.st_mode)
        if kind in ("dir", "other") or self._skip(path, st, kind, cause):
            return None
        staged = StagingDir.new_name()
        record = StagedRecord.of(path, cause, st, kind)
        self.staging.record(staged, record, self.sync)
        _crash_point("after-journal", path)
        try:
            self._take(dir_fd, name, staged, st, kind, move=False, copy=copy)
            _crash_point("after-stage", path)
            event_id = self._record(record, staged, cause)
        except BaseException:
            self.staging.discard(staged)
            raise
        _crash_point("after-record", path)
        return Pending(event_id, staged)

    def before_truncate(self, fd: int, path: bytes, st: os.stat_result, new_size: int,
                        cause: str = "truncate") -> Pending | None:
        """The regular file open as `fd` (readable) is about to shrink to `new_size`: copy
        it. None when nothing would be lost (it is empty, or it grows) or it is skipped."""
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or new_size >= st.st_size:
            return None
        if self._skip(path, st, "file", cause):
            return None
        staged = StagingDir.new_name()
        record = StagedRecord.of(path, cause, st, "file")
        self.staging.record(staged, record, self.sync)
        _crash_point("after-journal", path)
        try:
            self.staging.copy_in(fd, staged, self.sync)
            self._flush_dir()
            _crash_point("after-stage", path)
            event_id = self._record(record, staged, cause)
        except BaseException:
            self.staging.discard(staged)
            raise
        _crash_point("after-record", path)
        return Pending(event_id, staged)

    def done(self, pending: Pending | None) -> None:
        if pending is not None:
            self._woken(pending.event_id)

    def undo(self, pending: Pending | None) -> None:
        """The operation failed after all: nothing was destroyed, forget the staged copy."""
        if pending is not None:
            self._unrecord(pending.event_id, pending.staged_name)

    def journal_mark(self) -> int | None:
        """Where the journal ends while every record in it has its catalog row committed (None
        while rows wait): once those rows are on disk, `staging.clear_journal(mark)`."""
        return None if self.rows else self.staging.journal_end

    def removed_dir(self, path: bytes, st: os.stat_result, cause: str = "rmdir") -> None:
        """A directory was removed (it was empty): record what it was, for restore."""
        self._record_only(path, st, cause)

    # -- helpers ----------------------------------------------------------------------------

    def _take(self, dir_fd: int, name: bytes, staged: str, st: os.stat_result, kind: str,
              move: bool, copy: bool = False) -> bool:
        """Put the entry into staging as `staged`: renamed (move) or linked when it has one
        link, else copied. Returns True when it was renamed."""
        if not copy and (kind == "symlink" or st.st_nlink == 1):
            try:
                if move:
                    self.staging.move_in(dir_fd, name, staged)
                else:
                    self.staging.link_in(dir_fd, name, staged)
                self._flush_dir()
                return move
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
        if kind == "symlink":
            self.staging.symlink_in(os.readlink(name, dir_fd=dir_fd), staged)
        else:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
            try:
                self.staging.copy_in(fd, staged, self.sync)
            finally:
                os.close(fd)
        self._flush_dir()
        return False

    def _move_back(self, dir_fd: int, name: bytes, staged: str) -> bool:
        try:
            libc.renameat2(self.staging.items, staged.encode(), dir_fd, name,
                           libc.RENAME_NOREPLACE)
            return True
        except OSError as e:
            log.error("guard: cannot put %r back after a failed staging: %s", name, e)
            return False

    def _flush_dir(self) -> None:
        if self.sync:
            self.staging.sync()
        else:
            self.dirty = True

    def _record(self, record: StagedRecord, staged: str | None, cause: str,
                state: str = STAGED, note: str | None = None) -> int | None:
        """Record the event: now (returns its id), or, deferring rows, in the next group
        (returns None)."""
        item = NewItem(record.event(), staged, cause, state, note)
        if self.defer_rows:
            self.rows.append(item)
            if len(self.rows) >= ROW_BATCH:
                self.flush_rows()
            return None
        try:
            [event_id] = self.catalog.add_items([item], self.guard.id)
        except sqlite3.Error as e:
            log.error("guard: cannot record %r in the catalog: %s", record.path, e)
            code = errno.ENOSPC if "full" in str(e) else errno.EIO
            raise OSError(code, f"backup catalog: {e}") from e
        return event_id

    def flush_rows(self) -> None:
        """Commit the deferred rows in one transaction, then wake the backup daemon. On a
        catalog error they stay queued (their journal records keep them safe meanwhile)."""
        if not self.rows:
            return
        rows = self.rows
        try:
            ids = self.catalog.add_items(rows, self.guard.id)
        except sqlite3.Error as e:
            log.error("guard: cannot record %d staged item(s) in the catalog yet: %s",
                      len(rows), e)
            return
        self.rows = []
        for event_id, row in zip(ids, rows, strict=True):
            if row.state == STAGED:
                self.wake(event_id)

    def _woken(self, event_id: int | None) -> None:
        if event_id is not None:
            self.wake(event_id)

    def _unrecord(self, event_id: int | None, staged: str) -> None:
        if event_id is None:
            waiting = [row for row in self.rows if row.staged_name == staged]
            if waiting:
                self.rows.remove(waiting[0])
                self.staging.discard(staged)
                return
            item = self.catalog.item_by_staged_name(staged)  # committed since
            if item is None:
                self.staging.discard(staged)
                return
            event_id = item.event_id
        try:
            self.catalog.remove_item(event_id)
        except sqlite3.Error as e:  # the row stays: an extra backup of an untouched file
            log.error("guard: cannot remove catalog row %d: %s", event_id, e)
            return
        self.staging.discard(staged)

    def _skip(self, path: bytes, st: os.stat_result, kind: str, cause: str) -> bool:
        relative = path[len(self.guard.dir) + 1:]
        reason = self.policy.skip_reason(relative, st.st_size if kind == "file" else 0)
        if reason is None:
            return False
        record = StagedRecord.of(path, cause, st, kind)
        self._record(record, None, cause, SKIPPED, reason)
        self.skipped(path, reason)
        return True

    def _record_only(self, path: bytes, st: os.stat_result, cause: str) -> None:
        kind = kind_of(st.st_mode)
        record = StagedRecord.of(path, cause, st, kind)
        try:
            self._record(record, None, cause, RECORDED)
        except OSError as e:  # nothing of value was lost with it: log only
            log.error("guard: %s", e)
