"""backupd: uploads what the guards staged, verifies it, and only then removes the staged copy.

The catalog is the source of truth; messages on the control socket only wake the daemon up.
A message lost while the daemon was down loses nothing: at start, and every `rescan_interval`,
it looks at the catalog (and reconciles each staging dir no guard is holding), so every staged
item is found again.

Life of an item (see catalog.py for the states):

    claim (staged -> uploading, attempts + 1)
      -> put the staged content into the bucket (content-addressed, written once)
      -> verify: read it back from the bucket, size and sha256 must match
      -> mark uploaded (the event gets its sha256 and size)
      -> remove the staged copy, mark purged.
    Any failure -> staged again, next attempt after an exponential backoff with jitter
    (base * 2^(attempts-1), capped, times a random factor in [0.5, 1)); the staged copy stays.
    The staged copy gone before upload -> failed (reported; there is nothing left to retry).

A crash at any point is repaired at the next start: `uploading` rows go back to `staged` (the
upload is repeated; the bucket writes each blob once, so it is not stored twice), `uploaded`
rows are purged. The daemon runs alone per store (an flock on run/backupd.pid).

Control port (run/backupd.sock, DESIGN §8 frames, peers checked with SO_PEERCRED):
    heartbeat `0`              -> ACK
    backup `B` {"ids": [..]}   -> wake up; ACK
    skip `b` {"path", "reason"}-> logged; ACK
    purge `D` {"id": N}        -> remove the staged copy of item N, only if its upload was
                                  verified; by id only — no path is ever accepted
    query `Q`                  -> ACK {"pid", "bucket", "counts", "next_attempt_at"}
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import random
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import trio  # type: ignore[import-untyped]

from isolated_agent.backup import Backups
from isolated_agent.backup.catalog import (
    STAGED,
    UPLOADED,
    UPLOADING,
    GuardCatalog,
    GuardItem,
    GuardRecord,
)
from isolated_agent.backup.s3 import BucketUnavailable
from isolated_agent.backup.staging import (
    StagingDir,
    StagingUnavailable,
    open_staging,
    reconcile,
    running_guard_pid,
)
from isolated_agent.backup.store import BlobStore, LocalBlobStore
from isolated_agent.errors import BackupError, BlobCorrupt
from isolated_agent.protocol.frames import Code, Frame, error_frame
from isolated_agent.protocol.peer import PeerCred
from isolated_agent.protocol.server import serve
from isolated_agent.system.daemon import read_report

log = logging.getLogger("backupd")

# Test hook: "POINT[,POINT]" with POINT one of after-put, after-verify, after-mark,
# after-purge: the daemon SIGKILLs itself the first time it gets there, to prove that a crash
# in every window loses nothing and uploads nothing twice (tests/guard/test_daemon.py).
FAULT_ENV = "ISOLATED_AGENT_BACKUPD_FAULT"
IDLE_EXIT = 60.0
IDLE_EXIT_ENV = "ISOLATED_AGENT_BACKUPD_IDLE"
_FAULTS = set(filter(None, os.environ.get(FAULT_ENV, "").split(",")))


def _crash_point(point: str) -> None:
    if point in _FAULTS:
        os.kill(os.getpid(), signal.SIGKILL)


SOCKET_NAME = "backupd.sock"
PID_NAME = "backupd.pid"
LOG_NAME = "backupd.log"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Settings:
    rescan_interval: float = 30.0
    backoff_base: float = 2.0
    backoff_cap: float = 600.0
    batch: int = 64
    # Started on demand: exit after this many seconds with nothing to do (no guard running,
    # nothing staged or being uploaded), or at once when the store is gone. None: serve on.
    idle_exit: float | None = None


def backoff(attempts: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt `attempts + 1`: exponential, capped, with jitter."""
    ceiling = min(settings.backoff_cap, settings.backoff_base * 2.0 ** max(attempts - 1, 0))
    return float(ceiling * (0.5 + 0.5 * (rng or random).random()))


def verify_blob(blobs: BlobStore, digest: str, size: int) -> None:
    """Read the blob back from the bucket: the reader checks its sha256; we check its size."""
    count = 0
    with blobs.get(digest) as reader:
        while block := reader.read(_CHUNK):
            count += len(block)
    if count != size:
        raise BlobCorrupt(f"blob {digest[:12]} holds {count} bytes, {size} were uploaded")


