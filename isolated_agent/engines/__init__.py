"""Engines produce an env's merged view of each managed root (DESIGN §4).

Every engine serves the same on-disk format (`isolated_agent.overlay.format`). An engine has two
halves: `check()` runs in the launcher, on the host, and says whether the engine can work here;
`mount_root()` runs inside the job's private mount namespace and puts the merged view of one root
at a given path (the filter engine, `namespaces = False`, has no such namespace: its view is on
the host). An engine that needs processes on the host side while the job runs (the fuse
engine's daemons, the filter daemons) also has `start()` / `job_started()` / `stop()`
(`HostSide`), which `jobs.run.serving()` and the launcher call around the job, and
`problems()`, which tells the user when a daemon answered a request with EIO on an internal error.

`auto` picks the kernel engine whenever namespaces can be made and overlayfs exists (native
speed), else the fuse engine; where namespaces cannot be made at all, the filter engine
(agentfs mounted over each root on the host, telling processes apart by identity), and where
FUSE cannot be used either, the copy engine (the job works in a clone of each root).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from isolated_agent.env.store import Env, Root, Store
from isolated_agent.errors import IsolationError, UsageError


class Engine(Protocol):
    name: str
    namespaces: bool  # False: the job runs on the host, without namespaces (filter engine)

    def check(self, rootless: bool) -> None:
        """Raise IsolationError when this engine cannot work on this machine."""

    def mount_root(self, root: Root, target: str, lower: str) -> None:
        """Inside the job's mount namespace: mount the merged view of `root` at `target`,
        reading the host's files at `lower` (the same directory, seen from outside the view)."""


@runtime_checkable
class HostSide(Protocol):
    def start(self, env: Env, log_dir: str) -> None:
        """On the host, before the job starts: start what serves the env's roots."""

    def stop(self) -> None:
        """On the host, after the job ended (or failed to start): stop it all."""

    def job_started(self, pid: int, cgroup_dir: str | None) -> None:
        """The job exists (suspended): `pid` is its outermost process, `cgroup_dir` its
        cgroup v2 group (or None). Runs before the command is released."""

    def problems(self) -> list[str]:
        """After the job: one line for each daemon that failed requests on a bug meanwhile
        (the job saw EIO), naming its log."""


ENGINE_NAMES = ("auto", "kernel", "fuse", "filter", "copy")


def select_engine(name: str, rootless: bool, store: Store) -> Engine:
    """The engine called `name`, checked; for `auto`: the kernel engine when namespaces can be
    made (native speed), else the fuse engine (no overlayfs), else — namespaces unavailable,
    as under Ubuntu's AppArmor default or in many containers — the filter engine, and where
    FUSE cannot be used either, the copy engine (not path-preserving: the last resort)."""
    from isolated_agent.engines.kernel import check_namespaces

    if name not in ENGINE_NAMES:
        raise UsageError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINE_NAMES)}")
    if name != "auto":  # a job that cannot make its namespaces fails with the reason (125)
        return _checked(engine_named(name, store), rootless)
    try:
        check_namespaces(rootless)
    except IsolationError as no_namespaces:
        from isolated_agent.engines.copy import CopyEngine
        from isolated_agent.engines.filter.engine import FilterEngine

        for fallback in (FilterEngine(store), CopyEngine()):
            try:
                fallback.check(rootless)
            except IsolationError:
                continue
            fallback.fallback_from = no_namespaces  # said too if it cannot start
            return fallback
        raise no_namespaces from None
    try:
        return _checked(engine_named("kernel", store), rootless)
    except IsolationError as kernel_problem:
        try:
            return _checked(engine_named("fuse", store), rootless)
        except IsolationError:
            raise kernel_problem from None  # neither works: the kernel's reason is the usual one


def engine_named(name: str, store: Store) -> Engine:
    """The engine called `name` (not `auto`), not yet checked."""
    from isolated_agent.engines.copy import CopyEngine
    from isolated_agent.engines.filter.engine import FilterEngine
    from isolated_agent.engines.fuse.engine import FuseEngine
    from isolated_agent.engines.kernel import KernelEngine

    made: dict[str, Callable[[], Engine]] = {
        "kernel": KernelEngine, "fuse": FuseEngine, "filter": lambda: FilterEngine(store),
        "copy": CopyEngine,
    }
    return made[name]()


def _checked(engine: Engine, rootless: bool) -> Engine:
    engine.check(rootless)
    return engine


def problems(engine: Engine) -> list[str]:
    """What went wrong on the engine's host side during the last job (see HostSide)."""
    return engine.problems() if isinstance(engine, HostSide) else []
