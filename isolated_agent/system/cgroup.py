"""A job as a cgroup v2 group: the whole process tree, killed as one when the job ends.

The v2 hierarchy is found in /proc/self/mountinfo, not assumed at /sys/fs/cgroup: hybrid hosts
mount it at /sys/fs/cgroup/unified beside the v1 controllers. We create a leaf group beside the
caller's own cgroup, move only the job's processes into it (never the calling shell or a test
runner), and remove it when the job ends. v1 hierarchies are never touched.
"""

from __future__ import annotations

import contextlib
import os
import time

from isolated_agent.system.mountinfo import read_mountinfo


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
    def create(cls, label: str) -> JobCgroup | None:
        """Make the group beside our own cgroup, or return None when no writable v2 subtree
        exists (then the job is contained by its pid namespace alone)."""
        mount, own = v2_mount_point(), own_v2_path()
        if mount is None or own is None:
            return None
        parent = os.path.join(mount, own.lstrip("/"))
        path = os.path.join(parent, f"isolated-agent-{label}-{os.getpid()}")
        try:
            os.mkdir(path)
        except OSError:
            return None
        if not os.path.exists(os.path.join(path, "cgroup.kill")):  # kernels before 5.14
            os.rmdir(path)
            return None
        return cls(path)

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


def sweep_stale_groups() -> None:
    """Remove empty job groups left behind by a launcher that was killed."""
    mount, own = v2_mount_point(), own_v2_path()
    if mount is None or own is None:
        return
    parent = os.path.join(mount, own.lstrip("/"))
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
