"""The guard daemon's life: check DIR, open it, mount over it, serve, unmount.

    agentctl guard start DIR
      check DIR (a directory, not /, not overlapping the store, not in or over another guard)
      -> a dead guard mount at DIR (its daemon was killed) is detached first
      -> open DIR and its staging dir (fds, before the mount), register the guard
      -> fork the daemon: setsid, log to run/guard-<id>.log, take the staging lock, reconcile
         staging with the catalog, mount FUSE over DIR, write run/guard-<id>.json (pid and the
         fd number of the staging dir, for the backup daemon), report "ok" to the parent
      -> serve until SIGTERM/SIGINT/SIGHUP (then unmount) or until someone unmounts it.
    agentctl guard stop DIR
      SIGTERM to the daemon, wait for it; a mount left behind (dead daemon) is detached.

While the daemon is being killed or is dead, DIR answers ENOTCONN: nothing can delete there,
so nothing is lost; `guard start DIR` brings it back (and reconciles), `guard stop` removes
the dead mount. A root guard mounts with allow_other so every user keeps using DIR; a user's
guard serves that user only (FUSE's default; allow_other needs user_allow_other in
/etc/fuse.conf).

What reaches DIR without the mount bypasses the guard (bypass.py): descriptors, working or
root directories taken under DIR before the mount, hard links outside DIR, bind mounts of DIR's
filesystem. `start` reports each it can find.

The daemon's state file (run/guard-<id>.json) says when the guard was last known mounted:
`seen`, rewritten every HEARTBEAT_INTERVAL while the mount is in place at DIR. When the mount
goes away other than by `guard stop` (someone's `umount`, `umount -l`, a signal), the daemon
writes `lost` {since, noticed, cause} and ends; killed, it writes nothing, and `seen` stays.
`guard stop` removes the file once its daemon is gone. So a state file with no guard mount at
DIR means: deletes may have gone unguarded since then (`guard status` state "lost"); the next
`start` reports that gap and keeps it, closed, in its own state (`gaps`, the last MAX_GAPS).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import pyfuse3
import trio  # type: ignore[import-untyped]

from isolated_agent.backup import Backups
from isolated_agent.backup.catalog import GuardCatalog, GuardRecord
from isolated_agent.backup.staging import (
    STAGING_NAME,
    StagingDir,
    read_state,
    reconcile,
    running_guard_pid,
    state_path,
)
from isolated_agent.env.store import is_within
from isolated_agent.errors import GuardError
from isolated_agent.fusefs import fastloop
from isolated_agent.fusefs.adapter import Adapter, FuseKernel
from isolated_agent.fusefs.mount import (
    NotMounted,
    UnmountFailed,
    mount_entry,
    unmount,
    wait_exited,
)
from isolated_agent.fusefs.replies import handle_free_supported
from isolated_agent.fusefs.serve import run_trio, serve_session
from isolated_agent.guard.bypass import (
    Gap,
    Holder,
    OutsideLinks,
    holders,
    open_gap,
    other_views,
    outside_links,
    past_gaps,
)
from isolated_agent.guard.fs import GuardFileSystem
from isolated_agent.guard.policy import Policy
from isolated_agent.guard.stage import Stager
from isolated_agent.protocol.client import ControlError, request
from isolated_agent.protocol.frames import Code, Frame
from isolated_agent.system.daemon import (
    DaemonFailed,
    Reporter,
    fork_daemon,
    raise_fd_limit,
)
from isolated_agent.system.durable import process_alive
from isolated_agent.system.mountinfo import MountEntry, read_mountinfo

log = logging.getLogger("guard")

FSTYPE = "fuse.isolated-agent-guard"
FLUSH_INTERVAL = 1.0  # seconds between group flushes of what was staged (unless --sync)
ROW_INTERVAL = 0.02  # seconds at most before a staged item's catalog row is committed
HEARTBEAT_INTERVAL = 2.0  # seconds between checks that the mount is still at DIR
MAX_GAPS = 10  # closed gaps kept in a guard's state file


@dataclass(frozen=True)
class GuardConfig:
    directory: str
    policy: Policy = Policy()
    sync: bool = False


@dataclass(frozen=True)
class Started:
    guard_id: int
    directory: str
    pid: int
    recovered: bool  # a dead guard mount was there and was replaced
    # processes holding directories or files under DIR from before the mount: they bypass it
    holders: tuple[Holder, ...] = ()
    outside_links: OutsideLinks | None = None  # files with hard links outside DIR
    other_views: tuple[str, ...] = ()  # where else DIR's files are reachable (bind mounts)
    gap: Gap | None = None  # the previous guard's mount vanished without `guard stop`


def is_dead(directory: str) -> bool:
    """Is the FUSE mount at `directory` without its daemon? statfs always asks the daemon
    (a stat may be answered from the kernel's attribute cache even after it died)."""
    try:
        os.statvfs(directory)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def guard_mounts() -> list[str]:
    return [e.mount_point for e in read_mountinfo() if e.fstype == FSTYPE]


def check_directory(home: str, given: str) -> str:
    directory = os.path.realpath(given)
    if not os.path.isdir(directory):
        raise GuardError(f"{given}: not a directory")
    if directory == "/":
        raise GuardError("cannot guard / (guard the directories you care about)")
    home = os.path.realpath(home)
    if is_within(directory, home) or is_within(home, directory):
        raise GuardError(
            f"{directory} overlaps the store {home}: the guard would stage its own catalog; "
            "set ISOLATED_AGENT_HOME outside it")
    for mounted in guard_mounts():
        overlaps = is_within(directory, mounted) or is_within(mounted, directory)
        if mounted != directory and overlaps:
            raise GuardError(f"{directory} is inside or over the guarded directory {mounted}; "
                             "guard one or the other")
    return directory


def start(home: str, config: GuardConfig, debug: bool = False) -> Started:
    """Mount the guard over `config.directory`; return once it serves."""
    directory = os.path.realpath(config.directory)
    recovered = False
    if _is_guard_mount(directory):
        if not is_dead(directory):
            raise GuardError(f"{directory} is guarded already; `agentctl guard status` shows it")
        _detach(directory)  # its daemon died: DIR answers ENOTCONN until this
        recovered = True
    directory = check_directory(home, directory)
    run_dir = os.path.join(home, "run")
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    staging_path = os.path.join(directory, os.fsdecode(STAGING_NAME))
    # Before the mount, from below it: what will bypass the guard once it is there.
    found_holders = tuple(holders(directory, ignore=(staging_path,)))
    links = outside_links(directory, skip=(staging_path,))
    views = tuple(other_views(directory, FSTYPE))
    root_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        staging = StagingDir.create_in(root_fd)
    except BaseException:
        os.close(root_fd)
        raise
    try:
        backups = Backups.of_store(home)
        try:
            dev, ino = staging.identity()
            guard_id = backups.catalog.register_guard(
                os.fsencode(directory), os.fsencode(directory) + b"/" + STAGING_NAME, dev, ino)
        finally:
            backups.close()
        # A state file left without a guard mount at DIR: the mount vanished without `guard
        # stop`. Not so for a dead mount just detached: it answered ENOTCONN to everyone.
        previous = read_state(run_dir, guard_id)
        _refuse_if_moved(directory, previous)
        gap = None
        if previous is not None and not recovered:
            old_pid = previous.get("pid")
            alive = isinstance(old_pid, int) and process_alive(old_pid)
            gap = open_gap(previous, daemon_alive=alive)
        gaps = [] if previous is None else past_gaps(previous)

        def daemon(reporter: Reporter) -> int:
            return _daemon(home, config, directory, guard_id, root_fd, staging, reporter, debug,
                           gap, gaps)

        try:
            pid, report = fork_daemon(daemon, os.path.join(run_dir, f"guard-{guard_id}.log"),
                                      "the guard", expected=(GuardError,))
        except DaemonFailed as e:
            raise GuardError(str(e)) from None
    finally:
        staging.close()
        os.close(root_fd)
    if gap is not None:  # closed when the new mount was in place (the daemon says when)
        with contextlib.suppress(ValueError):
            gap = Gap(gap.since, float(report.detail), gap.cause)
    return Started(guard_id, directory, pid, recovered, found_holders, links, views, gap)


def _refuse_if_moved(directory: str, previous: dict[str, object] | None) -> None:
    """Its guard went along with a renamed parent of DIR and still serves there: one guard
    per directory record (and state file) at a time."""
    if previous is None:
        return
    pid, moved_to = previous.get("pid"), previous.get("moved_to")
    if (isinstance(pid, int) and process_alive(pid) and isinstance(moved_to, str)
            and _is_guard_mount(moved_to)):
        raise GuardError(f"the guard of {directory} moved to {moved_to} with a renamed parent "
                         f"and still serves there; `agentctl guard stop {directory}` first")


def _daemon(home: str, config: GuardConfig, directory: str, guard_id: int, root_fd: int,
            staging: StagingDir, reporter: Reporter, debug: bool, gap: Gap | None,
            gaps: list[Gap]) -> int:
    """The forked guard daemon's life (`fork_daemon` detached it and reports its failure)."""
    run_dir = os.path.join(home, "run")
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="guard[%(process)d] %(asctime)s %(levelname)s %(message)s")
    os.umask(0)  # modes arrive from the kernel already masked with the caller's umask
    raise_fd_limit()
    staging.lock(blocking=True)
    catalog = GuardCatalog(os.path.join(home, "backup", "catalog.sqlite"),
                           durable=config.sync)
    guard = catalog.guard(guard_id)
    assert guard is not None
    report = reconcile(staging, catalog, guard)
    log.info("guard of %s: reconciled staging: %s", directory, report)
    notifier = Notifier(os.path.join(run_dir, "backupd.sock"))
    stager = Stager(staging, catalog, guard, config.policy, config.sync,
                    wake=notifier.backup, skipped=notifier.skip,
                    defer_rows=not config.sync)
    model = GuardFileSystem(root_fd, os.fsencode(directory), stager, FuseKernel(),
                            handle_free=handle_free_supported())
    operations = Adapter(model)
    options = {"default_permissions", "fsname=isolated-agent-guard",
               "subtype=isolated-agent-guard"}
    if os.geteuid() == 0:
        options.add("allow_other")
    try:
        pyfuse3.init(operations, directory, options)
    except RuntimeError as e:
        raise GuardError(f"cannot mount the guard over {directory}: {e}") from None
    fastloop.install()  # agentfs's wait for the next request: no trio round per request
    mounted_at = time.time()
    if gap is not None:
        gap = Gap(gap.since, mounted_at, gap.cause)
        log.warning("guard of %s: %s", directory, gap.describe(directory))
        gaps = [*gaps, gap]
    state = GuardState(run_dir, guard, staging, config, gaps[-MAX_GAPS:])
    try:
        state.write()
        reporter.ready(repr(mounted_at))
        log.info("guarding %s (pid %d)", directory, os.getpid())
        run_trio(serve_session, operations, None, _tasks(model, catalog, state))
    finally:
        operations.close()
        # Where the mount is no longer at DIR, whatever is there now (nothing, or the
        # next guard) is not ours to unmount: only the session is closed. Moved with a
        # parent of DIR, it is unmounted where it is now.
        where = None if state.lost is not None else state.where()
        if state.lost is None:
            state.ended(where is not None)
        if where is not None and where != directory:
            with contextlib.suppress(NotMounted, UnmountFailed):
                unmount(where, lazy=True)
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=where == directory)
        stager.flush_rows()
        notifier.stop()
        with contextlib.suppress(OSError):
            mark = stager.journal_mark()
            _flush(stager, catalog)
            stager.staging.clear_journal(mark)
        catalog.close()
        log.info("guard of %s ended", directory)
    return 0


