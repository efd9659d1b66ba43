"""Fixtures shared by every test: an isolated store, a project tree, agentctl as a real
subprocess, tree snapshots, and a sweep that fails any test leaving a mount behind.

Tests run as root on a machine with overlayfs and /dev/fuse: a missing capability is a failure,
never a skip (DESIGN §10).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# Where tests put their files: pytest's tmp_path, and scratch dirs on the disk outside /tmp
# (which every job sees as its own tmpfs) named with this prefix — one per test session (its
# pid), so that the mount sweep below judges this session's mounts only, never those of
# another session running at the same time on the machine.
DISK_SCRATCH_PREFIX = f"/var/tmp/ia-{os.getpid()}-"


def _mounts_of_this_test(tmp_path: Path) -> set[str]:
    mine = (str(tmp_path) + "/", DISK_SCRATCH_PREFIX)
    with open("/proc/self/mountinfo") as f:
        return {p for p in (line.split()[4] for line in f) if p.startswith(mine)}


@pytest.fixture(autouse=True)
def no_mount_left_behind(tmp_path: Path) -> Iterator[None]:
    """Every test must leave no mount behind; sweep and fail if it does. Only the test's own
    directories are judged: test sessions or benchmarks running at the same time on this machine
    own theirs, and must not be failed or unmounted under their feet."""
    before = _mounts_of_this_test(tmp_path)
    yield
    leaked = sorted(_mounts_of_this_test(tmp_path) - before, key=len, reverse=True)
    for mount_point in leaked:
        subprocess.run(["umount", "-l", mount_point], check=False, capture_output=True)
    assert not leaked, f"mounts left behind on the host: {leaked}"


@pytest.fixture
def store_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "store"
    monkeypatch.setenv("ISOLATED_AGENT_HOME", str(home))
    return home


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small project: files, a nested tree, a symlink, an executable."""
    root = tmp_path / "project"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "README.md").write_text("# demo\n")
    (root / "src" / "main.py").write_text("print('hello')\n")
    (root / "src" / "pkg" / "__init__.py").write_text("")
    (root / "src" / "pkg" / "mod.py").write_text("X = 1\n" * 100)
    (root / "docs" / "guide.txt").write_text("guide\n")
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("README.md")
    return root


Agentctl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def agentctl(store_home: Path) -> Agentctl:
    """Run agentctl as a real subprocess: agentctl("run", "--", "true", cwd=...)."""

    def run(
        *args: str,
        cwd: Path | str | None = None,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "ISOLATED_AGENT_HOME": str(store_home), **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "isolated_agent", *args],
            cwd=cwd,
            input=input,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


Snapshot = dict[str, tuple[object, ...]]


def snapshot(root: Path) -> Snapshot:
    """Everything a job could change about a tree: type, mode, owner, mtime, content, target."""
    result: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                detail: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                detail = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                detail = None
            result[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns,
                st.st_nlink if not stat.S_ISDIR(st.st_mode) else None,
                detail,
            )
    root_st = os.lstat(root)
    result["."] = (stat.S_IMODE(root_st.st_mode), root_st.st_mtime_ns)  # root entries changed?
    return result


@pytest.fixture
def snap() -> Callable[[Path], Snapshot]:
    return snapshot


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)
