"""Which jobs are running: one record per running job in the store's run/jobs/, written by
`run` once the job exists and removed when it ends; read by `agentctl ps` and `agentctl exec`.

A record names its launcher by pid and start time, so a launcher killed before it could remove
its record (SIGKILL) is recognised as gone — even when its pid was given to another process —
and its record is dropped by the next reader.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass

from isolated_agent.engines.filter.identity import start_time
from isolated_agent.jobs.launcher import children
from isolated_agent.system.durable import process_alive


@dataclass(frozen=True)
class RunningJob:
    env_id: str
    env_name: str
    engine: str
    namespaces: bool  # False: the filter engine (the job runs on the host, in no namespace)
    rootless: bool
    network: str
    argv: list[str]
    started: float  # time.time()
    launcher_pid: int  # agentctl run
    launcher_start: int  # its start time (clock ticks since boot), against pid reuse
    pid: int  # the job's outermost process (A), as `agentctl ps` shows it
    init_pid: int  # the process whose namespaces are the job's: B, its pid 1 (or keeper)
    cgroup: str | None  # the job's cgroup v2 group, when it has one
    allow: list[str]
    allow_sockets: list[str]

    def alive(self) -> bool:
        try:
            same = start_time(self.launcher_pid) == self.launcher_start
        except (ProcessLookupError, ValueError, OSError):
            return False
        return same and process_alive(self.launcher_pid)


def _directory(run_dir: str) -> str:
    return os.path.join(run_dir, "jobs")


def _path(run_dir: str, env_id: str) -> str:
    return os.path.join(_directory(run_dir), f"{env_id}.json")


def record(run_dir: str, job: RunningJob) -> None:
    os.makedirs(_directory(run_dir), mode=0o700, exist_ok=True)
    path = _path(run_dir, job.env_id)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(asdict(job), f)
    os.rename(temporary, path)


def forget(run_dir: str, env_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(run_dir, env_id))


def running(run_dir: str) -> list[RunningJob]:
    """Every running job, oldest first; records of launchers that are gone are removed."""
    jobs = []
    try:
        names = os.listdir(_directory(run_dir))
    except FileNotFoundError:
        return []
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(_directory(run_dir), name)
        try:
            with open(path) as f:
                job = RunningJob(**json.load(f))
        except (OSError, ValueError, TypeError):
            continue  # being written (the rename is atomic: a partial file never shows)
        if job.alive():
            jobs.append(job)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return sorted(jobs, key=lambda j: j.started)


def only_child(pid: int) -> int | None:
    found = children(pid)
    return found[0] if len(found) == 1 else None
