"""Which job, if any, a process belongs to (DESIGN §6), for the filter engine.

The filter daemon asks on every FUSE request that needs a view, with the pid the kernel gives
it (a thread id). A process belongs to a job when it descends from the job's outermost process
(its *anchor*) or lives in the job's cgroup v2 group. Membership is decided at fork and is
sticky: once placed, a process stays in its job even if it later leaves the group.

Processes are always named by (pid, start time): the start time (in clock ticks since boot) is
fixed for a process's life, so a recycled pid never inherits its predecessor's verdict.

Order of the checks, cheapest first:

    1. the verdict cache, keyed by (pid, start time): one read of /proc/PID/stat per request;
    2. the process's cgroup v2 path, equal to or below a registered job's group;
    3. the parent chain, hop by hop, each hop named by (pid, start time): a registered anchor
       or a known member on the way makes the process (and every hop below it) a member; the
       top of the tree (ppid 0) or one of the daemon's own ancestors makes it a host process.

Anything uncertain raises Unclassifiable, so that the caller denies the request: pid <= 0 (a
process in another pid namespace, or the kernel), a process that vanished mid-walk, a line of
/proc we cannot parse, a parent younger than its child (its pid was recycled under us).

Host verdicts are cached by (pid, start time) too, and dropped whenever a job registers: the
job's suspended processes may have been looked at as host processes before it was registered.

Without a cgroup (anchor-only mode) a process whose parent died is reparented to the nearest
child subreaper among its ancestors: the launcher makes the job's keeper (its process B) one, so
an orphan of the job is found through B even if nobody saw it before its parent died. A process
seen while its parent was alive is cached and found directly.

Single-threaded by design: the daemon calls it from one trio thread.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
from collections import OrderedDict
from dataclasses import dataclass

# Beyond this many cached verdicts, entries of processes that are gone are dropped.
_CACHE_LIMIT = 16384

# Hops of the parent chain before we give up (a tree deeper than this is not a real one).
_MAX_DEPTH = 4096

_Key = tuple[int, int]  # (pid, start time in clock ticks)


class Unclassifiable(Exception):
    """The process cannot be placed with certainty: deny its request (fail closed)."""


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    view: str  # the env id whose view the job's processes get
    # The job's cgroup v2 path as /proc/PID/cgroup shows it after "0::" (e.g.
    # "/isolated-agent-e1-4242"), or None when the job has no group.
    cgroup: str | None
    # (pid, start time) of the job's outermost process; every descendant belongs to the job.
    anchor: tuple[int, int] | None


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: when the process (or thread) started, in clock ticks since
    boot. Raises ProcessLookupError when it is gone, ValueError when the line is malformed."""
    return _read_stat(pid)[1]


def cgroup_name(group_dir: str, v2_mount: str) -> str:
    """A group's path as /proc/PID/cgroup shows it, from its directory in the v2 hierarchy
    (`JobCgroup.path`) and the hierarchy's mount point (`cgroup.v2_mount_point()`)."""
    relative = os.path.relpath(group_dir, v2_mount)
    if relative == ".":
        return "/"
    if relative.startswith(".."):
        raise ValueError(f"{group_dir} is not in the cgroup v2 hierarchy at {v2_mount}")
    return "/" + relative


def record_for(job_id: str, view: str, pid: int, group_dir: str | None) -> JobRecord:
    """The record of a job whose outermost process is `pid` (alive now), in the cgroup v2
    group at `group_dir` (or in none)."""
    from isolated_agent.system.cgroup import v2_mount_point

    cgroup = None
    if group_dir is not None:
        mount = v2_mount_point()
        if mount is None:
            raise ValueError("no cgroup v2 hierarchy is mounted")
        cgroup = cgroup_name(group_dir, mount)
    return JobRecord(job_id, view, cgroup, (pid, start_time(pid)))


