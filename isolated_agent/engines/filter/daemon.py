"""The filter daemon: agentfs mounted in place over one managed root, plus its control port.

Life of a daemon (one per root):

    open the root (an fd, before anything covers it)  ->  mount agentfs over the root
    ->  bind the control socket, write the record  ->  ready
    ->  serve FUSE requests and control requests (one trio loop, one thread: the file system
        and the registrations never change under each other)
    ->  SIGTERM, or idle (started on demand, no job for IDLE_SECONDS): unmount, remove the
        record and the socket, exit

The control port (DESIGN §8) takes REGISTER_ENV / UNREGISTER_ENV, REGISTER_JOB /
UNREGISTER_JOB and QUERY from the user who started it (or root) — never from a process that is
in a job, whether the kernel engine's or ours (`Identity`). A job whose processes are all gone
(its launcher was killed before it could unregister) is dropped by a periodic sweep.

The record (`records.py`) names the root, the pid, the socket and the log: `filter status`,
`filter stop` and `run` find daemons through it. `control.start_background` starts a daemon as
`python -m isolated_agent.engines.filter`, which runs `daemon_main` here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pyfuse3
import trio  # type: ignore[import-untyped]

from isolated_agent.engines.filter.fs import FilterFileSystem
from isolated_agent.engines.filter.identity import Identity, JobRecord, Unclassifiable, start_time
from isolated_agent.engines.filter.records import (
    FilterRecord,
    record_path,
    socket_path,
    write_record,
)
from isolated_agent.engines.fuse.daemon import MountFailed, fault_hook_from_env, setup_logging
from isolated_agent.fusefs import fastloop
from isolated_agent.fusefs.adapter import Adapter, FuseKernel
from isolated_agent.fusefs.replies import listing_cache_supported
from isolated_agent.fusefs.serve import run_trio, serve_session
from isolated_agent.protocol.frames import Code, Frame, error_frame
from isolated_agent.protocol.peer import PeerCred, refusal
from isolated_agent.protocol.server import serve as serve_control
from isolated_agent.system.daemon import Reporter, become_daemon, raise_fd_limit

log = logging.getLogger("agentfs.filter")

# An on-demand daemon with no job for this long stops (the variable is for tests).
IDLE_SECONDS = float(os.environ.get("ISOLATED_AGENT_FILTER_IDLE", "30"))
SWEEP_SECONDS = 2.0


class FilterDaemon:
    """The state behind the control port: which envs and jobs the file system serves."""

    def __init__(self, root: str, views: FilterFileSystem, operations: Adapter,
                 identity: Identity, on_demand: bool) -> None:
        self.root = root
        self.views = views
        self.operations = operations
        self.identity = identity
        self.on_demand = on_demand
        self.env_jobs: dict[str, set[str]] = {}  # env id -> its registered jobs
        self.pinned: set[str] = set()  # envs registered on their own (REGISTER_ENV)
        self.idle_since = time.monotonic()

    def refuse(self, peer: PeerCred) -> str | None:
        reason = refusal(peer)
        if reason is not None:
            return reason
        try:
            if self.identity.view_of(peer.pid) is not None:
                return "processes inside a job may not use the control port"
        except Unclassifiable:
            return "the caller could not be identified"
        return None

    async def handle(self, frame: Frame, peer: PeerCred) -> Frame:
        body = frame.body
        if frame.code is Code.QUERY:
            return Frame(Code.ACK, self.describe())
        if frame.code is Code.REGISTER_ENV:
            self._add_env(body)
            self.pinned.add(str(body["env"]))
            return Frame(Code.ACK)
        if frame.code is Code.UNREGISTER_ENV:
            env = str(body["env"])
            self.pinned.discard(env)
            if self.env_jobs.get(env):
                return error_frame(f"env {env} still has running jobs here")
            self._drop_env(env)
            return Frame(Code.ACK)
        if frame.code is Code.REGISTER_JOB:
            self._add_env(body)
            job = JobRecord(
                job_id=str(body["job"]),
                view=str(body["env"]),
                cgroup=body.get("cgroup"),
                anchor=_anchor(body.get("anchor")),
            )
            self.identity.register(job)
            self.env_jobs.setdefault(job.view, set()).add(job.job_id)
            return Frame(Code.ACK)
        if frame.code is Code.UNREGISTER_JOB:
            self._drop_job(str(body["job"]))
            return Frame(Code.ACK)
        return error_frame(f"the filter daemon does not take {frame.code.name}")

    def describe(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "pid": os.getpid(),
            "envs": sorted(set(self.env_jobs) | self.pinned),
            "jobs": [asdict(job) for job in self.identity.jobs()],
        }

    def _add_env(self, body: dict[str, Any]) -> None:
        env, upper, work = str(body["env"]), str(body["upper"]), str(body["work"])
        layers = [str(path) for path in body.get("layers", [])]
        for path in (upper, work, *layers):
            if not os.path.isabs(path) or os.path.commonpath([path, self.root]) == self.root:
                raise ValueError(f"{path} must be an absolute path outside {self.root}")
        self.views.add_env(env, upper, work, layers)
        self.env_jobs.setdefault(env, set())

    def _drop_job(self, job_id: str) -> None:
        self.identity.unregister(job_id)
        for env, jobs in list(self.env_jobs.items()):
            jobs.discard(job_id)
            if not jobs and env not in self.pinned:
                self._drop_env(env)

    def _drop_env(self, env: str) -> None:
        self.env_jobs.pop(env, None)
        self.views.remove_env(env)
        if not self.env_jobs:
            self.idle_since = time.monotonic()

    def sweep(self) -> None:
        """Drop jobs none of whose processes is left (a launcher killed before it could
        unregister): their cgroup is gone or empty and their anchor is dead."""
        for job in self.identity.jobs():
            if not _job_alive(job):
                log.info("job %s ended without unregistering; dropped", job.job_id)
                self._drop_job(job.job_id)

    def idle(self) -> bool:
        return (self.on_demand and not self.env_jobs
                and time.monotonic() - self.idle_since > IDLE_SECONDS)


def _anchor(value: Any) -> tuple[int, int] | None:
    if not value:
        return None
    pid, started = value
    return int(pid), int(started)


def _job_alive(job: JobRecord) -> bool:
    if job.anchor is not None:
        pid, started = job.anchor
        with contextlib.suppress(OSError, ValueError):
            if start_time(pid) == started:
                return True
    if job.cgroup is not None:
        from isolated_agent.system.cgroup import v2_mount_point

        mount = v2_mount_point()
        if mount is not None:
            procs = os.path.join(mount, job.cgroup.lstrip("/"), "cgroup.procs")
            with contextlib.suppress(OSError), open(procs) as f:
                return bool(f.read().strip())
    return False


def serve(root: str, run_dir: str, log_path: str, on_demand: bool,
          on_ready: Callable[[], None] | None = None) -> None:
    """Mount over `root` and serve until stopped. Raises MountFailed when it cannot mount."""
    os.umask(0)  # modes arrive from the kernel already masked with the caller's umask
    raise_fd_limit()  # before the overlays size their fd caches on it
    try:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise MountFailed(f"cannot open {root}: {e.strerror}") from None
    identity = Identity()
    views = FilterFileSystem(root_fd, identity, FuseKernel(), fault_hook_from_env(),
                             keep_listings=listing_cache_supported())
    operations = Adapter(views)
    daemon = FilterDaemon(root, views, operations, identity, on_demand)
    options = {"default_permissions", "fsname=agentfs-filter", "subtype=agentfs"}
    if os.geteuid() == 0 or _user_allow_other():
        options.add("allow_other")  # every user keeps reaching the project, as before
    try:
        pyfuse3.init(operations, root, options)
    except RuntimeError as e:
        operations.close()
        raise MountFailed(f"cannot mount the filter over {root}: {e}") from None
    record = FilterRecord(root, os.getpid(), socket_path(run_dir, root), log_path, on_demand)
    try:
        fastloop.install()
        run_trio(_main, daemon, record, record_path(run_dir, root), on_ready)
    finally:
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
        operations.close()
        with contextlib.suppress(OSError):
            os.close(root_fd)
        for path in (record_path(run_dir, root), record.socket):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _user_allow_other() -> bool:
    with contextlib.suppress(OSError), open("/etc/fuse.conf") as f:
        return any(line.strip() == "user_allow_other" for line in f)
    return False


async def _main(daemon: FilterDaemon, record: FilterRecord, record_file: str,
                on_ready: Callable[[], None] | None) -> None:
    async with trio.open_nursery() as nursery:  # the control port lives as long as the mount
        await nursery.start(serve_control, record.socket, daemon.handle, daemon.refuse)
        write_record(record, record_file)
        await serve_session(daemon.operations, daemon.root,
                            [functools.partial(_housekeeping, daemon)], on_ready)
        nursery.cancel_scope.cancel()


async def _housekeeping(daemon: FilterDaemon) -> None:
    while True:
        await trio.sleep(SWEEP_SECONDS)
        daemon.sweep()
        if daemon.idle():
            log.info("idle: unmounting %s", daemon.root)
            pyfuse3.terminate()
            return


def daemon_main(root: str, run_dir: str, log_path: str, ready_fd: int, on_demand: bool) -> None:
    """The body of `python -m isolated_agent.engines.filter`: fork once more (so that the
    caller can wait for its child at once), then serve, reporting on `ready_fd`."""
    if os.fork() != 0:
        os._exit(0)
    root, run_dir, log_path = (os.path.abspath(p) for p in (root, run_dir, log_path))

    def daemon(reporter: Reporter) -> int:
        setup_logging()
        serve(root, run_dir, log_path, on_demand, on_ready=reporter.ready)
        return 0

    become_daemon(daemon, Reporter(ready_fd), log_path, "filter daemon", expected=(MountFailed,))
