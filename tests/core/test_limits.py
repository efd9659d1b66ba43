"""`run --memory/--pids/--cpus`: set on the job's cgroup v2 group, or the run is refused with
the reason — never a silent unlimited job. The refusal is made for real (agentctl put in a
group whose parent delegates no controller); enforcement runs where the test can give a group
the controllers (not on a host whose controllers are all bound to cgroup v1)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isolated_agent.system.cgroup import Limits, own_group


def agentctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "isolated_agent", *args]


@pytest.mark.unit
def test_limits_become_the_groups_control_files() -> None:
    assert not Limits()
    assert Limits(memory=64 << 20).files() == {"memory.max": str(64 << 20),
                                               "memory.swap.max": "0"}
    assert Limits(pids=10).files() == {"pids.max": "10"}
    assert Limits(cpus=1.5).files() == {"cpu.max": "150000 100000"}
    assert Limits(cpus=0.001).files() == {"cpu.max": "1000 100000"}  # the kernel's minimum
    assert Limits(memory=1, pids=1, cpus=1).controllers() == ["memory", "pids", "cpu"]


@pytest.mark.parametrize("option,value", [("--memory", "lots"), ("--pids", "0"),
                                          ("--cpus", "0")])
def test_bad_limits_are_usage_errors(project: Path, option: str, value: str) -> None:
    done = subprocess.run(agentctl("run", option, value, "--", "true"), cwd=project,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert option in done.stderr


@contextlib.contextmanager
def group(controllers: str = "") -> Iterator[Path]:
    """A fresh group under ours, its children given `controllers`; removed after."""
    parent = own_group()
    if parent is None:
        pytest.skip("no cgroup v2 hierarchy")
    path = Path(parent) / f"ia-test-limits-{os.getpid()}"
    path.mkdir()
    try:
        if controllers:
            try:
                (path / "cgroup.subtree_control").write_text(controllers)
            except OSError as e:
                pytest.skip(f"cannot delegate {controllers} here: {e.strerror}")
        yield path
    finally:
        for _ in range(200):
            for child in [p for p in path.iterdir() if p.is_dir()]:
                with contextlib.suppress(OSError):
                    child.rmdir()
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def in_group(path: Path, argv: list[str]) -> list[str]:
    return ["sh", "-c", f"echo $$ > {path}/cgroup.procs && exec \"$@\"", "sh", *argv]


def test_limits_refused_where_no_controller_is_delegated(project: Path, tmp_path: Path) -> None:
    env = dict(os.environ, ISOLATED_AGENT_HOME=str(tmp_path / "store"))
    with group() as bare:
        assert "memory" not in (bare / "cgroup.controllers").read_text().split()
        done = subprocess.run(in_group(bare, agentctl("run", "--memory", "1G", "--", "touch",
                                                      "ran")),
                              cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 125, done.stderr
    assert f"isolation failed at resource limits: the cgroup {bare} has no memory controller" \
        in done.stderr
    assert "systemd-run --user --scope -p Delegate=yes" in done.stderr
    assert "`agentctl doctor`" in done.stderr
    listed = subprocess.run(agentctl("env", "list", "--json"), env=env, capture_output=True,
                            text=True, timeout=60)
    assert listed.stdout.strip() == "[]", "a refused run created an env"


def test_limits_are_enforced_where_they_can_be_set(project: Path, tmp_path: Path) -> None:
    """agentctl alone in a group of its own (as under systemd-run --scope) moves itself into a
    leaf, enables the controllers, and the job cannot pass its limits."""
    parent = Path(own_group() or "/nonexistent")
    if not {"memory", "pids"} <= set((parent / "cgroup.controllers").read_text().split()
                                     if parent.exists() else ()):
        pytest.skip("this host's cgroup v2 has no memory and pids controllers (bound to v1)")
    env = dict(os.environ, ISOLATED_AGENT_HOME=str(tmp_path / "store"))
    with group("+memory +pids") as scope:
        forks = subprocess.run(
            in_group(scope, agentctl("run", "-q", "--pids", "8", "--", "sh", "-c",
                                     "for i in $(seq 30); do sleep 3 & done; wait")),
            cwd=project, env=env, capture_output=True, text=True, timeout=60)
        assert "fork" in forks.stderr.lower() or forks.returncode != 0, forks.stderr
        hog = subprocess.run(
            in_group(scope, agentctl("run", "-q", "--memory", "32M", "--", sys.executable,
                                     "-c", "b = bytearray(256 << 20); b[::4096] = b'x' * 65536")),
            cwd=project, env=env, capture_output=True, text=True, timeout=60)
        assert hog.returncode == 128 + 9, hog.stderr  # the OOM killer's SIGKILL
        fine = subprocess.run(in_group(scope, agentctl("run", "-q", "--memory", "256M",
                                                       "--pids", "64", "--", "true")),
                              cwd=project, env=env, capture_output=True, text=True, timeout=60)
        assert fine.returncode == 0, fine.stderr
