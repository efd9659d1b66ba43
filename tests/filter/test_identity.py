"""Identity (DESIGN §6): which job a process belongs to, on real processes and real cgroup v2
groups. Nothing is mocked: the test forks the trees, moves its own children into groups it
creates below its own v2 group, and kills and removes all of it at the end, even on failure."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from isolated_agent.engines.filter.identity import (
    Identity,
    JobRecord,
    Unclassifiable,
    cgroup_name,
    record_for,
    start_time,
)
from isolated_agent.system.cgroup import own_v2_path, v2_mount_point

# Each script runs in a fresh interpreter, says "NAME PID" for every process it wants the test
# to know, and lives until its stdin closes. `go()` waits for the test's go-ahead (so that the
# test can put it in a cgroup before it forks), `say()` reports a pid.
PRELUDE = textwrap.dedent(
    """\
    import os, signal, sys, threading, time
    def go():
        assert sys.stdin.readline() == "go\\n"
    def say(name, pid):
        os.write(1, f"{name} {pid}\\n".encode())
    def forever():
        while True:
            time.sleep(1000)
    """
)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def ppid_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    return int(raw[raw.rindex(b")") + 2 :].split()[1])


class Script:
    """A test process tree; every pid it reports is killed at the end (if it is still the
    same process: the start time is checked first, so a recycled pid is never hit)."""

    def __init__(self, code: str, cleanup: list[tuple[int, int]]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        self._cleanup = cleanup
        cleanup.append((self.pid, start_time(self.pid)))
        self.pids: dict[str, int] = {}

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def read(self, name: str) -> int:
        assert self.proc.stdout is not None
        while name not in self.pids:
            line = self.proc.stdout.readline()
            assert line, f"the script ended before saying {name}"
            said, pid = line.split()
            self.pids[said] = int(pid)
            with contextlib.suppress(OSError):
                self._cleanup.append((int(pid), start_time(int(pid))))
        return self.pids[name]


@pytest.fixture
def spawn() -> Iterator[Callable[[str], Script]]:
    cleanup: list[tuple[int, int]] = []
    scripts: list[Script] = []

    def make(code: str) -> Script:
        script = Script(code, cleanup)
        scripts.append(script)
        return script

    yield make
    for pid, started in cleanup:
        with contextlib.suppress(OSError, ValueError):
            if start_time(pid) == started:
                os.kill(pid, signal.SIGKILL)
    for script in scripts:
        with contextlib.suppress(OSError):
            script.proc.stdin.close()  # type: ignore[union-attr]
        script.proc.kill()
        script.proc.wait()
        script.proc.stdout.close()  # type: ignore[union-attr]


class TestGroup:
    """A cgroup v2 group below the test's own, holding only processes the test forked."""

    __test__ = False

    def __init__(self, name: str) -> None:
        mount, own = v2_mount_point(), own_v2_path()
        assert mount is not None and own is not None, "these machines have cgroup v2"
        self.parent = os.path.join(mount, own.lstrip("/"))
        self.path = os.path.join(self.parent, f"ia-test-{name}-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(self.path)
        self.name = cgroup_name(self.path, mount)

    def add(self, pid: int) -> None:
        Path(self.path, "cgroup.procs").write_text(str(pid))

    def move_out(self, pid: int) -> None:
        Path(self.parent, "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            Path(self.path, "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 10
        while os.path.exists(self.path):
            try:
                os.rmdir(self.path)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


@pytest.fixture
def make_group() -> Iterator[Callable[[str], TestGroup]]:
    groups: list[TestGroup] = []

    def make(name: str) -> TestGroup:
        group = TestGroup(name)
        groups.append(group)
        return group

    yield make
    for group in groups:
        group.remove()


def anchor_of(pid: int) -> tuple[int, int]:
    return (pid, start_time(pid))


TREE = """\
    go()
    child = os.fork()
    if child == 0:
        grandchild = os.fork()
        if grandchild == 0:
            forever()
        say("grandchild", grandchild)
        forever()
    say("child", child)
    worker = threading.Thread(target=forever, daemon=True)
    worker.start()
    say("thread", worker.native_id)
    sys.stdin.read()
"""


def test_start_time_is_field_22_even_with_parentheses_in_the_name(
    tmp_path: Path, spawn: Callable[[str], Script]
) -> None:
    odd = tmp_path / "we) ird ) 1 2 ("
    odd.symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(odd), "1000"])
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            assert b"we) ird ) 1 2 (" in f.read()
        mine = start_time(os.getpid())
        assert 0 < mine <= start_time(proc.pid)
        with open("/proc/self/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[19] == str(mine)
        assert Identity().view_of(proc.pid) is None
    finally:
        proc.kill()
        proc.wait()


def test_without_jobs_everything_is_host() -> None:
    identity = Identity()
    assert identity.jobs() == []
    for pid in (os.getpid(), 1, 0, -5, 999_999_999):
        assert identity.view_of(pid) is None


@pytest.mark.parametrize("by", ["anchor", "cgroup"])
def test_children_grandchildren_and_threads_are_members(
    by: str, spawn: Callable[[str], Script], make_group: Callable[[str], TestGroup]
) -> None:
    job = spawn(TREE)
    other = spawn(TREE)  # a host tree of the same shape
    identity = Identity()
    if by == "cgroup":
        group = make_group("tree")
        group.add(job.pid)
        identity.register(JobRecord("j1", "env-a", group.name, None))
    else:
        identity.register(JobRecord("j1", "env-a", None, anchor_of(job.pid)))
    job.go()
    other.go()
    for name in ("child", "grandchild", "thread"):
        assert identity.view_of(job.read(name)) == "env-a", name
        assert identity.view_of(other.read(name)) is None, name
    assert identity.view_of(job.pid) == "env-a"
    assert identity.view_of(other.pid) is None
    assert identity.view_of(os.getpid()) is None
    assert identity.view_of(1) is None
    assert identity.view_of(threading.get_native_id()) is None


def test_record_for_a_launched_job(
    spawn: Callable[[str], Script], make_group: Callable[[str], TestGroup]
) -> None:
    job = spawn(TREE)
    group = make_group("record")
    group.add(job.pid)
    record = record_for("j1", "env-a", job.pid, group.path)
    assert record.anchor == (job.pid, start_time(job.pid))
    assert record.cgroup == group.name
    with open(f"/proc/{job.pid}/cgroup") as f:
        assert f"0::{record.cgroup}\n" in f.read()
    assert record_for("j2", "env-b", job.pid, None).cgroup is None


DOUBLE_FORK = """\
    if "--subreaper" in sys.argv:
        import ctypes
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the intermediate is reaped when it exits
    go()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        daemon = os.fork()
        if daemon == 0:
            forever()
        say("daemon", daemon)
        signal.pause()  # until the test says the intermediate may exit (SIGTERM)
        os._exit(0)
    say("middle", middle)
    sys.stdin.read()
"""


def orphan(script: Script) -> int:
    """Let the double fork's intermediate exit; return the daemon, now reparented."""
    daemon, middle = script.read("daemon"), script.read("middle")
    os.kill(middle, signal.SIGTERM)
    wait_for(lambda: ppid_of(daemon) != middle, "the daemon to be reparented")
    return daemon


def test_setsid_double_fork_daemon_is_placed_by_its_cgroup(
    spawn: Callable[[str], Script], make_group: Callable[[str], TestGroup]
) -> None:
    job = spawn(DOUBLE_FORK)
    group = make_group("daemon")
    group.add(job.pid)
    identity = Identity()
    identity.register(JobRecord("j1", "env-a", group.name, None))
    job.go()
    daemon = orphan(job)
    assert ppid_of(daemon) != job.pid  # nothing links it to the job but its group
    assert identity.view_of(daemon) == "env-a"


def test_anchor_only_daemon_seen_before_its_parent_died_stays_a_member(
    spawn: Callable[[str], Script],
) -> None:
    job = spawn(DOUBLE_FORK)
    identity = Identity()
    identity.register(JobRecord("j1", "env-a", None, anchor_of(job.pid)))
    job.go()
    assert identity.view_of(job.read("daemon")) == "env-a"
    daemon = orphan(job)
    assert identity.view_of(daemon) == "env-a"


def test_anchor_only_orphan_never_seen_is_found_through_the_subreaper(
    spawn: Callable[[str], Script],
) -> None:
    """The launcher's keeper (B) is a child subreaper, like this anchor: an orphan of the job
    is reparented to it, so the walk up still meets the anchor."""
    job = spawn(DOUBLE_FORK.replace('"--subreaper" in sys.argv', "True"))
    identity = Identity()
    identity.register(JobRecord("j1", "env-a", None, anchor_of(job.pid)))
    job.go()
    daemon = orphan(job)
    assert ppid_of(daemon) == job.pid
    assert identity.view_of(daemon) == "env-a"


def test_anchor_only_orphan_never_seen_without_a_subreaper_is_lost(
    spawn: Callable[[str], Script],
) -> None:
    """Why the keeper must be a subreaper when there is no cgroup: with neither, an orphan
    nobody looked at before its parent died has no link left to the job."""
    job = spawn(DOUBLE_FORK)
    identity = Identity()
    identity.register(JobRecord("j1", "env-a", None, anchor_of(job.pid)))
    job.go()
    daemon = orphan(job)
    assert identity.view_of(daemon) is None


def test_recycled_pid_is_not_the_anchor(spawn: Callable[[str], Script]) -> None:
    """An anchor whose start time differs is another process that had the same pid."""
    job = spawn(TREE)
    identity = Identity()
    pid, started = anchor_of(job.pid)
    identity.register(JobRecord("j1", "env-a", None, (pid, started - 1)))
    job.go()
    assert identity.view_of(job.read("child")) is None
    assert identity.view_of(job.pid) is None


def test_membership_is_sticky_after_leaving_the_cgroup(
    spawn: Callable[[str], Script], make_group: Callable[[str], TestGroup]
) -> None:
    job = spawn(DOUBLE_FORK)
    group = make_group("sticky")
    group.add(job.pid)
    identity = Identity()
    identity.register(JobRecord("j1", "env-a", group.name, None))
    job.go()
    daemon = orphan(job)
    assert identity.view_of(daemon) == "env-a"
    group.move_out(daemon)
    with open(f"/proc/{daemon}/cgroup") as f:
        assert group.name not in f.read()
    assert identity.view_of(daemon) == "env-a"


def test_host_verdicts_are_dropped_when_a_job_registers(spawn: Callable[[str], Script]) -> None:
    """The launcher registers a job whose process already exists (suspended): a verdict of
    'host' reached for it before must not survive the registration."""
    first, suspended = spawn(TREE), spawn(TREE)
    identity = Identity()
    identity.register(JobRecord("j0", "env-0", None, anchor_of(first.pid)))
    assert identity.view_of(suspended.pid) is None
    identity.register(JobRecord("j1", "env-a", None, anchor_of(suspended.pid)))
    assert identity.view_of(suspended.pid) == "env-a"
    suspended.go()
    assert identity.view_of(suspended.read("child")) == "env-a"


def test_two_jobs_and_unregister(spawn: Callable[[str], Script]) -> None:
    a, b = spawn(TREE), spawn(TREE)
    identity = Identity()
    record_a = JobRecord("ja", "env-a", None, anchor_of(a.pid))
    identity.register(record_a)
    identity.register(JobRecord("jb", "env-b", None, anchor_of(b.pid)))
    a.go()
    b.go()
    assert identity.view_of(a.read("grandchild")) == "env-a"
    assert identity.view_of(b.read("grandchild")) == "env-b"
    identity.unregister("jb")
    identity.unregister("jb")  # unknown ids are ignored
    assert identity.jobs() == [record_a]
    assert identity.view_of(b.read("grandchild")) is None
    assert identity.view_of(b.read("child")) is None
    assert identity.view_of(a.read("child")) == "env-a"


def test_unclassifiable(spawn: Callable[[str], Script]) -> None:
    job = spawn(TREE)
    identity = Identity()
    identity.register(JobRecord("j1", "env-a", None, anchor_of(job.pid)))
    for pid in (0, -1):
        with pytest.raises(Unclassifiable):
            identity.view_of(pid)
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(Unclassifiable):
        identity.view_of(gone.pid)


def test_a_remembered_verdict_dies_with_its_process(spawn: Callable[[str], Script]) -> None:
    """Verdicts of recent callers are kept with a pidfd, not by pid: once the process is gone
    its pid gets no verdict from the cache — whoever has that pid next is judged afresh."""
    job = spawn(TREE)
    identity = Identity()
    identity.register(JobRecord("j1", "env-a", None, anchor_of(job.pid)))
    member = subprocess.Popen(["sleep", "60"])  # a host process, judged and remembered
    assert identity.view_of(member.pid) is None
    assert identity.view_of(member.pid) is None  # from the cache now
    member.kill()
    member.wait()
    with pytest.raises(Unclassifiable):
        identity.view_of(member.pid)


def test_caches_stay_bounded(spawn: Callable[[str], Script]) -> None:
    job = spawn(TREE)
    identity = Identity(cache_limit=20)
    identity.register(JobRecord("j1", "env-a", None, anchor_of(job.pid)))
    job.go()
    for _ in range(60):
        short = subprocess.Popen(["sleep", "0"])
        assert identity.view_of(short.pid) is None
        short.wait()
    cached = len(identity._host) + len(identity._members)
    assert cached <= 2 * 20
    assert identity.view_of(job.read("grandchild")) == "env-a"
