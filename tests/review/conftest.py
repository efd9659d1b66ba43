"""Fixtures for the review tests (diff, commit, backup): a workspace that runs a shell workload
in an env for real (`agentctl run`, kernel overlayfs) and the same workload directly on a copy of
the project, and tree states that compare what commit must reproduce."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from isolated_agent.backup import Backups
from isolated_agent.env.store import Store
from tests.conftest import Agentctl

# (type bits, permission bits, sha256 of the data / symlink target / None)
EntryState = tuple[int, int, object]
State = dict[bytes, EntryState]


def tree_state(root: Path | str) -> State:
    """What commit must reproduce of a tree: every entry's type, permissions, and content
    (data hash or symlink target), by path relative to `root` as bytes."""
    top = os.fsencode(root)
    result: State = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                detail: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                detail = file_hash(path)
            else:
                detail = None
            result[os.path.relpath(path, top)] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), detail
            )
    return result


def link_groups(root: Path | str) -> set[frozenset[bytes]]:
    """Which regular files are hard links of one another (groups of two or more names)."""
    top = os.fsencode(root)
    groups: dict[int, set[bytes]] = {}
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                groups.setdefault(st.st_ino, set()).add(os.path.relpath(path, top))
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def file_hash(path: bytes | str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def copy_tree(src: Path, dst: Path) -> None:
    """cp -a: keeps xattrs (opaque markers) and device nodes (whiteouts)."""
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


@dataclass
class Workspace:
    project: Path
    agentctl: Agentctl
    store_home: Path
    tmp: Path

    def run(self, script: str, env: str = "e1", cwd: Path | None = None,
            engine: str = "auto") -> None:
        """Run a shell workload in the env, for real."""
        result = self.agentctl(
            "run", "-q", "--env", env, "--engine", engine, "--", "sh", "-c", script,
            cwd=cwd or self.project, timeout=300,
        )
        assert result.returncode == 0, result.stderr

    def direct(self, script: str, name: str = "direct") -> Path:
        """Run the same workload on a copy of the project as it is now (the reference)."""
        reference = self.tmp / name
        copy_tree(self.project, reference)
        subprocess.run(["sh", "-c", script], cwd=reference, check=True, timeout=300)
        return reference

    def upper(self, env: str = "e1", root: int = 0) -> Path:
        store = Store(str(self.store_home))
        try:
            return Path(store.get(env).roots[root].upper)
        finally:
            store.close()

    def backups(self) -> Backups:
        return Backups.of_store(str(self.store_home))

    def ctl(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return self.agentctl(*args, cwd=cwd or self.project, timeout=300)


@pytest.fixture
def ws(project: Path, agentctl: Agentctl, store_home: Path, tmp_path: Path) -> Iterator[Workspace]:
    yield Workspace(project, agentctl, store_home, tmp_path)
    # Blobs are read-only and some tests leave mode-000 dirs: make tmp_path removable. Through
    # dir fds: some trees are deeper than PATH_MAX.
    for _, dirnames, _, dir_fd in os.fwalk(tmp_path):
        for name in dirnames:
            if not stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                os.chmod(name, 0o755, dir_fd=dir_fd)


def rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