def _tasks(guard: GuardFileSystem, catalog: GuardCatalog,
           state: GuardState) -> list[Callable[[], Awaitable[None]]]:
    """What the guard daemon does beside serving requests."""
    stager = guard.stager
    tasks: list[Callable[[], Awaitable[None]]] = [functools.partial(_heartbeat, state)]
    if guard.behind is not None:
        tasks.append(functools.partial(_follow_changes_behind, guard))
    tasks.append(functools.partial(_flush_periodically, stager, catalog))
    if stager.defer_rows:
        tasks.append(functools.partial(_commit_rows_periodically, stager))
    return tasks


async def _follow_changes_behind(guard: GuardFileSystem) -> None:
    """Whenever inotify has news of a change made behind the mount, between two requests:
    the kernel forgets what it cached of it (fs.py's cache contract, behind.py)."""
    assert guard.behind is not None
    while True:
        await trio.lowlevel.wait_readable(guard.behind.fd)
        guard.invalidate_behind()


async def _commit_rows_periodically(stager: Stager) -> None:
    """Deferred catalog rows are committed within ROW_INTERVAL of their operation (in the
    FUSE thread, between requests: the Stager is never used by two at once)."""
    while True:
        await trio.sleep(ROW_INTERVAL)
        stager.flush_rows()


