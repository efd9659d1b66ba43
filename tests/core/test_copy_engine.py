"""The copy engine (`run --engine copy`): the job works in a clone of each root; what it changed
is recorded in the env's upper layer in the overlay format. Proved against the kernel engine:
the same workload gives the same view and, after commit, the same host tree."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from isolated_agent.env import clone
from isolated_agent.env.store import Store
from tests.conftest import user_agentctl
from tests.core.test_rootless import LIMIT_USER_NAMESPACES
from tests.core.test_run import MANIFEST, WORKLOAD, manifest_of


def test_recorded_clone_reads_back_through_overlayfs(project: Path, store_home: Path,
                                                    disk_dir: Path) -> None:
    """Storage alone, as root: materialize the env over a stack that already has changes,
    run the workload in the clone, record; the kernel's overlay of the env then shows exactly
    the clone, and a second clone of the env equals it too."""
    store = Store(str(store_home))
    env = store.create("c", [str(project)])
    [root] = env.roots
    # Earlier changes in the upper (as a kernel-engine run leaves them): the clone starts there.
    subprocess.run([sys.executable, "-m", "isolated_agent", "run", "-q", "--env", "c", "--",
                    "sh", "-c", "echo before > before.txt; rm src/pkg/__init__.py"],
                   cwd=project, check=True, timeout=60)
    made = clone.materialize(root, str(disk_dir / "clone"))
    assert (disk_dir / "clone" / "before.txt").read_text() == "before\n"
    assert not (disk_dir / "clone" / "src" / "pkg" / "__init__.py").exists()
    # ... then a directory made anew where the host has one (the old one kept, so its inode
    # is not reused): opaque over the host's.
    extra = "rm before.txt\nmv src src.old && mkdir src && echo n > src/n\n"
    subprocess.run(["sh", "-c", WORKLOAD + extra], cwd=disk_dir / "clone", check=True)
    expected = manifest_of(disk_dir / "clone")
    clone.record(made)
    seen = subprocess.run([sys.executable, "-m", "isolated_agent", "run", "-q", "--env", "c",
                           "--engine", "kernel", "--", "/usr/bin/python3", "-c", MANIFEST],
                          cwd=project, capture_output=True, text=True, timeout=60)
    assert seen.returncode == 0, seen.stderr
    assert json.loads(seen.stdout) == expected
    again = clone.materialize(root, str(disk_dir / "again"))
    assert manifest_of(disk_dir / "again") == expected
    assert again.entries.keys() == {p[2:] for p in expected}


def user_run(package_copy: Path, store: Path, cwd: Path, *args: str,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(user_agentctl(package_copy, store, cwd, *args, env=env),
                          capture_output=True, text=True, timeout=120)


def test_copy_engine_commits_what_the_kernel_engine_commits(
    unprivileged_user: object, package_copy: Path, user_dir: Path, user_project: Path
) -> None:
    twin = user_dir / "twin"
    shutil.copytree(user_project, twin, symlinks=True)
    subprocess.run(["chown", "-R", "ia-rootless:ia-rootless", str(twin)], check=True)
    store = user_dir / "store"
    results = {}
    for engine, tree in (("copy", user_project), ("kernel", twin)):
        done = user_run(package_copy, store, tree, "run", "--env", engine, "--engine", engine,
                        "--", "sh", "-c", WORKLOAD)
        assert done.returncode == 0, done.stderr
        diff = user_run(package_copy, store, tree, "diff", engine, "--name-status")
        assert diff.returncode == 0, diff.stderr
        committed = user_run(package_copy, store, tree, "commit", engine)
        assert committed.returncode == 0, committed.stderr
        results[engine] = (diff.stdout, manifest_of(tree))
    assert results["copy"] == results["kernel"]
    assert results["copy"][1]["./new.txt"][3] is not None  # the workload's changes landed


def test_copy_engine_job_sees_a_clone_and_writes_nowhere_else(
    unprivileged_user: object, package_copy: Path, user_dir: Path, user_project: Path
) -> None:
    store = user_dir / "store"
    host_tmp = Path("/tmp") / f"ia-copy-{os.getpid()}"
    script = (
        'echo "$PWD"; pwd; '
        f"echo x > {user_project}/escape 2>/dev/null || echo project-refused; "
        f"echo x > {host_tmp} 2>/dev/null || echo tmp-refused; "
        'echo x > "$TMPDIR/mine" && echo private-tmp-written; '
        f"chmod 777 {user_project}/README.md 2>/dev/null || echo chmod-refused; "
        "echo changed > README.md"
    )
    done = user_run(package_copy, store, user_project / "src", "run", "--env", "cp",
                    "--root", str(user_project), "--engine", "copy", "--", "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    env_dir = next((store / "envs").iterdir())
    clone_src = str(env_dir / "copy" / "root-0" / "src")
    assert lines == [clone_src, clone_src, "project-refused", "tmp-refused",
                     "private-tmp-written", "chmod-refused"]
    assert "copy engine: the job works in a copy of" in done.stderr
    assert "not at its real path" in done.stderr
    assert not (user_project / "escape").exists() and not host_tmp.exists()
    assert (user_project / "README.md").stat().st_mode & 0o777 != 0o777
    assert not (env_dir / "copy").exists(), "the clones outlived the run"
    diff = user_run(package_copy, store, user_project, "diff", "cp", "--name-status")
    assert diff.stdout.splitlines() == ["A\tsrc/README.md"], diff.stderr


def test_a_killed_copy_run_is_recorded_by_the_next(
    unprivileged_user: object, package_copy: Path, user_dir: Path, user_project: Path
) -> None:
    store = user_dir / "store"
    argv = user_agentctl(package_copy, store, user_project, "run", "--env", "k", "--engine",
                         "copy", "--", "sh", "-c", "echo kept > kept.txt; sleep 300")
    job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(store.glob("envs/*/copy/root-0/kept.txt")):
            assert time.monotonic() < deadline, "the job never wrote"
            time.sleep(0.05)
    finally:
        job.send_signal(signal.SIGKILL)  # the launcher: no chance to record
        job.wait()
    subprocess.run(["pkill", "-KILL", "-u", "ia-rootless", "-x", "sleep"], check=False)
    # The next run records it, whatever its engine.
    done = user_run(package_copy, store, user_project, "run", "--env", "k", "--engine",
                    "kernel", "--", "cat", "kept.txt")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "kept\n"
    assert "recorded the changes of a copy-engine run that could not record them" in done.stderr


def test_auto_falls_back_to_copy_where_nothing_else_runs_and_says_why(
    unprivileged_user: object, package_copy: Path, user_dir: Path, user_project: Path
) -> None:
    """No user namespaces (limited to 0 in a child user namespace) and no /dev/fuse for the
    user (a 0600 node bound over it in a mount namespace): only the copy engine can run."""
    node = user_dir / "fuse"
    os.mknod(node, 0o600 | 0o020000, os.makedev(10, 229))
    argv = user_agentctl(package_copy, user_dir / "store", user_project, "run", "--", "sh",
                         "-c", "echo made > made.txt; pwd")
    hide_fuse = f"mount --bind {node} /dev/fuse && exec \"$@\""
    wrapped = ["unshare", "--mount", "--propagation", "private", "sh", "-c", hide_fuse, "sh",
               sys.executable, "-c", LIMIT_USER_NAMESPACES, *argv]
    done = subprocess.run(wrapped, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ", copy engine" in done.stderr
    assert "no engine but copy can run here (" in done.stderr
    assert "not at its real path" in done.stderr
    assert done.stdout.strip().endswith("/copy/root-0")
    assert not (user_project / "made.txt").exists()