class Worker:
    """The blocking half: claims, uploads, verifies, purges. One catalog connection per
    Worker; the daemon has one for its upload thread and one for its control port."""

    def __init__(self, home: str, settings: Settings) -> None:
        self.home = home
        self.run_dir = os.path.join(home, "run")
        self.settings = settings
        self.backups = Backups.of_store(home)
        self.catalog: GuardCatalog = self.backups.catalog
        self.blobs = self.backups.blobs
        self._staging: dict[int, StagingDir] = {}
        self._unreachable: set[int] = set()  # guards already reported unreachable

    def close(self) -> None:
        for staging in self._staging.values():
            staging.close()
        self._staging.clear()
        self.backups.close()

    # -- staging dirs ---------------------------------------------------------------------

    def staging(self, guard_id: int) -> tuple[GuardRecord, StagingDir]:
        guard = self.catalog.guard(guard_id)
        if guard is None:
            raise StagingUnavailable(f"guard {guard_id} is not in the catalog")
        cached = self._staging.get(guard_id)
        if cached is not None:
            return guard, cached
        staging = open_staging(self.run_dir, guard)
        self._staging[guard_id] = staging
        return guard, staging

    def forget_staging(self, guard_id: int) -> None:
        staging = self._staging.pop(guard_id, None)
        if staging is not None:
            staging.close()

    def reconcile(self) -> None:
        """Repair after a crash: interrupted uploads are staged again; staging dirs that no
        guard holds are reconciled with the catalog; uploaded items are purged."""
        reset = self.catalog.reset_uploading()
        if reset:
            log.info("%d interrupted upload(s) will be retried", reset)
        for guard in self.catalog.guards():
            try:
                _, staging = self.staging(guard.id)
            except StagingUnavailable as e:
                if guard.id not in self._unreachable:  # once, not at every rescan
                    log.warning("%s", e)
                    self._unreachable.add(guard.id)
                continue
            self._unreachable.discard(guard.id)
            if staging.lock(blocking=False):
                try:
                    report = reconcile(staging, self.catalog, guard)
                finally:
                    staging.unlock()
                if report.recorded or report.missing or report.dropped_records:
                    log.info("reconciled %s: %s", os.fsdecode(guard.dir), report)
        uploaded = self.catalog.items(state=UPLOADED)
        if uploaded:
            self.purge_items(uploaded)

    # -- uploads --------------------------------------------------------------------------

    def run_once(self) -> int:
        """Process the items due now (one batch); returns how many were claimed."""
        items = self.catalog.claim_due(time.time(), self.settings.batch)
        if not items:
            return 0
        put: dict[int, tuple[GuardItem, str, int]] = {}
        batch = (self.blobs.batch() if isinstance(self.blobs, LocalBlobStore)
                 else contextlib.nullcontext())
        try:
            with batch:
                for index, item in enumerate(items):
                    try:
                        result = self._put(item)
                    except BucketUnavailable as e:  # the rest would fail the same way
                        for waiting in items[index:]:
                            self._retry(waiting, e)
                        break
                    except (BackupError, OSError) as e:
                        self._retry(item, e)
                        continue
                    if result is not None:
                        put[item.event_id] = (item, *result)
        except (BackupError, OSError) as e:  # the batch could not be published
            for item, _, _ in put.values():
                self._retry(item, e)
            return len(items)
        if put:
            _crash_point("after-put")
        done: list[tuple[int, str, int]] = []
        verified: list[GuardItem] = []
        for item, digest, size in put.values():
            try:
                verify_blob(self.blobs, digest, size)
            except (BackupError, OSError) as e:
                self._retry(item, e)
                continue
            done.append((item.event_id, digest, size))
            verified.append(item)
        if done:
            _crash_point("after-verify")
        self.catalog.mark_uploaded(done)
        if done:
            log.info("uploaded and verified %d item(s)", len(done))
            _crash_point("after-mark")
        self.purge_items(verified)
        return len(items)

    def _put(self, item: GuardItem) -> tuple[str, int] | None:
        assert item.staged_name is not None
        _, staging = self.staging(item.guard_id)
        st = staging.stat_item(item.staged_name)
        if st is None:
            self.catalog.mark_failed(item.event_id,
                                     "the staged copy vanished before it was uploaded")
            log.error("item %d: the staged copy %s vanished before it was uploaded",
                      item.event_id, item.staged_name)
            return None
        if stat.S_ISLNK(st.st_mode):
            target = staging.read_link(item.staged_name)
            return self.blobs.put(io.BytesIO(target)), len(target)
        fd = staging.open_item(item.staged_name)
        with os.fdopen(fd, "rb", buffering=0) as file:
            size = os.fstat(fd).st_size
            digest = self.blobs.put(file)
        return digest, size

    def _retry(self, item: GuardItem, error: Exception) -> None:
        delay = backoff(item.attempts, self.settings)
        message = str(error) if isinstance(error, BackupError) else f"{error!r}"
        if isinstance(error, (StagingUnavailable, OSError)):
            self.forget_staging(item.guard_id)
        self.catalog.mark_retry(item.event_id, message, time.time() + delay)
        log.warning("item %d (attempt %d) failed, retry in %.1f s: %s",
                    item.event_id, item.attempts, delay, message)

    # -- purging --------------------------------------------------------------------------

    def purge_items(self, items: list[GuardItem]) -> None:
        """Remove the staged copies of uploaded, verified items; then mark them purged."""
        purged: list[int] = []
        for item in items:
            if item.staged_name is None:
                continue
            try:
                _, staging = self.staging(item.guard_id)
                staging.discard(item.staged_name)
            except (StagingUnavailable, OSError) as e:
                log.warning("item %d: staged copy not removed yet: %s", item.event_id, e)
                self.forget_staging(item.guard_id)
                continue
            purged.append(item.event_id)
        if purged:
            _crash_point("after-purge")
        self.catalog.mark_purged(purged)

    def purge(self, event_id: int) -> str | None:
        """The `D` message: purge one item by id. Returns why not, or None when done."""
        item = self.catalog.item(event_id)
        if item is None:
            return f"no guard item with id {event_id}"
        if item.state != UPLOADED:
            return (f"item {event_id} is {item.state}, not uploaded and verified; "
                    "its staged copy stays")
        self.purge_items([item])
        return None

    def store_gone(self) -> bool:
        return not os.path.isdir(self.home)

    def idle(self) -> bool:
        """Nothing staged or being uploaded, and no guard alive to stage more."""
        counts = self.catalog.counts()
        if counts.get(STAGED) or counts.get(UPLOADING):
            return False
        run_dir = os.path.join(self.home, "run")
        return not any(running_guard_pid(run_dir, guard.id) for guard in self.catalog.guards())

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "bucket": self.backups.bucket.describe(),
            "counts": self.catalog.counts(),
            "next_attempt_at": self.catalog.next_due(),
        }