async def _flush_periodically(stager: Stager, catalog: GuardCatalog) -> None:
    """Group durability: what was staged since the last round reaches the disk together
    (the staging filesystem and the catalog's), at most FLUSH_INTERVAL after the reply (with
    --sync, each item already did before it). Then the journal's records, whose rows are on
    disk now, are dropped."""
    while True:
        await trio.sleep(FLUSH_INTERVAL)
        mark = stager.journal_mark()
        if not stager.dirty and not mark:
            continue
        if not stager.sync:
            stager.dirty = False
            try:
                await trio.to_thread.run_sync(_flush, stager, catalog)
            except OSError as e:
                log.error("guard: flushing staged items failed: %s", e)
                stager.dirty = True
                continue
        try:
            stager.staging.clear_journal(mark)  # unless records came meanwhile
        except OSError as e:
            log.error("guard: emptying the staging journal failed: %s", e)


def _flush(stager: Stager, catalog: GuardCatalog) -> None:
    stager.staging.flush()
    catalog.sync()


async def _heartbeat(state: GuardState) -> None:
    """Every HEARTBEAT_INTERVAL: is the mount still at DIR? Yes: say so (`seen`). No (an
    `umount -l` while processes still held it, so the session goes on): record the loss and
    end the session, so that those processes get ENOTCONN and the next `guard start` can
    take the staging lock."""
    while True:
        await trio.sleep(HEARTBEAT_INTERVAL)
        where = await trio.to_thread.run_sync(state.where)
        if where is None:
            await trio.to_thread.run_sync(
                state.record_lost, f"its mount at {state.directory} was removed while the "
                "guard daemon ran (umount -l?)")
            log.warning("guard: the mount at %s is gone; ending", state.directory)
            pyfuse3.terminate()
            return
        if where != state.directory and state.data.get("moved_to") != where:
            # A parent of DIR was renamed: the files are still guarded, at their new path.
            log.warning("guard: the mount of %s moved to %s", state.directory, where)
            state.data["moved_to"] = where
        try:
            await trio.to_thread.run_sync(state.beat)
        except OSError as e:
            log.error("guard: cannot write the heartbeat: %s", e)


