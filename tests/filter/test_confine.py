"""Confinement of a job without namespaces (the filter engine): Landlock on real processes, and
the launcher's namespace-less mode (keeper subreaper, kill on exit and on launcher death)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from isolated_agent.engines.kernel import KernelEngine
from isolated_agent.env.store import Root
from isolated_agent.errors import IsolationError
from isolated_agent.jobs.confine import confine_job
from isolated_agent.jobs.launcher import Job, JobSpec, run_job
from isolated_agent.jobs.sandbox import SandboxSpec
from isolated_agent.system import libc
from tests.conftest import DISK_SCRATCH_PREFIX

ABI = libc.landlock_abi()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A scratch dir on disk, outside /tmp (which confined jobs may write to)."""
    path = Path(tempfile.mkdtemp(prefix=os.path.basename(DISK_SCRATCH_PREFIX), dir="/var/tmp"))
    assert str(path).startswith(DISK_SCRATCH_PREFIX)
    (path / "allowed").mkdir()
    (path / "other").mkdir()
    (path / "other" / "file").write_text("host\n")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def confined(write_paths: list[str], body: Callable[[], Any]) -> Any:
    """Run `body` in a forked child confined to `write_paths`; return what it returned (JSON)
    or raise what it raised, as a string."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            libc.set_no_new_privs()
            confine_job(write_paths)
            os.write(w, json.dumps({"ok": body()}).encode())
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            with contextlib.suppress(BaseException):
                os.write(w, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        raw = f.read()
    os.waitpid(pid, 0)
    result = json.loads(raw)
    if "error" in result:
        raise AssertionError(result["error"])
    return result["ok"]


def errno_of(action: Callable[[], object]) -> int:
    try:
        action()
    except OSError as e:
        return e.errno or 0
    return 0


def test_writes_only_beneath_the_write_paths(scratch: Path) -> None:
    allowed, other = scratch / "allowed", scratch / "other"

    def body() -> dict[str, int | str]:
        (allowed / "new").write_text("env\n")
        return {
            "write_other": errno_of(lambda: (other / "new").write_text("x")),
            "append_other": errno_of(lambda: open(other / "file", "a").close()),
            "truncate_other": errno_of(lambda: os.truncate(other / "file", 0)),
            "mkdir_other": errno_of(lambda: os.mkdir(other / "d")),
            "unlink_other": errno_of(lambda: os.unlink(other / "file")),
            "move_out": errno_of(lambda: os.rename(allowed / "new", other / "moved")),
            "read_other": (other / "file").read_text(),
            "exec": subprocess.run(["/usr/bin/true"]).returncode,
            "tmp": errno_of(lambda: tempfile.TemporaryFile(dir="/tmp").close()),
            "devnull": errno_of(lambda: open("/dev/null", "w").close()),
        }

    result = confined([str(allowed)], body)
    assert (allowed / "new").read_text() == "env\n"
    for key in ("write_other", "append_other", "truncate_other", "mkdir_other", "unlink_other"):
        assert result[key] == errno.EACCES, key
    assert result["move_out"] in (errno.EACCES, errno.EXDEV)
    assert result["read_other"] == "host\n"
    assert result["exec"] == result["tmp"] == result["devnull"] == 0
    assert sorted(os.listdir(other)) == ["file"]
    assert (other / "file").read_text() == "host\n"


@pytest.mark.skipif(ABI < 6, reason="signal scoping needs Landlock ABI 6")
def test_cannot_signal_outside_but_can_signal_its_own_children(scratch: Path) -> None:
    def body() -> dict[str, int]:
        child = subprocess.Popen(["sleep", "60"])
        try:
            own = errno_of(lambda: os.kill(child.pid, signal.SIGTERM))
            return {"parent": errno_of(lambda: os.kill(os.getppid(), 0)), "own": own}
        finally:
            child.kill()
            child.wait()

    assert confined([str(scratch / "allowed")], body) == {"parent": errno.EPERM, "own": 0}


def test_a_job_cannot_undo_it(scratch: Path) -> None:
    allowed, other = scratch / "allowed", scratch / "other"

    def body() -> int:
        confine_job([str(allowed), str(other)])  # asks for more: gets the intersection
        return errno_of(lambda: (other / "new").write_text("x"))

    assert confined([str(allowed)], body) == errno.EACCES
    assert not (other / "new").exists()


SHELL_WORK = textwrap.dedent(
    """\
    set -eu
    cd "$1"
    echo hello > f && cat f >/dev/null && rm f
    mkdir -p a/b && ln -s a l && mv a c && rm -r c l
    git init -q repo && cd repo
    echo one > x && git add x && git -c user.email=t@t -c user.name=t commit -qm one
    git checkout -qb topic && echo two >> x && git commit -qam two && git log --oneline >/dev/null
    python3 -c 'import tempfile, sys; tempfile.NamedTemporaryFile().close(); print("py")'
    ls /proc/self/fd > /dev/null
    t=$(mktemp) && echo tmp > "$t" && rm "$t"
    sleep 0.1 & wait
    echo ok
    """
)


def test_shell_git_and_python_work_confined(scratch: Path) -> None:
    allowed = str(scratch / "allowed")

    def body() -> list[object]:
        done = subprocess.run(
            ["bash", "-c", SHELL_WORK, "bash", allowed], capture_output=True, text=True
        )
        return [done.returncode, done.stdout, done.stderr]

    code, out, err = confined([allowed], body)
    assert (code, out) == (0, "py\nok\n"), err


def test_a_missing_write_path_is_an_isolation_error(scratch: Path) -> None:
    def body() -> str:
        try:
            confine_job([str(scratch / "missing")])
        except IsolationError as e:
            return str(e)
        return "confined"

    message = confined([str(scratch / "allowed")], body)
    assert message.startswith("isolation failed at confining the job: ")
    assert "missing: No such file or directory" in message


# -- the launcher without namespaces --------------------------------------------------------


class NeverMounts(KernelEngine):
    """Without namespaces the view is the filter mount's business, never the engine's."""

    def mount_root(self, root: Root, target: str, lower: str) -> None:
        raise AssertionError("mount_root called without namespaces")


def job_spec(scratch: Path, argv: list[str], **kwargs: Any) -> JobSpec:
    root = scratch / "allowed"
    sandbox = SandboxSpec(
        roots=(Root(0, str(root), str(scratch / "upper"), str(scratch / "work")),),
        allow=kwargs.pop("allow", ()),
        store=str(scratch / "store"),
        cwd=str(root),
        staging=str(scratch / "staging"),
    )
    return JobSpec(
        argv=argv,
        sandbox=sandbox,
        engine=NeverMounts(),
        rootless=False,
        namespaces=False,
        cgroup_label=f"ia-test-{os.getpid()}",
        **kwargs,
    )


def test_command_runs_in_its_directory_with_its_exit_status(scratch: Path) -> None:
    seen: list[Job] = []

    def on_ready(job: Job) -> None:
        seen.append(job)
        assert job.cgroup is not None, "these machines have a writable cgroup v2 subtree"
        with open(f"/proc/{job.pid}/cgroup") as f:
            assert os.path.basename(job.cgroup.path) in f.read()

    spec = job_spec(scratch, ["sh", "-c", "pwd > where; exit 7"])
    assert run_job(spec, on_ready) == 7
    assert (scratch / "allowed" / "where").read_text() == f"{scratch / 'allowed'}\n"
    assert len(seen) == 1
    assert seen[0].cgroup is not None and not os.path.exists(seen[0].cgroup.path)
    assert run_job(job_spec(scratch, ["sh", "-c", "kill -TERM $$"])) == 128 + signal.SIGTERM


def test_writes_outside_the_roots_and_allows_are_refused(scratch: Path) -> None:
    extra = scratch / "extra"
    extra.mkdir()
    script = (
        "echo env > inside; echo allowed > $1/ok; "
        "if echo no > $2/leak; then exit 1; fi; "
        "if echo no > /etc/ia-test-leak; then exit 2; fi"
    )
    argv = ["sh", "-c", script, "sh", str(extra), str(scratch / "other")]
    assert run_job(job_spec(scratch, argv, allow=(str(extra),))) == 0
    assert (scratch / "allowed" / "inside").exists()
    assert (extra / "ok").exists()
    assert sorted(os.listdir(scratch / "other")) == ["file"]
    assert not os.path.exists("/etc/ia-test-leak")


def test_a_confinement_failure_does_not_run_the_command(scratch: Path) -> None:
    spec = job_spec(scratch, ["touch", str(scratch / "allowed" / "ran")], allow=("/nonexistent",))
    with pytest.raises(IsolationError, match="confining the job: /nonexistent"):
        run_job(spec)
    assert not (scratch / "allowed" / "ran").exists()


def marker() -> str:
    return f"ia-filter-job-{os.getpid()}-{time.monotonic_ns()}"


def processes_with(mark: str) -> list[int]:
    done = subprocess.run(["pgrep", "-f", mark], capture_output=True, text=True)
    return [int(pid) for pid in done.stdout.split()]


def wait_until_gone(mark: str, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_with(mark)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


@pytest.fixture
def kill_leftovers() -> Iterator[list[str]]:
    """Marks of test processes: any still alive at the end are killed, by pid."""
    marks: list[str] = []
    yield marks
    for mark in marks:
        for pid in processes_with(mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def daemon_script(mark: str, then: str) -> str:
    """A setsid double-forked daemon (and a plain background child), both named `mark`,
    written to `ready` once they run; then `then` (which may use $M, the mark). The mark is
    never spelled whole in a command line but theirs: pgrep -f finds only them."""
    half = len(mark) // 2
    return (
        f"M='{mark[:half]}''{mark[half:]}'; "
        '(setsid bash -c \'exec -a "$0" sleep 1000\' "$M" </dev/null >/dev/null 2>&1 &); '
        '(exec -a "$M" sleep 1000) & '
        'while [ "$(pgrep -c -f "$M")" -lt 2 ]; do sleep 0.02; done; '
        f"echo up > ready; {then}"
    )


# A launcher in its own process, so that the test can SIGKILL it. `nocgroup` stands in for a
# host without a writable cgroup v2 subtree: then only the keeper holds the job together.
LAUNCHER = textwrap.dedent(
    """\
    import json, sys
    from isolated_agent.jobs import launcher
    from tests.filter.test_confine import job_spec
    from pathlib import Path
    scratch, nocgroup, argv = Path(sys.argv[1]), sys.argv[2] == "1", json.loads(sys.argv[3])
    if nocgroup:
        launcher.JobCgroup.create = staticmethod(lambda label, limits=None: None)
    sys.exit(launcher.run_job(job_spec(scratch, argv)))
    """
)


def launch(scratch: Path, argv: list[str], cgroup: bool) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(scratch), "0" if cgroup else "1", json.dumps(argv)],
        cwd=Path(__file__).resolve().parents[2],
    )


def remove_groups_of(pid: int) -> None:
    """The cgroup of a launcher that was killed (the next run's sweep would remove it)."""
    from isolated_agent.system.cgroup import own_v2_path, v2_mount_point

    mount, own = v2_mount_point(), own_v2_path()
    assert mount is not None and own is not None
    parent = os.path.join(mount, own.lstrip("/"))
    for name in os.listdir(parent):
        if name.startswith("isolated-agent-ia-test-") and name.endswith(f"-{pid}"):
            with contextlib.suppress(OSError):
                Path(parent, name, "cgroup.kill").write_text("1")
            deadline = time.monotonic() + 5
            while os.path.exists(os.path.join(parent, name)) and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(parent, name))
                time.sleep(0.01)