# -- the daemon ---------------------------------------------------------------------------------


class AlreadyRunning(BackupError):
    pass


@contextlib.contextmanager
def pid_lock(run_dir: str) -> Iterator[None]:
    """Hold run/backupd.pid (flock) while the daemon runs: one daemon per store."""
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    path = os.path.join(run_dir, PID_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise AlreadyRunning(f"backupd already runs for this store (pid {other})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def running_pid(run_dir: str) -> int | None:
    """The pid of this store's backupd, or None when none runs."""
    path = os.path.join(run_dir, PID_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        return None
    finally:
        os.close(fd)


class Daemon:
    def __init__(self, home: str, settings: Settings) -> None:
        self.home = home
        self.settings = settings
        self.run_dir = os.path.join(home, "run")
        self.socket_path = os.path.join(self.run_dir, SOCKET_NAME)
        self._wake = threading.Event()
        self._stop = threading.Event()

    def run(self, once: bool = False, on_ready: Callable[[], None] | None = None) -> None:
        with pid_lock(self.run_dir):
            worker = Worker(self.home, self.settings)
            try:
                worker.reconcile()
                if once:
                    while worker.run_once():
                        pass
                    return
                trio.run(self._main, worker, on_ready)
            finally:
                worker.close()

    async def _main(self, worker: Worker, on_ready: Callable[[], None] | None) -> None:
        control = Worker(self.home, self.settings)  # its own catalog connection
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, self.socket_path, self._handler(control))
                nursery.start_soon(self._stop_on_signal, nursery.cancel_scope)
                if on_ready is not None:
                    on_ready()
                log.info("backupd %d serving %s, bucket %s", os.getpid(), self.socket_path,
                         worker.backups.bucket.describe())
                await trio.to_thread.run_sync(self._work, worker)
                nursery.cancel_scope.cancel()
        finally:
            control.close()
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)

    def _work(self, worker: Worker) -> None:
        """The upload loop (a thread): process what is due; sleep until woken, until the next
        retry is due, or until the next rescan. Started on demand, it ends once it has had
        nothing to do for `idle_exit` seconds."""
        last_rescan = time.monotonic()
        idle_since: float | None = None
        while not self._stop.is_set():
            try:
                if worker.run_once():
                    idle_since = None
                    continue
                if time.monotonic() - last_rescan >= self.settings.rescan_interval:
                    worker.reconcile()
                    last_rescan = time.monotonic()
                    continue
                due = worker.catalog.next_due()
                wait = self.settings.rescan_interval - (time.monotonic() - last_rescan)
                if due is not None:
                    wait = min(wait, max(due - time.time(), 0.0) + 0.01)
                if self.settings.idle_exit is not None:
                    if worker.store_gone():
                        log.info("backupd: the store is gone; exiting")
                        return
                    idle_since = (idle_since or time.monotonic()) if worker.idle() else None
                    left = self.settings.idle_exit
                    if idle_since is not None:
                        left -= time.monotonic() - idle_since
                        if left <= 0:
                            log.info("backupd: no guard runs and nothing is staged; exiting")
                            return
                    wait = min(wait, max(left, 0.1))  # to look again
            except Exception:  # never die: log, wait a little, go on
                log.exception("backupd: upload loop error")
                wait = 1.0
            self._wake.wait(max(wait, 0.0))
            self._wake.clear()

    async def _stop_on_signal(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("backupd: signal %d, finishing the current item and stopping", signum)
                self._stop.set()
                self._wake.set()
                return

    def _handler(self, control: Worker) -> Callable[[Frame, PeerCred], Any]:
        async def handle(frame: Frame, peer: PeerCred) -> Frame:
            return self.answer(control, frame)

        return handle

    def answer(self, control: Worker, frame: Frame) -> Frame:
        body = frame.body
        if frame.code is Code.BACKUP:
            self._wake.set()
            return Frame(Code.ACK)
        if frame.code is Code.SKIP:
            path, reason = body.get("path"), body.get("reason")
            if not isinstance(path, str) or not isinstance(reason, str):
                return error_frame("skip needs a path and a reason (strings)")
            log.info("skipped (not backed up): %s: %s", path[:4096], reason[:512])
            return Frame(Code.ACK)
        if frame.code is Code.PURGE:
            event_id = body.get("id")
            if set(body) != {"id"} or not isinstance(event_id, int) or isinstance(
                    event_id, bool):
                return error_frame("purge takes one item id (an integer) and nothing else")
            problem = control.purge(event_id)
            if problem is not None:
                return error_frame(problem)
            return Frame(Code.ACK, {"purged": event_id})
        if frame.code is Code.QUERY:
            return Frame(Code.ACK, control.status())
        return error_frame(f"backupd does not handle {frame.code.name} frames")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="backupd[%(process)d] %(asctime)s %(levelname)s %(message)s",
    )


def ensure_running(home: str, args: tuple[str, ...] = (), timeout: float = 15.0) -> int:
    """Start this store's backupd in the background unless one runs; return its pid. Started
    so, it exits once no guard runs and nothing is left to upload (`IDLE_EXIT_ENV` seconds
    later, default IDLE_EXIT)."""
    args = ("--exit-when-idle", os.environ.get(IDLE_EXIT_ENV, str(IDLE_EXIT)), *args)
    import subprocess
    import sys

    run_dir = os.path.join(home, "run")
    pid = running_pid(run_dir)
    if pid is not None:
        return pid
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(run_dir, LOG_NAME)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "isolated_agent", "backupd", *args,
             "--ready-fd", str(write_end)],
            env={**os.environ, "ISOLATED_AGENT_HOME": home}, pass_fds=(write_end,),
            stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, start_new_session=True,
            cwd="/",  # the caller's cwd may be in a guarded dir: held, it would bypass the guard
        )
    finally:
        os.close(log_fd)
        os.close(write_end)
    report = read_report(read_end, "backupd exited at once", timeout)
    if report.ok:
        return process.pid
    if process.poll() is None:  # no answer in time: do not leave it half-started
        process.kill()
    process.wait()
    pid = running_pid(run_dir)  # lost a race with another starter: fine
    if pid is not None:
        return pid
    raise BackupError(f"{report.detail} (status {process.returncode}); see {log_path}")
