"""Talking to filter daemons from the CLI and the launcher: find, start, stop, register.

A daemon is found through its record in the store; a record whose daemon does not answer is
stale (the daemon was killed) and is cleaned up, together with the dead mount it left: a dead
FUSE mount answers ENOTCONN, never the host files, and `filter start` recovers from it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from typing import Any

from isolated_agent.engines.filter.records import (
    FilterRecord,
    all_records,
    read_record,
    record_path,
    socket_path,
)
from isolated_agent.env.store import Root, Store
from isolated_agent.errors import AgentctlError
from isolated_agent.fusefs import mount as mounts
from isolated_agent.protocol.client import ControlError, request
from isolated_agent.protocol.frames import Code, Frame
from isolated_agent.system.daemon import read_report


class FilterError(AgentctlError):
    """A filter daemon could not be started, reached or stopped (exit 1)."""


def check_root(store: Store, root: str) -> str:
    """The filter covers a managed root: the store's rules for those apply (an existing
    directory, not /, not overlapping the store)."""
    return store.resolve_roots([root])[0]


def query(record: FilterRecord, timeout: float = 5.0) -> dict[str, Any] | None:
    """The daemon's state, or None when it does not answer."""
    try:
        return request(record.socket, Frame(Code.QUERY), timeout=timeout).body
    except ControlError:
        return None


def live_record(store: Store, root: str) -> FilterRecord | None:
    """The record of the daemon serving `root`, if it is alive; a stale one is cleaned up."""
    record = read_record(store.run_dir, root)
    if record is None:
        _recover_dead_mount(root)
        return None
    if query(record) is not None:
        return record
    _forget(store, record)
    return None


def _forget(store: Store, record: FilterRecord) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(record.pid, signal.SIGKILL)
    mounts.wait_exited(record.pid, timeout=5)
    _recover_dead_mount(record.root)
    for path in (record_path(store.run_dir, record.root), record.socket):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _recover_dead_mount(root: str) -> None:
    entry = mounts.mount_entry(root)
    if mounts.is_fuse_mount(entry) and mounts.is_dead(root):
        with contextlib.suppress(mounts.NotMounted, mounts.UnmountFailed):
            mounts.unmount(root, lazy=True)


def start(store: Store, root: str, on_demand: bool) -> FilterRecord:
    """The daemon serving `root`: the running one, or a new one (after cleaning up what a
    killed one left: its record, its dead mount). Two runs starting at once get one daemon."""
    lock = os.open(record_path(store.run_dir, os.path.realpath(root)) + ".lock",
                   os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _start_locked(store, root, on_demand)
    finally:
        os.close(lock)


def _start_locked(store: Store, root: str, on_demand: bool) -> FilterRecord:
    record = live_record(store, os.path.realpath(root))
    if record is not None:
        return record
    path = check_root(store, root)
    if mounts.mount_entry(path) is not None:
        raise FilterError(f"{path} is a mount point already; the filter mounts over it only "
                          "when nothing else is mounted there")
    log_path = socket_path(store.run_dir, path).removesuffix(".sock") + ".log"
    start_background(path, store.run_dir, log_path, on_demand)
    record = read_record(store.run_dir, path)
    if record is None:
        raise FilterError(f"the filter daemon for {path} did not write its record")
    return record


def start_background(root: str, run_dir: str, log_path: str, on_demand: bool) -> int:
    """Start a detached daemon over `root`; return its pid once it serves. Raises FilterError
    with the daemon's reason when it cannot.

    The daemon is a fresh interpreter (`python -m isolated_agent.engines.filter`), never a fork
    of the caller: a fork would inherit the caller's threads' state (trio's thread cache of a
    process that ran trio before, locks held by threads that do not exist in the child), its
    descriptors (a run's env lock) and its command line."""
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "isolated_agent.engines.filter", root, run_dir, log_path,
               str(write_end), *(["--on-demand"] if on_demand else [])]
    try:
        child = subprocess.Popen(command, pass_fds=(write_end,), start_new_session=True,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, cwd="/")
    finally:
        os.close(write_end)
    child.wait()  # it forks the daemon and exits at once: not our child, not our zombie
    report = read_report(read_end, "the filter daemon died")
    if not report.ok:
        raise FilterError(f"cannot start the filter on {root}: {report.detail}")
    record = read_record(run_dir, root)
    return record.pid if record is not None else 0


def serve_foreground(store: Store, root: str) -> None:
    """`filter start --foreground`: serve in this process, logging to stderr."""
    from isolated_agent.engines.filter.daemon import serve
    from isolated_agent.engines.fuse.daemon import MountFailed, setup_logging

    if live_record(store, os.path.realpath(root)) is not None:
        raise FilterError(f"a filter already runs on {os.path.realpath(root)}")
    path = check_root(store, root)
    setup_logging()
    try:
        serve(path, store.run_dir, "(stderr)", on_demand=False)
    except MountFailed as e:
        raise FilterError(f"cannot start the filter on {path}: {e}") from None


def stop(store: Store, root: str, force: bool = False) -> FilterRecord:
    path = os.path.realpath(root)
    record = read_record(store.run_dir, path)
    if record is None:
        _recover_dead_mount(path)
        raise FilterError(f"no filter runs on {path}")
    state = query(record)
    if state is None:
        _forget(store, record)
        return record
    if state["jobs"] and not force:
        raise FilterError(f"the filter on {path} serves {len(state['jobs'])} running job(s); "
                          "let them end first, or use --force (they lose their view)")
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, signal.SIGTERM)
    if not mounts.wait_exited(record.pid, timeout=10):
        raise FilterError(f"the filter daemon {record.pid} did not stop: a process may be "
                          f"working in {path}; retry when it is done")
    return record


def status(store: Store) -> list[dict[str, Any]]:
    result = []
    for record in all_records(store.run_dir):
        state = query(record, timeout=2.0)
        result.append({
            "root": record.root,
            "pid": record.pid,
            "alive": state is not None,
            "on_demand": record.on_demand,
            "envs": state["envs"] if state else [],
            "jobs": state["jobs"] if state else [],
            "log": record.log,
        })
    return result


def register_job(record: FilterRecord, job_id: str, env_id: str, root: Root,
                 cgroup: str | None, anchor: tuple[int, int]) -> None:
    _ask(record, Frame(Code.REGISTER_JOB, {
        "job": job_id, "env": env_id, "upper": root.upper, "work": root.work,
        "layers": list(root.layers),
        "cgroup": cgroup, "anchor": list(anchor),
    }))


def unregister_job(record: FilterRecord, job_id: str) -> None:
    _ask(record, Frame(Code.UNREGISTER_JOB, {"job": job_id}))


def _ask(record: FilterRecord, frame: Frame) -> None:
    try:
        request(record.socket, frame)
    except ControlError as e:
        raise FilterError(f"filter on {record.root}: {e}") from None