@pytest.mark.parametrize("cgroup", [True, False], ids=["cgroup", "keeper-only"])
def test_daemons_are_killed_when_the_command_exits(
    scratch: Path, kill_leftovers: list[str], cgroup: bool
) -> None:
    mark = marker()
    kill_leftovers.append(mark)
    launcher = launch(scratch, ["bash", "-c", daemon_script(mark, "exit 3")], cgroup)
    try:
        assert launcher.wait(timeout=30) == 3
        assert (scratch / "allowed" / "ready").exists()
        assert processes_with(mark) == []  # gone by the time run_job returned
    finally:
        with contextlib.suppress(ProcessLookupError):
            launcher.kill()
        launcher.wait()
        remove_groups_of(launcher.pid)


@pytest.mark.parametrize("cgroup", [True, False], ids=["cgroup", "keeper-only"])
def test_sigkill_of_the_launcher_kills_the_whole_job(
    scratch: Path, kill_leftovers: list[str], cgroup: bool
) -> None:
    mark = marker()
    kill_leftovers.append(mark)
    script = daemon_script(mark, 'exec -a "$M" sleep 1000')
    launcher = launch(scratch, ["bash", "-c", script], cgroup)
    try:
        deadline = time.monotonic() + 30
        while not (scratch / "allowed" / "ready").exists():
            assert launcher.poll() is None, "the launcher ended early"
            assert time.monotonic() < deadline, "the job never got ready"
            time.sleep(0.02)
        assert len(processes_with(mark)) == 3
        launcher.kill()
        launcher.wait()
        assert wait_until_gone(mark) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            launcher.kill()
        launcher.wait()
        remove_groups_of(launcher.pid)


def test_keep_running_waits_for_the_daemons(scratch: Path, kill_leftovers: list[str]) -> None:
    script = "(setsid sh -c 'sleep 0.3; echo late > late' </dev/null >/dev/null 2>&1 &)"
    assert run_job(job_spec(scratch, ["sh", "-c", script], keep_running=True)) == 0
    assert (scratch / "allowed" / "late").read_text() == "late\n"
