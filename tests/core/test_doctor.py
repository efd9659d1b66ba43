"""`agentctl doctor` against conditions made for real: user namespaces disabled in a child user
namespace, /dev/fuse hidden or closed to the user in a mount namespace, Landlock answered
ENOSYS by a seccomp filter, a store on a filesystem without user xattrs. Each time doctor must
name the cause and the fix, and pick for `auto` what `agentctl run` picks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from isolated_agent.fusefs import wakeup
from tests.conftest import RunAs, user_agentctl
from tests.core.test_rootless import without_user_namespaces

ENGINES = {"kernel", "fuse", "filter", "copy"}


def doctor(argv: list[str], **kwargs: object) -> tuple[int, dict]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)  # type: ignore[call-overload]
    assert not done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def agentctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "isolated_agent", *args]


def check(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["name"] == name)


def engine_announced(stderr: str) -> str:
    found = re.search(r"env \S+, (\w+) engine", stderr)
    assert found, stderr
    return found.group(1)


def test_doctor_as_root_names_every_engine_and_the_one_run_uses(
    project: Path, tmp_path: Path
) -> None:
    env = dict(os.environ, ISOLATED_AGENT_HOME=str(tmp_path / "store"))
    code, report = doctor(agentctl("doctor", "--json"), env=env)
    assert code == 0
    assert set(report["engines"]) == ENGINES
    for verdict in report["engines"].values():
        assert verdict["ok"] or (verdict["reason"] and verdict["fix"])
    assert report["engines"]["kernel"] == {"ok": True}
    assert report["engines"]["filter"]["ok"] is False
    assert "job user" in report["engines"]["filter"]["reason"]
    assert report["auto"]["engine"] == "kernel"
    for name in ("namespaces", "overlayfs", "store: user xattrs", "seccomp", "/dev/fuse"):
        assert check(report, name)["status"] == "ok", check(report, name)
    assert not os.listdir(tmp_path / "store" / "run"), "the probes' directories are left"
    ran = subprocess.run(agentctl("run", "--", "true"), cwd=project, env=env,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert engine_announced(ran.stderr) == report["auto"]["engine"]


def test_doctor_says_where_fuse_daemons_are_woken(tmp_path: Path) -> None:
    """Both answers of a kernel that has `fuse.wake_here` (the setting is put back)."""
    if wakeup.callers_cpu_wakeups() is None:
        pytest.skip("this kernel has no fuse.wake_here")
    env = dict(os.environ, ISOLATED_AGENT_HOME=str(tmp_path / "store"))
    with open(wakeup.WAKE_HERE) as f:
        machines = f.read().strip()
    try:
        for value, status in (("N", "warn"), ("Y", "ok")):
            with open(wakeup.WAKE_HERE, "w") as f:
                f.write(value)
            _, report = doctor(agentctl("doctor", "--json"), env=env)
            found = check(report, "FUSE wake-ups")
            assert found["status"] == status, found
            assert found["needed_by"] == []
            assert status == "ok" or wakeup.WAKE_HERE in found["fix"]
    finally:
        with open(wakeup.WAKE_HERE, "w") as f:
            f.write(machines)


def test_doctor_prints_a_report_a_person_reads() -> None:
    done = subprocess.run(agentctl("doctor"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^  auto +picks kernel: ", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^  filter +cannot run: job user: ", done.stdout, re.MULTILINE)
    assert "fix: run agentctl as your user" in done.stdout


def test_doctor_as_a_user_agrees_with_run(
    run_as_user: RunAs, user_project: Path, fuse_open_to_users: None
) -> None:
    done = run_as_user("doctor", "--json", cwd=user_project)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rootless"] is True
    assert check(report, "user namespaces")["status"] == "ok"
    assert report["engines"]["filter"] == {"ok": True}
    assert report["engines"]["copy"] == {"ok": True}
    ran = run_as_user("run", "--", "true", cwd=user_project)
    assert ran.returncode == 0, ran.stderr
    assert engine_announced(ran.stderr) == report["auto"]["engine"]


def test_doctor_without_user_namespaces_names_the_sysctl(
    run_as_user: RunAs, user_project: Path, fuse_open_to_users: None
) -> None:
    done = run_as_user("doctor", "--json", cwd=user_project, wrap=without_user_namespaces)
    report = json.loads(done.stdout)
    namespaces = check(report, "user namespaces")
    assert namespaces["status"] == "fail"
    assert "user.max_user_namespaces is 0" in namespaces["detail"]
    assert "sysctl -w user.max_user_namespaces=" in namespaces["fix"]
    for engine in ("kernel", "fuse"):
        assert not report["engines"][engine]["ok"]
        assert "max_user_namespaces" in report["engines"][engine]["fix"]
    # What run does there: no namespaces, so the filter engine (or nothing).
    assert report["auto"]["engine"] == "filter"
    assert "no namespaces here" in report["auto"]["why"]
    assert done.returncode == 0


def test_doctor_with_dev_fuse_hidden(tmp_path: Path) -> None:
    env = dict(os.environ, ISOLATED_AGENT_HOME=str(tmp_path / "store"))
    hide = "mount -t tmpfs -o size=64k none /dev && exec \"$@\""
    code, report = doctor(["unshare", "--mount", "--propagation", "private", "sh", "-c", hide,
                           "sh", *agentctl("doctor", "--json")], env=env)
    fuse = check(report, "/dev/fuse")
    assert fuse["status"] == "fail" and fuse["detail"] == "/dev/fuse is missing"
    assert "modprobe fuse" in fuse["fix"]
    assert report["engines"]["fuse"]["reason"].startswith("/dev/fuse: ")
    assert report["engines"]["kernel"]["ok"] and report["auto"]["engine"] == "kernel"
    assert code == 0


def test_doctor_with_dev_fuse_closed_to_the_user(
    unprivileged_user: object, package_copy: Path, user_dir: Path, user_project: Path
) -> None:
    node = user_dir / "fuse"
    os.mknod(node, 0o600 | 0o020000, os.makedev(10, 229))
    argv = user_agentctl(package_copy, user_dir / "store", user_project, "doctor", "--json")
    close = f"mount --bind {node} /dev/fuse && exec \"$@\""
    code, report = doctor(["unshare", "--mount", "--propagation", "private", "sh", "-c", close,
                           "sh", *argv])
    fuse = check(report, "/dev/fuse")
    assert fuse["status"] == "fail"
    assert "not open to you (mode 0600)" in fuse["detail"]
    assert "chmod 0666 /dev/fuse" in fuse["fix"]
    assert not report["engines"]["filter"]["ok"] and not report["engines"]["fuse"]["ok"]
    assert report["auto"]["engine"] == "kernel"
    assert code == 0


WITHOUT_LANDLOCK = (
    "import errno, os, sys, seccomp\n"
    "rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)\n"
    "rules.add_rule(seccomp.ERRNO(errno.ENOSYS), 'landlock_create_ruleset')\n"
    "rules.load()\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def test_doctor_without_landlock(
    run_as_user: RunAs, user_project: Path, fuse_open_to_users: None
) -> None:
    def without_landlock(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        # As a kernel without Landlock answers: ENOSYS (the user's process, its own filter).
        return subprocess.run(["/usr/bin/python3", "-c", WITHOUT_LANDLOCK, *argv], cwd=cwd,
                              capture_output=True, text=True, timeout=60)

    done = run_as_user("doctor", "--json", cwd=user_project, wrap=without_landlock)
    report = json.loads(done.stdout)
    landlock = check(report, "Landlock")
    assert landlock["status"] == "fail" and landlock["detail"].startswith("not available")
    assert "lsm=landlock" in landlock["fix"]
    assert report["engines"]["filter"]["reason"].startswith("Landlock: ")
    assert report["engines"]["copy"]["reason"].startswith("Landlock: ")
    assert report["engines"]["kernel"]["ok"]
    assert done.returncode == 0


def test_doctor_fails_when_the_store_has_no_user_xattrs(tmp_path: Path) -> None:
    """ramfs keeps no user xattrs: no engine can write the env format there, and doctor says
    so with a non-zero status."""
    store = tmp_path / "store"
    store.mkdir()
    env = dict(os.environ, ISOLATED_AGENT_HOME=str(store))
    on_ramfs = f"mount -t ramfs none {store} && exec \"$@\""
    code, report = doctor(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           on_ramfs, "sh", *agentctl("doctor", "--json")], env=env)
    xattrs = check(report, "store: user xattrs")
    assert xattrs["status"] == "fail" and xattrs["detail"].startswith("ramfs at ")
    assert "ISOLATED_AGENT_HOME" in xattrs["fix"]
    assert not any(v["ok"] for v in report["engines"].values())
    assert report["auto"]["engine"] is None
    assert code == 1


def test_run_refused_points_to_doctor(project: Path) -> None:
    # As root the filter engine refuses to run: the refusal names doctor.
    done = subprocess.run(agentctl("run", "--engine", "filter", "--", "true"), cwd=project,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 125
    assert "`agentctl doctor` checks all this machine needs" in done.stderr
