"""The staging area of a guarded directory: where the guard puts old content before it lets a
delete or an overwrite happen, and where the backup daemon picks it up.

Location: `DIR/.isolated-agent-guard/`, on DIR's own filesystem, so that staging a deleted file
is a rename (no byte copied) and needs no space. The guard's FUSE view hides it: no process
working through the mount can see, change or remove it. The guard reaches it through a
directory fd opened before it mounted; other agentctl processes (the daemon, `backup restore`)
reach it through the running guard's fd (`/proc/<pid>/fd/<n>`, same user or root) or, when no
guard is mounted, by path — and check its (st_dev, st_ino) against the catalog either way.

    .isolated-agent-guard/           mode 0700
        lock                         flock: held by the running guard of DIR
        journal                      one line per staged item: what it was (`StagedRecord`)
        items/<name>                 a staged item: the old file itself, or a copy of it
        tmp/<name>                   a copy being written (not yet an item)

A name is `<time ns>-<pid>-<counter>-<random>` (hex): unique, never reused, and created with
RENAME_NOREPLACE / link / O_EXCL, so a staged item can never overwrite another.

Write ordering (must), all before the guarded operation may return:
1. the item's record, appended to the journal (one write to a file that exists: a record per
   item in a file of its own cost a file creation, a third of what staging a delete took);
2. the item: the file renamed in (unlink of a single-link file: the rename *is* the delete),
   hard-linked in (rename over an existing file: the old file stays reachable under its staged
   name while the rename replaces it), or copied in through tmp/ and renamed (several hard
   links, truncation, exchange, another filesystem);
3. the catalog row (`GuardCatalog.add_items`) — committed before the reply with `--sync`,
   else in a group within a few milliseconds (stage.py: the journal is the record that the
   reply waits for, and reconcile turns any record without a row into one);
4. the operation itself; if it fails, the row and the item are removed again.
The journal is emptied once every record in it has its row, on disk (`clear_journal`: by the
guard after a group flush, by reconcile). So after a crash at any point: a record without its
item is an operation that never happened (ignored); an item with its record but no row gets its
row (`reconcile`); a tmp/ file is dropped. An item without a record (only after a power loss)
is recorded under its staged path as cause "orphan", so its bytes are still backed up. Staging
dirs written before the journal kept each record in `items/<name>.json`; reconcile still reads
those and removes them.

Durability: every step is done before the reply, so any process may be killed at any point and
nothing is lost. Against power loss, `sync=True` also fsyncs each record, copy and directory
before the reply; the default relies on the filesystem journal ordering the rename before the
delete it performs and flushes the staging filesystem in groups (guard/mount.py).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import itertools
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass

from isolated_agent.backup.catalog import (
    FAILED,
    PURGED,
    STAGED,
    UPLOADED,
    UPLOADING,
    BackupEvent,
    GuardCatalog,
    GuardRecord,
    NewItem,
)
from isolated_agent.errors import BackupError
from isolated_agent.system import libc
from isolated_agent.system.durable import process_alive

STAGING_NAME = b".isolated-agent-guard"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_JOURNAL = b"journal"
_SIDECAR = ".json"  # a record of its own per item: staging dirs written before the journal
_counter = itertools.count(1)


class StagingUnavailable(BackupError):
    """The staging dir cannot be reached now (its guard's mount is dead, say); try later."""


@dataclass(frozen=True)
class StagedRecord:
    """What a staged item was: its line in the journal."""

    path: bytes
    cause: str  # unlink, rename, exchange, truncate, orphan
    time: float
    kind: str  # file or symlink
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int

    def encode(self, name: str) -> bytes:
        """One line of the journal, for the item `name`."""
        return json.dumps({
            "version": 1, "name": name,
            "path_b64": base64.b64encode(self.path).decode(),
            "path": os.fsdecode(self.path).encode("utf-8", "replace").decode(),
            "cause": self.cause, "time": self.time, "kind": self.kind, "size": self.size,
            "mode": self.mode, "uid": self.uid, "gid": self.gid, "mtime_ns": self.mtime_ns,
        }, sort_keys=True).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes) -> tuple[str | None, StagedRecord]:
        """(item name, record) of a journal line (the name is None in an old sidecar)."""
        body = json.loads(data)
        name = body.get("name")
        return name if isinstance(name, str) else None, cls(
            path=base64.b64decode(body["path_b64"]), cause=str(body["cause"]),
            time=float(body["time"]), kind=str(body["kind"]), size=int(body["size"]),
            mode=int(body["mode"]), uid=int(body["uid"]), gid=int(body["gid"]),
            mtime_ns=int(body["mtime_ns"]),
        )

    def event(self) -> BackupEvent:
        return BackupEvent(0, self.path, "guard", self.time, self.kind, self.size, self.mode,
                           self.uid, self.gid, self.mtime_ns, None)

    @classmethod
    def of(cls, path: bytes, cause: str, st: os.stat_result, kind: str) -> StagedRecord:
        return cls(path, cause, time.time(), kind, st.st_size, st.st_mode, st.st_uid,
                   st.st_gid, st.st_mtime_ns)