class Identity:
    """The registered jobs and the verdicts reached so far."""

    def __init__(self, cache_limit: int = _CACHE_LIMIT) -> None:
        self._jobs: dict[str, JobRecord] = {}
        self._anchors: dict[_Key, str] = {}
        self._members: dict[_Key, str] = {}  # sticky: (pid, start) -> job id
        self._host: set[_Key] = set()
        self._recent = _Recent()
        self._cache_limit = cache_limit
        self._next_prune = cache_limit
        self._own_line = _own_ancestry()

    # -- registration -------------------------------------------------------------------

    def register(self, job: JobRecord) -> None:
        if job.job_id in self._jobs:
            self.unregister(job.job_id)
        self._jobs[job.job_id] = job
        if job.anchor is not None:
            self._anchors[job.anchor] = job.job_id
        # A process judged before now may be this job's suspended process: judge again.
        self._host.clear()
        self._recent.clear()

    def unregister(self, job_id: str) -> None:
        """Forget the job and its members. Call it once the job's processes are gone: one
        still running would be judged again, without its job, as a host process."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        if job.anchor is not None:
            self._anchors.pop(job.anchor, None)
        self._members = {k: v for k, v in self._members.items() if v != job_id}
        self._recent.clear()

    def jobs(self) -> list[JobRecord]:
        return list(self._jobs.values())

    # -- classification -----------------------------------------------------------------

    def view_of(self, pid: int) -> str | None:
        """The env id whose view `pid` (a thread id, as FUSE reports it) gets, or None for
        the host's. Raises Unclassifiable when that cannot be decided with certainty."""
        if not self._jobs:
            return None  # nothing registered: every process sees the host, no /proc read
        job_id = self.job_of(pid)
        return None if job_id is None else self._jobs[job_id].view

    def job_of(self, pid: int) -> str | None:
        """The id of the job `pid` belongs to, or None for a host process."""
        if pid <= 0:
            raise Unclassifiable(f"pid {pid}: a process outside our pid namespace, or the kernel")
        known, recent = self._recent.get(pid)
        if known:
            return recent
        try:
            ppid, start = _read_stat(pid)
        except (OSError, ValueError) as e:
            raise Unclassifiable(f"pid {pid}: {e}") from e
        key = (pid, start)
        known, cached = self._cached(key)
        if known:
            return cached
        job_id = self._classify(pid, key, ppid)
        self._remember(key, job_id)
        self._maybe_prune()
        self._recent.add(key, job_id)
        return job_id

    def _cached(self, key: _Key) -> tuple[bool, str | None]:
        """(known, job id or None for the host)."""
        job_id = self._members.get(key) or self._anchors.get(key)
        if job_id is not None:
            return True, job_id
        return key in self._host or key in self._own_line, None

    def _classify(self, tid: int, key: _Key, ppid: int) -> str | None:
        tgid = _thread_group(tid)
        if tgid != tid:
            # A thread: its process decides (the anchor's own threads have the launcher as
            # their parent, so the walk from the thread alone would miss them).
            job_id = self.job_of(tgid)
            self._confirm(key)
            return job_id
        by_group = self._by_cgroup(tid)
        if by_group is not None:
            self._confirm(key)
            return by_group
        return self._walk(key, ppid)

    def _by_cgroup(self, pid: int) -> str | None:
        groups = [(job.cgroup, job.job_id) for job in self._jobs.values() if job.cgroup]
        if not groups:
            return None
        path = _v2_cgroup(pid)
        for group, job_id in groups:
            if path == group or path.startswith(group.rstrip("/") + "/"):
                return job_id
        return None

    def _walk(self, key: _Key, ppid: int) -> str | None:
        """Up the parent chain until a known process or the top; every hop gets the verdict."""
        chain = [key]
        child, child_start, parent = key[0], key[1], ppid
        known, verdict = False, None
        for _ in range(_MAX_DEPTH):
            if parent == 0:  # above pid 1 (or kthreadd): the top of the tree
                known = True
                break
            try:
                grandparent, parent_start = _read_stat(parent)
            except (OSError, ValueError) as e:
                raise Unclassifiable(f"pid {key[0]}: ancestor {parent}: {e}") from e
            if parent_start > child_start:
                # Not the real parent: the parent died, its pid was recycled, and the child
                # was reparented meanwhile. Read the child again to follow its new parent.
                parent = self._reread_parent(child, child_start, parent)
                continue
            parent_key = (parent, parent_start)
            known, verdict = self._cached(parent_key)
            if known:
                break
            chain.append(parent_key)
            child, child_start, parent = parent, parent_start, grandparent
        if not known:
            raise Unclassifiable(f"pid {key[0]}: no end to its parent chain")
        for hop in chain[1:]:
            self._remember(hop, verdict)
        return verdict

    @staticmethod
    def _reread_parent(child: int, child_start: int, stale_parent: int) -> int:
        try:
            parent, start = _read_stat(child)
        except (OSError, ValueError) as e:
            raise Unclassifiable(f"pid {child}: {e}") from e
        if start != child_start or parent == stale_parent:
            raise Unclassifiable(f"pid {child}: its parent {stale_parent} is younger than itself")
        return parent

    @staticmethod
    def _confirm(key: _Key) -> None:
        """The process still is the one whose stat we read first: the cgroup (or thread group)
        read in between described it, not a successor with its recycled pid."""
        try:
            if _read_stat(key[0])[1] == key[1]:
                return
        except (OSError, ValueError):
            pass
        raise Unclassifiable(f"pid {key[0]} vanished while it was being classified")

    # -- the caches ---------------------------------------------------------------------

    def _remember(self, key: _Key, job_id: str | None) -> None:
        if job_id is None:
            self._host.add(key)
        else:
            self._members[key] = job_id

    def _maybe_prune(self) -> None:
        size = len(self._members) + len(self._host)
        if size <= self._next_prune:
            return
        self._members = {k: v for k, v in self._members.items() if _alive(k)}
        self._host = {k for k in self._host if _alive(k)}
        if len(self._members) + len(self._host) > self._cache_limit:
            self._host.clear()  # host verdicts are cheap to reach again; members are sticky
        # Live members can outgrow the limit; prune again only after as many new entries.
        self._next_prune = max(self._cache_limit, 2 * len(self._members))


