"""`agentctl run --engine fuse`: agentfs serves the job from the host side, invisible to it,
with nothing mounted on the host, and fails closed when its daemon dies."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agentfs.conftest import bind_read_only, force_unmount, wait_for
from tests.conftest import Agentctl, snapshot
from tests.core.test_run import JOB_PYTHON, MANIFEST, WORKLOAD, manifest_in_env, manifest_of


@pytest.fixture
def ro_project(project: Path) -> Iterator[Path]:
    """The project, bind-mounted read-only on the host: a leak to it fails loudly."""
    bind_read_only(project)
    try:
        yield project
    finally:
        force_unmount(project)


def test_fuse_run_keeps_the_host_and_the_next_run_sees_the_changes(
    agentctl: Agentctl, ro_project: Path, tmp_path: Path
) -> None:
    project = ro_project
    reference = tmp_path / "reference"
    subprocess.run(["cp", "-a", str(project), str(reference)], check=True)
    subprocess.run(["sh", "-c", WORKLOAD], cwd=reference, check=True)
    before = snapshot(project)
    done = agentctl("run", "--engine", "fuse", "--env", "w", "--", "sh", "-c", WORKLOAD,
                    cwd=project)
    assert done.returncode == 0, done.stderr
    assert "fuse engine" in done.stderr
    assert snapshot(project) == before
    seen = agentctl("run", "-q", "--engine", "fuse", "--env", "w", "--",
                    JOB_PYTHON, "-c", MANIFEST, cwd=project)
    assert seen.returncode == 0, seen.stderr
    import json

    assert json.loads(seen.stdout) == manifest_of(reference)
    # The same env through the kernel engine: one format for every engine.
    assert manifest_in_env(agentctl, "w", project) == manifest_of(reference)
    assert snapshot(project) == before


def test_renaming_a_project_dir_works_where_the_kernel_says_exdev(
    agentctl: Agentctl, ro_project: Path
) -> None:
    script = "import os; os.rename('src', 'moved'); print(sorted(os.listdir('moved')))"
    fuse = agentctl("run", "-q", "--engine", "fuse", "--env", "f", "--",
                    JOB_PYTHON, "-c", script, cwd=ro_project)
    assert fuse.returncode == 0, fuse.stderr
    assert fuse.stdout.strip() == "['main.py', 'pkg']"
    kernel = agentctl("run", "-q", "--engine", "kernel", "--env", "k", "--",
                      JOB_PYTHON, "-c", script, cwd=ro_project)
    assert kernel.returncode == 1
    assert "Invalid cross-device link" in kernel.stderr


def test_the_job_cannot_see_its_daemon_or_unmount_its_view(
    agentctl: Agentctl, ro_project: Path
) -> None:
    script = (
        "ls /proc | grep -E '^[0-9]+$' | wc -l; "
        "grep -c ' - fuse.agentfs ' /proc/self/mountinfo; "
        f"umount {ro_project} 2>/dev/null && echo unmounted || echo refused"
    )
    done = agentctl("run", "-q", "--engine", "fuse", "--", "sh", "-c", script, cwd=ro_project)
    assert done.returncode == 0, done.stderr
    processes, mounts, umount = done.stdout.split()
    assert int(processes) <= 5  # pid 1, sh, ls, grep, wc: no filesystem daemon
    assert mounts == "1"
    assert umount == "refused"


def _daemons_of(launcher: int) -> list[int]:
    """The launcher's children that serve /dev/fuse: the agentfs daemons (the job's first
    process leads a session of its own too)."""
    with open(f"/proc/{launcher}/task/{launcher}/children") as f:
        children = [int(p) for p in f.read().split()]
    return [pid for pid in children if _holds_fuse_device(pid)]


def _holds_fuse_device(pid: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:  # by device number: a descriptor passed from the job's namespace has no
        with contextlib.suppress(OSError):  # host path
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(10, 229):
                return True
    return False


def test_a_dead_daemon_fails_closed(
    store_home: Path, ro_project: Path
) -> None:
    before = snapshot(ro_project)
    job = (
        "import os, sys, time\n"
        "print('ready', flush=True)\n"
        "for i in range(400):\n"
        "    try:\n"
        "        open('probe-%d' % i, 'w').close()\n"
        "    except OSError as e:\n"
        "        print('error', e.errno, flush=True); sys.exit(3)\n"
        "    time.sleep(0.025)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "isolated_agent", "run", "-q", "--engine", "fuse", "--",
         JOB_PYTHON, "-c", job],
        cwd=ro_project, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, ISOLATED_AGENT_HOME=str(store_home)),
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        wait_for(lambda: bool(_daemons_of(process.pid)), what="the agentfs daemon")
        for pid in _daemons_of(process.pid):
            os.kill(pid, signal.SIGKILL)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 3
    # ENOTCONN, or ECONNABORTED for a request in flight when it died: never the host's files.
    assert out.strip() in ("error 107", "error 103")
    assert snapshot(ro_project) == before


def test_auto_picks_the_kernel_engine_when_it_works(
    agentctl: Agentctl, ro_project: Path
) -> None:
    done = agentctl("run", "--", "true", cwd=ro_project)
    assert done.returncode == 0, done.stderr
    assert "kernel engine" in done.stderr


def test_back_to_back_fuse_runs_leave_nothing_behind(
    agentctl: Agentctl, ro_project: Path, store_home: Path
) -> None:
    for i in range(3):  # the env is free again the moment a run returns
        done = agentctl("run", "-q", "--engine", "fuse", "--env", "b", "--",
                        "sh", "-c", f"echo {i} >> count", cwd=ro_project)
        assert done.returncode == 0, done.stderr
    seen = agentctl("run", "-q", "--engine", "fuse", "--env", "b", "--", "cat", "count",
                    cwd=ro_project)
    assert seen.stdout.split() == ["0", "1", "2"]
    logs = list((store_home / "run").glob("agentfs-*.log"))
    assert all("Traceback" not in log.read_text() for log in logs)
