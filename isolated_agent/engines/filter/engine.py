"""The `filter` engine of `agentctl run`: no namespaces; agentfs over each root, in place.

The seed's launcher sequence (DESIGN §6): the job starts suspended (`JobSpec.namespaces=False`:
its keeper and command run on the host, the command confined by Landlock), the filter daemon
of each root is started if it is not running (`start`), the job is registered with each of
them — its cgroup, and its outermost process by (pid, start time) — once it exists
(`job_started`, before the launcher releases it), and unregistered when it ended (`stop`).

Fail closed: a daemon that cannot be started or reached stops the run before the command
exists; a daemon that dies later leaves the job (and the host) ENOTCONN under the root, never
the wrong view.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import uuid
from typing import TYPE_CHECKING

from isolated_agent.engines.fuse.engine import check_dev_fuse
from isolated_agent.env.store import Env, Root, Store
from isolated_agent.errors import IsolationError
from isolated_agent.fusefs.daemon_log import LogWatch
from isolated_agent.system import libc

if TYPE_CHECKING:
    from isolated_agent.engines.filter.records import FilterRecord


class FilterEngine:
    name = "filter"
    namespaces = False

    def __init__(self, store: Store) -> None:
        self.store = store
        self.env_id = ""
        self.job_id = f"job-{uuid.uuid4().hex[:12]}"
        self._served: list[tuple[FilterRecord, Root]] = []
        self._registered: list[FilterRecord] = []
        self._logs: list[tuple[str, LogWatch]] = []
        # Why `auto` fell back to this engine (namespaces cannot be made), if it did.
        self.fallback_from: IsolationError | None = None

    def check(self, rootless: bool) -> None:
        if not rootless:
            # No namespaces here: the job would be uid 0 on the host itself, owner of /tmp,
            # /dev/shm and every root file whose owner bits allow what Landlock does not judge.
            raise IsolationError(
                "filter engine", "it runs no job as root (without namespaces the job would be "
                "uid 0 on the host, owner of /tmp and of every root file)",
                "run agentctl as your user, or use --engine kernel or fuse")
        check_dev_fuse("filter engine")
        if shutil.which("fusermount3") is None:
            raise IsolationError("filter engine", "fusermount3 is not installed",
                                 "install the fuse3 package")
        if libc.landlock_abi() <= 0:
            raise IsolationError(
                "filter engine", "Landlock is not available",
                "the filter engine needs Linux >= 5.13 with Landlock enabled (lsm=...,landlock)")
        for module in ("pyfuse3", "trio"):  # the daemon's; found, not imported (100 ms)
            if importlib.util.find_spec(module) is None:
                raise IsolationError("filter engine", f"{module} is not installed",
                                     "install fuse3 and libfuse3-dev, then `pip install pyfuse3`")

    def mount_root(self, root: Root, target: str, lower: str) -> None:
        raise AssertionError("the filter engine mounts nothing inside a job")

    # -- host side (engines.HostSide) ------------------------------------------------------------

    def start(self, env: Env, log_dir: str) -> None:
        from isolated_agent.engines.filter.control import FilterError, start

        self.env_id = env.id
        for root in env.roots:
            try:
                record = start(self.store, root.path, on_demand=True)
            except FilterError as e:
                reason = self.fallback_from
                if reason is None:
                    raise IsolationError("filter engine", str(e)) from None
                raise IsolationError(reason.step, reason.detail, f"{reason.hint}; the filter "
                                     f"engine could not start either: {e}") from None
            self._served.append((record, root))
            self._logs.append((root.path, LogWatch(record.log)))

    def job_started(self, pid: int, cgroup_dir: str | None) -> None:
        """Before the command is released: every root's daemon learns the job."""
        from isolated_agent.engines.filter.control import FilterError, register_job
        from isolated_agent.engines.filter.identity import cgroup_name, start_time
        from isolated_agent.system.cgroup import v2_mount_point

        mount = v2_mount_point()
        cgroup = cgroup_name(cgroup_dir, mount) if cgroup_dir and mount else None
        anchor = (pid, start_time(pid))
        for record, root in self._served:
            try:
                register_job(record, self.job_id, self.env_id, root, cgroup, anchor)
            except FilterError as e:
                raise IsolationError("registering the job with the filter", str(e)) from None
            self._registered.append(record)

    def problems(self) -> list[str]:
        return [line for root, watch in self._logs
                for line in watch.problem(f"the filter daemon over {root}")]

    def stop(self) -> None:
        from isolated_agent.engines.filter.control import FilterError, unregister_job

        for record in self._registered:
            with contextlib.suppress(FilterError):  # a dead daemon forgot the job already
                unregister_job(record, self.job_id)
        self._registered.clear()
        self._served.clear()