class _Recent:
    """The verdicts of the processes that asked lately, each held with a pidfd: one syscall
    (`pidfd_send_signal(fd, 0)`: is *this* process still there?) instead of reading and parsing
    /proc/PID/stat on every request. A pidfd names one process, never a successor that got its
    pid, so this keeps the (pid, start time) guarantee. Where pidfds of threads are not
    supported (Linux < 6.9) nothing is remembered here and every request reads /proc."""

    def __init__(self) -> None:
        self._entries: OrderedDict[int, tuple[int, str | None]] = OrderedDict()
        self._supported = True
        # A small share of the descriptors we may hold: the overlays need theirs.
        self._limit = max(16, min(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 16))

    def get(self, pid: int) -> tuple[bool, str | None]:
        entry = self._entries.get(pid)
        if entry is None:
            return False, None
        fd, job_id = entry
        try:
            signal.pidfd_send_signal(fd, 0)
        except PermissionError:
            pass  # it exists; it is only not ours to signal
        except OSError:  # it exited: its pid may be someone else's next time
            self._drop(pid)
            return False, None
        self._entries.move_to_end(pid)
        return True, job_id

    def add(self, key: _Key, job_id: str | None) -> None:
        pid, start = key
        if not self._supported or pid in self._entries:
            return
        try:
            fd = os.pidfd_open(pid, _PIDFD_THREAD)
        except OSError as e:
            if e.errno == errno.EINVAL:
                self._supported = False
            return
        try:
            same = _read_stat(pid)[1] == start  # the pidfd names the process we judged
        except (OSError, ValueError):
            same = False
        if not same:
            os.close(fd)
            return
        self._entries[pid] = (fd, job_id)
        while len(self._entries) > self._limit:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        for pid in list(self._entries):
            self._drop(pid)

    def _drop(self, pid: int) -> None:
        fd, _ = self._entries.pop(pid)
        os.close(fd)


_PIDFD_THREAD = os.O_EXCL  # pidfd_open(2): the pid may be a thread's (Linux 6.9)


def _read_stat(pid: int) -> tuple[int, int]:
    """(ppid, start time) of `pid` from /proc/PID/stat. The command name (field 2) may hold
    spaces and parentheses, so the fields are counted after the last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    fields = raw[raw.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, start time field 22.
    return int(fields[1]), int(fields[19])


def _thread_group(tid: int) -> int:
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError) as e:
        raise Unclassifiable(f"pid {tid}: {e}") from e
    raise Unclassifiable(f"pid {tid}: no Tgid in its status")


def _v2_cgroup(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            for line in f:
                if line.startswith(b"0::"):
                    return os.fsdecode(line[3:].rstrip(b"\n"))
    except OSError as e:
        raise Unclassifiable(f"pid {pid}: {e}") from e
    raise Unclassifiable(f"pid {pid}: no cgroup v2 line in /proc/{pid}/cgroup")


def _alive(key: _Key) -> bool:
    try:
        return _read_stat(key[0])[1] == key[1]
    except (OSError, ValueError):
        return False


def _own_ancestry() -> frozenset[_Key]:
    """The daemon and its ancestors: host processes, and the end of any walk that meets them
    (a job's anchor below one of them would not be on the walk's way up)."""
    line: set[_Key] = set()
    pid = os.getpid()
    while pid > 0:
        try:
            ppid, start = _read_stat(pid)
        except (OSError, ValueError):
            break
        line.add((pid, start))
        pid = ppid
    return frozenset(line)
