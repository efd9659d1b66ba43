"""`agentctl ps` lists running jobs; `agentctl exec` runs a command in a running job's view,
confined as the job is, on every engine: it sees the job's changes, its own writes land in the
env (never on the host), and it ends with the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import snapshot, user_agentctl

# The job: says it started (in the env), waits until a `stop` file appears in its view.
# After `stop` appears the job lingers a second: an exec that made it (`touch stop`) must get
# to report its status before the job's end kills what runs in the job's pid namespace.
WAITING_JOB = ("echo started > started; while [ ! -e stop ]; do sleep 0.05; done; sleep 1; "
               "echo done")


def agentctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "isolated_agent", *args]


def wait_for(condition: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def running_job(argv: list[str], cwd: Path, ps: list[str],
                env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """`agentctl run ...` in the background until `agentctl ps` lists it; killed after."""
    job = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        def listed() -> bool:
            done = subprocess.run(ps, capture_output=True, text=True, timeout=30, env=env)
            return bool(done.stdout.strip()) and json.loads(done.stdout) != []

        wait_for(listed, "the job in agentctl ps")
        yield job
    finally:
        if job.poll() is None:
            job.send_signal(signal.SIGTERM)
            try:
                job.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.kill()
                job.wait()


@pytest.mark.parametrize("engine", ["kernel", "fuse"])
def test_exec_joins_a_running_job(engine: str, project: Path, store_home: Path) -> None:
    before = snapshot(project)
    run = agentctl("run", "--env", "e1", "--engine", engine, "--", "sh", "-c", WAITING_JOB)
    with running_job(run, project, agentctl("ps", "--json")) as job:
        [listed] = json.loads(subprocess.run(agentctl("ps", "--json"), capture_output=True,
                                             text=True, timeout=30).stdout)
        assert (listed["env"], listed["engine"]) == ("e1", engine)
        assert listed["command"] == ["sh", "-c", WAITING_JOB]
        assert listed["launcher_pid"] == job.pid and listed["pid"] != job.pid  # A, its child
        assert abs(listed["started"] - time.time()) < 60
        script = ("cat started; echo from-exec > exec-made; cat /proc/1/cmdline | tr '\\0' ' '; "
                  "echo; echo x > /var/tmp/ia-exec-escape 2>/dev/null || echo outside-refused; "
                  "grep CapEff /proc/self/status; exit 7")
        done = subprocess.run(agentctl("exec", "e1", "--", "sh", "-c", script), cwd=project,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 7, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "started"  # the job's change, seen in its view
        assert "python" in lines[1] and "isolated_agent" in lines[1]  # the job's pid 1
        assert lines[2:] == ["outside-refused", "CapEff:\t0000000000000000"]
        assert f"env e1, in the {engine} engine's job" in done.stderr
        stop = subprocess.run(agentctl("exec", "-q", "--", "touch", "stop"), cwd=project,
                              capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        out, err = job.communicate(timeout=60)
        assert job.returncode == 0, err
        assert out == "done\n"
    assert not os.path.exists("/var/tmp/ia-exec-escape")
    assert snapshot(project) == before  # every write is in the env
    diff = subprocess.run(agentctl("diff", "e1", "--name-status"), capture_output=True,
                          text=True, timeout=60)
    assert diff.stdout.split("\n") == ["A\texec-made", "A\tstarted", "A\tstop", ""]
    assert json.loads(subprocess.run(agentctl("ps", "--json"), capture_output=True,
                                     text=True, timeout=30).stdout) == []


def test_exec_keeps_the_jobs_network(project: Path, store_home: Path) -> None:
    run = agentctl("run", "--network", "none", "--", "sh", "-c", WAITING_JOB)
    with running_job(run, project, agentctl("ps", "--json")):
        done = subprocess.run(agentctl("exec", "-q", "--", "sh", "-c",
                                       "cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' '; "
                                       "touch stop"),
                              cwd=project, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["lo"]


def test_exec_ends_with_the_job(project: Path, store_home: Path) -> None:
    run = agentctl("run", "--", "sh", "-c", WAITING_JOB)
    with running_job(run, project, agentctl("ps", "--json")) as job:
        long = subprocess.Popen(agentctl("exec", "-q", "--", "sh", "-c",
                                         "touch exec-started; exec sleep 300"),
                                cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        wait_for(lambda: subprocess.run(agentctl("exec", "-q", "--", "test", "-e",
                                                 "exec-started"), cwd=project,
                                        capture_output=True, timeout=60).returncode == 0,
                 "the exec'd sleep")
        subprocess.run(agentctl("exec", "-q", "--", "touch", "stop"), cwd=project,
                       capture_output=True, timeout=60, check=True)
        job.wait(timeout=60)
        long.wait(timeout=30)  # its pid namespace ended: the kernel killed it
        assert long.returncode == 128 + signal.SIGKILL


def test_exec_without_a_job_says_so(project: Path, store_home: Path) -> None:
    done = subprocess.run(agentctl("exec", "--", "true"), cwd=project, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "agentctl: no job is running; start one with agentctl run\n"
    subprocess.run(agentctl("env", "create", "idle"), cwd=project, check=True,
                   capture_output=True, timeout=60)
    done = subprocess.run(agentctl("exec", "idle", "--", "true"), cwd=project,
                          capture_output=True, text=True, timeout=60)
    assert "no job is running in env idle" in done.stderr


def test_ps_forgets_a_job_whose_launcher_was_killed(project: Path, store_home: Path) -> None:
    run = agentctl("run", "--", "sh", "-c", WAITING_JOB)
    with running_job(run, project, agentctl("ps", "--json")) as job:
        job.kill()  # SIGKILL: no chance to remove its record
        job.wait()
    wait_for(lambda: json.loads(subprocess.run(agentctl("ps", "--json"), capture_output=True,
                                               text=True, timeout=30).stdout) == [],
             "the dead job gone from ps")
    assert os.listdir(store_home / "run" / "jobs") == []


def test_exec_joins_a_filter_job(
    unprivileged_user: object, package_copy: Path, user_dir: Path, user_project: Path,
    fuse_open_to_users: None,
) -> None:
    """The filter engine (a user's job, no namespaces): exec's process is registered with the
    filter daemon as part of the env, and confined by Landlock as the job is."""
    before = snapshot(user_project)
    store = user_dir / "store"

    def as_user(*args: str) -> list[str]:
        return user_agentctl(package_copy, store, user_project, *args)

    outside = user_dir / "outside"
    try:
        run = as_user("run", "--engine", "filter", "--", "sh", "-c", WAITING_JOB)
        with running_job(run, user_project, as_user("ps", "--json")) as job:
            script = (f"cat started; echo from-exec > README.md; "
                      f"echo x > {outside} 2>/dev/null || echo outside-refused; touch stop")
            done = subprocess.run(as_user("exec", "-q", "--", "sh", "-c", script),
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            assert done.stdout.splitlines() == ["started", "outside-refused"]
            out, err = job.communicate(timeout=60)
            assert job.returncode == 0, err
        subprocess.run(as_user("filter", "stop", str(user_project)), capture_output=True,
                       timeout=60)
    finally:
        subprocess.run(["umount", "-l", str(user_project)], capture_output=True)
    assert not outside.exists()
    assert snapshot(user_project) == before
    diff = subprocess.run(as_user("diff", "--name-status"), capture_output=True, text=True,
                          timeout=60)
    assert "M\tREADME.md" in diff.stdout.splitlines(), diff.stderr


def test_exec_joins_a_copy_job(
    unprivileged_user: object, package_copy: Path, user_dir: Path, user_project: Path,
) -> None:
    """The copy engine: exec works in the job's clone, with the job's private tmp."""
    store = user_dir / "store"

    def as_user(*args: str) -> list[str]:
        return user_agentctl(package_copy, store, user_project, *args)

    run = as_user("run", "--engine", "copy", "--", "sh", "-c", WAITING_JOB)
    with running_job(run, user_project, as_user("ps", "--json")) as job:
        script = 'cat started; pwd; echo x > "$TMPDIR/t" && echo tmp-ok; touch stop'
        done = subprocess.run(as_user("exec", "-q", "--", "sh", "-c", script),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "started" and lines[1].endswith("/copy/root-0")
        assert lines[2] == "tmp-ok"
        job.communicate(timeout=60)
        assert job.returncode == 0
    assert not (user_project / "started").exists()
    diff = subprocess.run(as_user("diff", "--name-status"), capture_output=True, text=True,
                          timeout=60)
    assert diff.stdout.splitlines() == ["A\tstarted", "A\tstop"], diff.stderr
