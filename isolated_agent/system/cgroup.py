"""A job as a cgroup v2 group: the whole process tree, killed as one when the job ends.

The v2 hierarchy is found in /proc/self/mountinfo, not assumed at /sys/fs/cgroup: hybrid hosts
mount it at /sys/fs/cgroup/unified beside the v1 controllers. We create a leaf group beside the
caller's own cgroup, move only the job's processes into it (never the calling shell or a test
runner), and remove it when the job ends. v1 hierarchies are never touched.

Resource limits (`run --memory/--pids/--cpus`) are the job group's memory.max, pids.max and
cpu.max. They need the controllers enabled in the parent's cgroup.subtree_control, which the
kernel refuses while processes live in the parent itself (the "no internal processes" rule).
Under a scope of agentctl's own (`systemd-run --user --scope -p Delegate=yes agentctl run ...`)
agentctl is that process: it moves itself into a leaf group first. Anywhere else a limit that
cannot be set refuses the run — never a silent unlimited job.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

from isolated_agent.errors import IsolationError
from isolated_agent.system.mountinfo import read_mountinfo

LIMITS_STEP = "resource limits"
DELEGATE_HINT = ("run agentctl in a cgroup of its own with the controllers delegated: "
                 "systemd-run --user --scope -p Delegate=yes agentctl run ...")
_CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    pids: int | None = None
    cpus: float | None = None  # CPUs' worth of time per period

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.memory, self.pids, self.cpus))

    def controllers(self) -> list[str]:
        wanted = [("memory", self.memory), ("pids", self.pids), ("cpu", self.cpus)]
        return [name for name, value in wanted if value is not None]

    def files(self) -> dict[str, str]:
        """What the job group's control files are set to."""
        values = {}
        if self.memory is not None:
            values["memory.max"] = str(self.memory)
            values["memory.swap.max"] = "0"  # else the limit only moves memory to swap
        if self.pids is not None:
            values["pids.max"] = str(self.pids)
        if self.cpus is not None:
            values["cpu.max"] = f"{max(1000, round(self.cpus * _CPU_PERIOD_US))} {_CPU_PERIOD_US}"
        return values


def v2_mount_point() -> str | None:
    for entry in read_mountinfo():
        if entry.fstype == "cgroup2":
            return entry.mount_point
    return None


def own_v2_path() -> str | None:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                hierarchy, _, path = line.rstrip("\n").split(":", 2)
                if hierarchy == "0":
                    return path
    except OSError:
        pass
    return None


class JobCgroup:
    """A leaf cgroup v2 group that holds one job."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def create(cls, label: str, limits: Limits = Limits()) -> JobCgroup | None:
        """Make the group beside our own cgroup, or return None when no writable v2 subtree
        exists (then the job is contained by its pid namespace alone). With limits, set them
        or raise IsolationError."""
        parent = delegate_limits(limits) if limits else own_group()
        if parent is None:
            return None
        path = os.path.join(parent, f"isolated-agent-{label}-{os.getpid()}")
        try:
            os.mkdir(path)
        except OSError as e:
            if limits:
                raise IsolationError(LIMITS_STEP, f"cannot create a group in {parent}: "
                                     f"{os.strerror(e.errno or 0)}", DELEGATE_HINT) from e
            return None
        group = cls(path)
        if not os.path.exists(os.path.join(path, "cgroup.kill")):  # kernels before 5.14
            os.rmdir(path)
            if limits:
                raise IsolationError(LIMITS_STEP, "this kernel's cgroups cannot kill a job as "
                                     "one (cgroup.kill, Linux 5.14)")
            return None
        try:
            for name, value in limits.files().items():
                with open(os.path.join(path, name), "w") as f:
                    f.write(value)
        except OSError as e:
            group.kill_and_remove()
            raise IsolationError(LIMITS_STEP, f"{name} of {path}: {os.strerror(e.errno or 0)}",
                                 DELEGATE_HINT) from e
        return group

    def add(self, pid: int) -> None:
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(line) for line in f if line.strip()]
        except OSError:
            return []

    def kill_and_remove(self, timeout: float = 5.0) -> None:
        """SIGKILL everything left in the group, wait until it is empty, remove it."""
        with contextlib.suppress(OSError), open(os.path.join(self.path, "cgroup.kill"), "w") as f:
            f.write("1")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:  # EBUSY: dying processes not yet reaped
                time.sleep(0.005)


_LAUNCHER_LEAF = "isolated-agent-launcher-"


def own_group() -> str | None:
    """Our cgroup v2 group's directory — the group above, when we sit in the leaf we stepped
    into to enable controllers (`delegate_limits`)."""
    mount, own = v2_mount_point(), own_v2_path()
    if mount is None or own is None:
        return None
    group = os.path.normpath(os.path.join(mount, own.lstrip("/")))
    if os.path.basename(group) == f"{_LAUNCHER_LEAF}{os.getpid()}":
        return os.path.dirname(group)
    return group


def _read_words(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return []


def limits_problem(limits: Limits) -> str | None:
    """Why `limits` cannot be set for a job started from here (None: they can, or at least
    nothing says otherwise before trying)."""
    parent = own_group()
    if parent is None:
        return "this machine has no cgroup v2 hierarchy, which limits a job"
    available = _read_words(os.path.join(parent, "cgroup.controllers"))
    missing = [c for c in limits.controllers() if c not in available]
    if missing:
        named = ", ".join(missing[:-1]) + (" or " if len(missing) > 1 else "") + missing[-1]
        return (f"the cgroup {parent} has no {named} controller (it has: "
                f"{', '.join(available) or 'none'})")
    return None


def delegate_limits(limits: Limits) -> str:
    """Our cgroup, with the limits' controllers enabled for its children; raises
    IsolationError when that cannot be. Called before anything is started beside us (an
    engine's daemons would share our cgroup and keep the kernel from enabling them)."""
    problem = limits_problem(limits)
    if problem is not None:
        raise IsolationError(LIMITS_STEP, problem, DELEGATE_HINT)
    parent = own_group()
    assert parent is not None
    wanted = [c for c in limits.controllers()
              if c not in _read_words(os.path.join(parent, "cgroup.subtree_control"))]
    if not wanted:
        return parent
    if _read_words(os.path.join(parent, "cgroup.procs")) == [str(os.getpid())]:
        # Alone in our cgroup (a scope of our own): step into a leaf, so the parent holds
        # no process and may enable controllers for its children.
        leaf = os.path.join(parent, f"{_LAUNCHER_LEAF}{os.getpid()}")
        with contextlib.suppress(OSError):
            os.mkdir(leaf)
            with open(os.path.join(leaf, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
    try:
        with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
            f.write(" ".join(f"+{c}" for c in wanted))
    except OSError as e:
        raise IsolationError(
            LIMITS_STEP, f"cannot enable {', '.join(wanted)} for the groups under {parent} "
            f"({os.strerror(e.errno or 0)}: other processes share agentctl's cgroup)",
            DELEGATE_HINT) from e
    return parent


def sweep_stale_groups() -> None:
    """Remove empty job groups left behind by a launcher that was killed."""
    parent = own_group()
    if parent is None:
        return
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith("isolated-agent-"):
            continue
        launcher_pid = name.rsplit("-", 1)[-1]
        if launcher_pid.isdigit() and os.path.exists(f"/proc/{launcher_pid}"):
            continue
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(parent, name))
