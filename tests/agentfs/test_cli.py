"""`agentctl mount/umount` and agentfs's overlay-style command lines, as real subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from isolated_agent.cli.main import invoke
from tests.agentfs.conftest import bind_read_only, force_unmount, is_mounted, wait_for
from tests.conftest import Agentctl

BIN = Path(sys.executable).parent


@pytest.fixture
def env_project(
    project: Path, agentctl: Agentctl, tmp_path: Path
) -> Iterator[tuple[Path, Path]]:
    """An env `e1` over `project`, a mount point beside it; everything unmounted at the end."""
    assert agentctl("env", "create", "e1", "--root", str(project)).returncode == 0
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    bind_read_only(project)
    try:
        yield project, mnt
    finally:
        force_unmount(mnt)
        force_unmount(project)


def _pid(store_home: Path) -> int:
    [record] = list((store_home / "run" / "mounts").glob("*.json"))
    return int(json.loads(record.read_text())["pid"])


def test_mount_shows_the_env_and_locks_it_until_umount(
    env_project: tuple[Path, Path], agentctl: Agentctl, store_home: Path
) -> None:
    project, mnt = env_project
    result = agentctl("mount", "--json", "e1", str(mnt))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["mountpoint"] == str(mnt) and info["env"] == "e1"
    assert (mnt / "README.md").read_text() == "# demo\n"
    (mnt / "made-in-the-mount").write_text("x")
    busy = agentctl("run", "--env", "e1", "--", "true")
    assert busy.returncode == 1 and "in use" in busy.stderr
    assert str(info["pid"]) in busy.stderr
    result = agentctl("umount", str(mnt))
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mnt)
    seen = agentctl("run", "-q", "--env", "e1", "--", "cat", "made-in-the-mount", cwd=project)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout == "x"
    assert not (project / "made-in-the-mount").exists()


def test_umount_recovers_a_killed_daemon(
    env_project: tuple[Path, Path], agentctl: Agentctl, store_home: Path
) -> None:
    _, mnt = env_project
    assert agentctl("mount", "e1", str(mnt)).returncode == 0
    os.kill(_pid(store_home), signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{_pid(store_home)}/exe"), what="the daemon")
    with pytest.raises(OSError):
        os.listdir(mnt)
    result = agentctl("umount", str(mnt))
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mnt)
    assert agentctl("run", "-q", "--env", "e1", "--", "true").returncode == 0


def test_foreground_mount_ends_on_ctrl_c(
    env_project: tuple[Path, Path], store_home: Path
) -> None:
    _, mnt = env_project
    process = subprocess.Popen(
        [sys.executable, "-m", "isolated_agent", "mount", "--foreground", "e1", str(mnt)],
        env=dict(os.environ, ISOLATED_AGENT_HOME=str(store_home)),
        stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: is_mounted(mnt) or process.poll() is not None, what="the mount")
        assert (mnt / "README.md").exists()
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        assert not is_mounted(mnt)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_mount_refuses_bad_mount_points(
    env_project: tuple[Path, Path], agentctl: Agentctl, store_home: Path, tmp_path: Path
) -> None:
    project, mnt = env_project
    inside = agentctl("mount", "e1", str(project / "src"))
    assert inside.returncode == 2 and "inside" in inside.stderr
    store = agentctl("mount", "e1", str(store_home / "run"))
    assert store.returncode == 2
    missing = agentctl("mount", "e1", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    no_env = agentctl("mount", "nope", str(mnt))
    assert no_env.returncode == 1 and "no env named" in no_env.stderr
    assert not is_mounted(mnt)


def test_umount_refuses_what_it_does_not_own(store_home: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ISOLATED_AGENT_HOME", str(store_home))
    plain = tmp_path / "plain"
    plain.mkdir()
    assert invoke(["umount", str(plain)]) == 1  # in-process: one line, no traceback
    assert "not mounted" in capsys.readouterr().err
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(plain)], check=True)
    try:
        assert invoke(["umount", str(plain)]) == 1
        assert "not agentfs" in capsys.readouterr().err
        assert is_mounted(plain)
    finally:
        force_unmount(plain)


# -- the overlay-style entry points ------------------------------------------------------------


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[dict[str, Path]]:
    names = ("l1", "l2", "upper", "work", "mnt")
    paths = {name: tmp_path / name for name in names}
    for path in paths.values():
        path.mkdir()
    (paths["l1"] / "top").write_text("l1")
    (paths["l2"] / "top").write_text("l2 (hidden)")
    (paths["l2"] / "bottom").write_text("l2")
    bind_read_only(paths["l1"])
    bind_read_only(paths["l2"])
    try:
        yield paths
    finally:
        if is_mounted(paths["mnt"]):
            subprocess.run(["umount", str(paths["mnt"])], check=False)
        force_unmount(paths["mnt"])
        force_unmount(paths["l1"])
        force_unmount(paths["l2"])


def _check_and_unmount(d: dict[str, Path]) -> None:
    mnt = d["mnt"]
    assert sorted(os.listdir(mnt)) == ["bottom", "top"]
    assert (mnt / "top").read_text() == "l1"
    (mnt / "new").write_text("n")
    assert (d["upper"] / "new").read_text() == "n"
    subprocess.run(["umount", str(mnt)], check=True)
    wait_for(lambda: not is_mounted(mnt), what="unmount")


def _super_options(mnt: Path) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt):
                return set(fields[-1].split(","))
    raise AssertionError("not mounted")


def test_python_m_entry_point_daemonizes(dirs: dict[str, Path]) -> None:
    d = dirs
    result = subprocess.run(
        [sys.executable, "-m", "isolated_agent.engines.fuse", "--lower", f"{d['l1']}:{d['l2']}",
         "--upper", str(d["upper"]), "--work", str(d["work"]), str(d["mnt"])],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert is_mounted(d["mnt"])  # returned with the mount in place; a daemon serves it
    _check_and_unmount(d)


def test_o_options_with_allow_other(dirs: dict[str, Path]) -> None:
    d = dirs
    options = f"lowerdir={d['l1']}:{d['l2']},upperdir={d['upper']},workdir={d['work']}"
    result = subprocess.run(
        [str(BIN / "agentfs"), "agentfs", str(d["mnt"]), "-o",
         options + ",allow_other,default_permissions,userxattr,index=off"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert {"allow_other", "default_permissions"} <= _super_options(d["mnt"])
    _check_and_unmount(d)


@pytest.mark.skipif(shutil.which("mount.fuse3") is None, reason="fuse3 is not installed")
def test_mount_fuse3_helper(dirs: dict[str, Path]) -> None:
    d = dirs
    options = f"lowerdir={d['l1']}:{d['l2']},upperdir={d['upper']},workdir={d['work']}"
    # What `mount -t fuse.agentfs agentfs MNT -o ...` runs (mount(8) itself resets PATH to the
    # system's, where a virtualenv's `agentfs` is not).
    result = subprocess.run(
        ["mount.fuse3", "agentfs", str(d["mnt"]), "-t", "fuse.agentfs", "-o", options],
        capture_output=True, text=True, timeout=30,
        env=dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}"),
    )
    assert result.returncode == 0, result.stderr
    _check_and_unmount(d)


def test_entry_point_errors(dirs: dict[str, Path]) -> None:
    d = dirs
    run = [sys.executable, "-m", "isolated_agent.engines.fuse"]
    no_lower = subprocess.run([*run, "--upper", str(d["upper"]), "--work", str(d["work"]),
                               str(d["mnt"])], capture_output=True, text=True)
    assert no_lower.returncode == 2 and "lower" in no_lower.stderr
    unknown = subprocess.run([*run, "-o", f"lowerdir={d['l1']},bogus=1", str(d["mnt"])],
                             capture_output=True, text=True)
    assert unknown.returncode == 2 and "bogus" in unknown.stderr
    missing = subprocess.run([*run, "--lower", str(d["l1"]), "--upper", str(d["upper"]),
                              "--work", str(d["mnt"] / "nope"), str(d["mnt"])],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert not is_mounted(d["mnt"])