class StagingDir:
    """One staging dir, reached through fds only."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.items = self._subdir(b"items")
        self.tmp = self._subdir(b"tmp")
        self._lock_fd: int | None = None
        self._journal: int | None = None  # the guard's, opened at its first record
        self.journal_end = 0  # bytes of the journal written through `_journal`

    @classmethod
    def create_in(cls, root_fd: int) -> StagingDir:
        """The staging dir inside the directory `root_fd`, made if missing."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(STAGING_NAME, 0o700, dir_fd=root_fd)
        fd = os.open(STAGING_NAME, _DIR_FLAGS, dir_fd=root_fd)
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            os.close(fd)
            raise BackupError(
                f"{os.fsdecode(STAGING_NAME)} exists but is not a private directory of "
                "this user; move it away"
            )
        # Hidden through the mount, but seen beneath it (after `guard stop`): git and tools
        # like it leave a directory alone whose .gitignore ignores everything, itself too.
        with contextlib.suppress(FileExistsError):
            ignore = os.open(b".gitignore", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600, dir_fd=fd)
            try:
                os.write(ignore, b"*\n")
            finally:
                os.close(ignore)
        return cls(fd)

    def _subdir(self, name: bytes) -> int:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=self.fd)
        return os.open(name, _DIR_FLAGS, dir_fd=self.fd)

    def identity(self) -> tuple[int, int]:
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def close(self) -> None:
        for fd in (self.items, self.tmp, self.fd, self._lock_fd, self._journal):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._lock_fd = self._journal = None

    # -- the guard's lock -----------------------------------------------------------------

    def lock(self, blocking: bool) -> bool:
        """Take the staging dir's lock (the running guard holds it for its whole life)."""
        if self._lock_fd is None:
            self._lock_fd = os.open(b"lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600,
                                    dir_fd=self.fd)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- staging (the guard) --------------------------------------------------------------

    @staticmethod
    def new_name() -> str:
        return f"{time.time_ns():x}-{os.getpid():x}-{next(_counter):x}-{secrets.token_hex(4)}"

    def record(self, name: str, record: StagedRecord, sync: bool) -> None:
        """Append what the item `name` is to the journal, before the item exists. A failed
        or short write is cut off again, so the next record starts on a line of its own."""
        if self._journal is None:
            self._journal = os.open(_JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
                                    | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
            self.journal_end = os.fstat(self._journal).st_size
            if sync:  # the journal's own name, as durable as the records in it
                os.fsync(self.fd)
        line = record.encode(name)
        try:
            if os.pwrite(self._journal, line, self.journal_end) != len(line):
                raise OSError(errno.ENOSPC, "short write to the staging journal")
            if sync:
                os.fdatasync(self._journal)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self._journal, self.journal_end)
            raise
        self.journal_end += len(line)

    def clear_journal(self, mark: int | None) -> None:
        """Empty the journal if it still ends at `mark` (`Stager.journal_mark`): its caller
        knows that every record up to there has its catalog row on disk (or its operation
        never happened)."""
        if self._journal is not None and mark and self.journal_end == mark:
            os.ftruncate(self._journal, 0)
            self.journal_end = 0

    def move_in(self, dir_fd: int, src: bytes, name: str) -> None:
        """Rename `src` (in `dir_fd`) to the item `name`: for a single-link file, this is the
        delete. EXDEV when `src` is on another filesystem (a mount inside DIR)."""
        libc.renameat2(dir_fd, src, self.items, name.encode(), libc.RENAME_NOREPLACE)

    def link_in(self, dir_fd: int, src: bytes, name: str) -> None:
        os.link(src, name, src_dir_fd=dir_fd, dst_dir_fd=self.items, follow_symlinks=False)

    def copy_in(self, src_fd: int, name: str, sync: bool) -> None:
        """Copy the open file `src_fd` to the item `name`: through tmp/, then renamed in, so
        an item is always complete. Shares extents (reflink) where the filesystem can."""
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                      dir_fd=self.tmp)
        try:
            _copy(src_fd, out)
            if sync:
                os.fsync(out)
        except BaseException:
            os.close(out)
            self._unlink(self.tmp, name)
            raise
        os.close(out)
        try:
            libc.renameat2(self.tmp, name.encode(), self.items, name.encode(),
                           libc.RENAME_NOREPLACE)
        except BaseException:
            self._unlink(self.tmp, name)
            raise

    def symlink_in(self, target: bytes, name: str) -> None:
        os.symlink(target, name, dir_fd=self.items)

    def sync(self) -> None:
        os.fsync(self.items)

    def flush(self) -> None:
        """One barrier for everything staged so far on this filesystem."""
        libc.syncfs(self.items)

    # -- reading and removing (the daemon, restore, reconcile) ----------------------------

    def open_item(self, name: str) -> int:
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                       dir_fd=self.items)

    def stat_item(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.items, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def read_link(self, name: str) -> bytes:
        return os.readlink(name.encode(), dir_fd=self.items)

    def journal_records(self) -> dict[str, StagedRecord]:
        """The records in the journal, by item name; a line torn by a crash is skipped."""
        try:
            fd = os.open(_JOURNAL, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return {}
        records = {}
        with os.fdopen(fd, "rb") as journal:
            for line in journal:
                entry = _decoded(line)
                if entry is not None and entry[0] is not None:
                    records[entry[0]] = entry[1]
        return records

    def truncate_journal(self) -> None:
        """Empty the journal (reconcile, which has just recorded every item)."""
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(_JOURNAL, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
            try:
                if os.fstat(fd).st_size:
                    os.ftruncate(fd, 0)
            finally:
                os.close(fd)

    def read_sidecar(self, name: str) -> StagedRecord | None:
        """The record of `name` in its own file (a staging dir written before the journal)."""
        try:
            fd = os.open(name + _SIDECAR, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.items)
        except FileNotFoundError:
            return None
        try:
            entry = _decoded(os.read(fd, 1 << 16))
        finally:
            os.close(fd)
        return None if entry is None else entry[1]

    def discard(self, name: str) -> None:
        """Remove an item (purge after upload, or undo a failed operation)."""
        self._unlink(self.items, name)

    def listing(self) -> tuple[set[str], set[str], list[str]]:
        """(item names, old sidecars' names without the suffix, tmp names)."""
        items: set[str] = set()
        sidecars: set[str] = set()
        for entry in _list(self.items):
            if entry.endswith(_SIDECAR):
                sidecars.add(entry[: -len(_SIDECAR)])
            else:
                items.add(entry)
        return items, sidecars, _list(self.tmp)

    @staticmethod
    def _unlink(dir_fd: int, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)


def _decoded(line: bytes) -> tuple[str | None, StagedRecord] | None:
    if not line.strip():
        return None
    try:
        return StagedRecord.decode(line)
    except (ValueError, KeyError, TypeError):
        return None  # torn by a crash or a power loss


def _list(dir_fd: int) -> list[str]:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def _copy(src: int, dst: int) -> None:
    try:
        libc.ficlone(dst, src)
        return
    except OSError:
        pass
    offset = 0
    size = os.fstat(src).st_size
    try:
        while offset < size or size == 0:
            count = os.copy_file_range(src, dst, 32 << 20, offset)
            if count == 0:
                return
            offset += count
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while block := os.pread(src, 1 << 20, offset):
        view = memoryview(block)
        while view:
            view = view[os.pwrite(dst, view, offset + len(block) - len(view)):]
        offset += len(block)


@dataclass
class ReconcileReport:
    recorded: int = 0  # items that had no row and got one
    orphans: int = 0  # items without a record, recorded under their staged path
    dropped_records: int = 0  # records of operations that never happened
    dropped_temps: int = 0
    missing: int = 0  # rows whose staged copy is gone before upload: failed
    purged: int = 0  # uploaded rows whose staged copy was already removed


def reconcile(staging: StagingDir, catalog: GuardCatalog, guard: GuardRecord) -> ReconcileReport:
    """Make the catalog and the staging dir agree after a crash, then empty the journal (every
    item has its row now). Only ever run by whoever holds the staging dir's lock (the guard
    before it mounts, or the daemon while no guard runs), so no staging is in progress."""
    report = ReconcileReport()
    records = staging.journal_records()
    items, sidecars, temps = staging.listing()
    for name in temps:
        staging._unlink(staging.tmp, name)
        report.dropped_temps += 1
    for name in sorted((set(records) | sidecars) - items):
        if catalog.item_by_staged_name(name) is None:  # else: uploaded and purged since
            report.dropped_records += 1
    unrecorded: list[NewItem] = []
    for name in sorted(items):
        if catalog.item_by_staged_name(name) is not None:
            continue
        record = records.get(name) or staging.read_sidecar(name)
        if record is None:
            st = staging.stat_item(name)
            if st is None:
                continue
            kind = "symlink" if stat.S_ISLNK(st.st_mode) else "file"
            record = StagedRecord.of(guard.staging + b"/items/" + name.encode(), "orphan", st,
                                     kind)
            report.orphans += 1
        unrecorded.append(NewItem(record.event(), name, record.cause))
    if unrecorded:  # one transaction, however many items a crash left
        catalog.add_items(unrecorded, guard.id)
    report.recorded = len(unrecorded)
    if records or sidecars:  # each has its row now (on disk), or its operation never happened
        catalog.sync()
        for name in sidecars:
            staging._unlink(staging.items, name + _SIDECAR)
    staging.truncate_journal()  # also of a line torn by a crash, which no record may follow
    for item in catalog.items(guard_id=guard.id):
        if item.staged_name is None or item.staged_name in items:
            continue
        if item.state in (STAGED, UPLOADING):
            catalog.mark_failed(item.event_id, "the staged copy vanished before it was uploaded")
            report.missing += 1
        elif item.state == UPLOADED:
            catalog.mark_purged([item.event_id])
            report.purged += 1
    return report


# -- reaching a staging dir from another process ----------------------------------------------


def state_path(run_dir: str, guard_id: int) -> str:
    return os.path.join(run_dir, f"guard-{guard_id}.json")


def read_state(run_dir: str, guard_id: int) -> dict[str, object] | None:
    try:
        with open(state_path(run_dir, guard_id), "rb") as f:
            state = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def running_guard_pid(run_dir: str, guard_id: int) -> int | None:
    """The pid of the guard's daemon, if it is alive (it may stage items any moment)."""
    state = read_state(run_dir, guard_id)
    pid = None if state is None else state.get("pid")
    return pid if isinstance(pid, int) and process_alive(pid) else None



def open_staging(run_dir: str, guard: GuardRecord) -> StagingDir:
    """The staging dir of `guard`, for a process other than the guard: through the running
    guard's own fd when it is mounted over DIR (the path is hidden by its view), else by path.
    Raises StagingUnavailable when it cannot be reached now."""
    candidates: list[str] = []
    state = read_state(run_dir, guard.id)
    if state is not None:
        pid, number = state.get("pid"), state.get("staging_fd")
        if isinstance(pid, int) and isinstance(number, int) and process_alive(pid):
            candidates.append(f"/proc/{pid}/fd/{number}")
    candidates.append(os.fsdecode(guard.staging))
    problem = "not found"
    for where in candidates:
        try:
            fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            problem = e.strerror or str(e)
            continue
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (guard.staging_dev, guard.staging_ino):
            return StagingDir(fd)
        os.close(fd)
        problem = "it is not the staging dir the catalog knows (moved or recreated?)"
    raise StagingUnavailable(
        f"cannot reach the staging dir of the guard of {os.fsdecode(guard.dir)}: {problem}; "
        f"`agentctl guard start {os.fsdecode(guard.dir)}` brings a dead guard back"
    )


__all__ = [
    "FAILED", "PURGED", "STAGED", "UPLOADED", "STAGING_NAME", "ReconcileReport", "StagedRecord",
    "StagingDir", "StagingUnavailable", "open_staging", "reconcile",
]