class GuardState:
    """The daemon's state file, run/guard-<id>.json (see the module docstring): written
    temp -> fsync -> rename, so a reader sees the old or the new version, never a mix."""

    def __init__(self, run_dir: str, guard: GuardRecord, staging: StagingDir,
                 config: GuardConfig, gaps: list[Gap]) -> None:
        self.path = state_path(run_dir, guard.id)
        self.directory = os.fsdecode(guard.dir)
        entry = _guard_entry(self.directory)
        # The mount's device tells ours from another mount at the same path later.
        self.device = None if entry is None else entry.device
        now = time.time()
        self.data: dict[str, Any] = {
            "pid": os.getpid(), "staging_fd": staging.fd, "dir": self.directory,
            "started": now, "seen": now, "mount": self.device, "sync": config.sync,
            "policy": asdict(config.policy), "gaps": [g.as_json() for g in gaps]}
        self.lost: dict[str, Any] | None = None

    def where(self) -> str | None:
        """Where this guard's mount is in this namespace: DIR, a new path (a parent of DIR
        was renamed), or None (unmounted, or detached by `umount -l`)."""
        if self.device is None:  # not found at the start: judge by the path alone
            return self.directory if _is_guard_mount(self.directory) else None
        places = [e.mount_point for e in read_mountinfo()
                  if e.device == self.device and e.fstype == FSTYPE]
        if self.directory in places or not places:
            return self.directory if places else None
        return places[-1]

    def beat(self) -> None:
        self.data["seen"] = time.time()
        self.write()

    def record_lost(self, cause: str) -> None:
        # Since the last time it was seen in place: it went away at some point after that.
        self.lost = {"since": self.data["seen"], "noticed": time.time(), "cause": cause}
        self.data["lost"] = self.lost
        with contextlib.suppress(OSError):
            self.write()

    def ended(self, still_here: bool) -> None:
        """The session ended without the heartbeat noticing a loss: by a signal (the mount is
        still here, about to be unmounted: `guard stop` removes this record next) or because
        someone unmounted it (the kernel ended the session)."""
        if still_here:
            self.lost = {"since": time.time(), "noticed": time.time(),
                         "cause": f"the guard daemon (pid {os.getpid()}) was stopped by a "
                                  "signal, not by `guard stop`"}
        else:
            self.lost = {"since": self.data["seen"], "noticed": time.time(),
                         "cause": f"its mount at {self.directory} was unmounted without "
                                  "`guard stop`"}
        self.data["lost"] = self.lost
        with contextlib.suppress(OSError):
            self.write()

    def write(self) -> None:
        temp = f"{self.path}.{os.getpid()}.tmp"
        with open(temp, "w") as f:
            json.dump(self.data, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, self.path)


class Notifier:
    """Wakes the backup daemon: coalesced messages from a thread of their own, so a FUSE
    request never waits on the socket. Losing one is harmless: the catalog is the truth."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._lock = threading.Lock()
        self._ids: list[int] = []
        self._skips: list[tuple[str, str]] = []
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
        self._thread.start()

    def backup(self, event_id: int) -> None:
        with self._lock:
            self._ids.append(event_id)
        self._wake.set()

    def skip(self, path: bytes, reason: str) -> None:
        log.info("not backed up: %s: %s", os.fsdecode(path), reason)
        with self._lock:
            self._skips.append((os.fsdecode(path).encode("utf-8", "replace").decode(), reason))
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            time.sleep(0.02)  # let a burst (rm -rf) gather into one message
            with self._lock:
                ids, self._ids = self._ids, []
                skips, self._skips = self._skips[:100], []
            try:
                if ids:
                    request(self.socket_path, Frame(Code.BACKUP, {"ids": ids[-1000:]}), 2.0)
                for path, reason in skips:
                    request(self.socket_path, Frame(Code.SKIP, {"path": path, "reason": reason}),
                            2.0)
            except ControlError:
                pass  # not running: it finds the items in the catalog when it starts


def _detach(directory: str) -> None:
    try:
        unmount(directory, lazy=True)
    except NotMounted:
        pass
    except UnmountFailed as e:
        raise GuardError(str(e)) from None


# -- stop and status ----------------------------------------------------------------------------


def find_guard(catalog: GuardCatalog, given: str) -> GuardRecord:
    directory = os.fsencode(os.path.realpath(given))
    for guard in catalog.guards():
        if guard.dir == directory:
            return guard
    raise GuardError(f"{given} is not guarded; `agentctl guard status` lists what is")


@dataclass(frozen=True)
class Stopped:
    guard: GuardRecord
    gap: Gap | None  # it had lost its mount already: deletes may have gone unguarded


def stop(home: str, given: str, timeout: float = 15.0) -> Stopped:
    """Stop the guard of a directory: its daemon unmounts and exits; a dead mount is
    detached; the record of a lost one is cleared. Staged items stay for the backup daemon."""
    backups = Backups.of_store(home)
    try:
        guard = find_guard(backups.catalog, given)
    finally:
        backups.close()
    directory = os.fsdecode(guard.dir)
    run_dir = os.path.join(home, "run")
    state = read_state(run_dir, guard.id)
    entry = _guard_entry(directory)
    mounted = entry is not None
    pid = running_guard_pid(run_dir, guard.id)
    moved = state is not None and isinstance(state.get("moved_to"), str) and pid is not None
    gap = None
    if state is not None and not mounted and not moved:
        gap = open_gap(state, daemon_alive=pid is not None)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_exited(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_exited(pid, 5)
    if mounted and mount_entry(directory) == entry:
        _detach(directory)
    with contextlib.suppress(OSError):
        os.unlink(state_path(run_dir, guard.id))
    if pid is None and not mounted and gap is None:
        raise GuardError(f"{directory} is not guarded now (no guard runs there)")
    return Stopped(guard, gap)


def _guard_entry(path: str) -> MountEntry | None:
    """The guard mount at `path`, if a guard's is there."""
    entry = mount_entry(path)
    return entry if entry is not None and entry.fstype == FSTYPE else None


def _is_guard_mount(path: str) -> bool:
    return _guard_entry(path) is not None


def guard_status(home: str, catalog: GuardCatalog, guard: GuardRecord) -> dict[str, Any]:
    """One guard: "guarded", "dead" (its daemon is gone, DIR answers ENOTCONN: nothing can
    be deleted), "lost" (the mount vanished without `guard stop`: `unguarded` says since when
    deletes may have gone unguarded) or "stopped"."""
    directory = os.fsdecode(guard.dir)
    run_dir = os.path.join(home, "run")
    state = read_state(run_dir, guard.id)
    pid = running_guard_pid(run_dir, guard.id)
    mounted = _is_guard_mount(directory)
    gap = None
    moved_to = None if state is None else state.get("moved_to")
    if mounted and pid is not None and not is_dead(directory):
        condition = "guarded"
    elif mounted:
        condition = "dead"  # ENOTCONN until `guard start` or `guard stop`
    elif pid is not None and isinstance(moved_to, str) and _is_guard_mount(moved_to):
        condition = "moved"  # with a renamed parent: its files are guarded at `moved_to`
    elif state is not None:
        condition = "lost"
        gap = open_gap(state, daemon_alive=pid is not None)
    else:
        condition = "stopped"
    state = state or {}
    started = state.get("started") if condition in ("guarded", "moved") else None
    return {
        "id": guard.id, "dir": directory, "state": condition,
        "moved_to": moved_to if condition == "moved" else None,
        "pid": pid if condition in ("guarded", "moved") else None,
        "started": started, "seen": state.get("seen"), "staging": os.fsdecode(guard.staging),
        "policy": state.get("policy"), "counts": catalog.counts(guard.id),
        "unguarded": None if gap is None else gap.as_json(),
        "gaps": [g.as_json() for g in past_gaps(state)],
        "other_views": other_views(directory, FSTYPE) if condition == "guarded" else [],
    }
