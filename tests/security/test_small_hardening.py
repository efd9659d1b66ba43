"""Small hardening (issue 11): a full store says which store is full and what to do, never
"move it away"; the filter daemon's records are its owner's alone (0600)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.agentfs.conftest import force_unmount
from tests.conftest import Agentctl


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at `where` (under the test's tmp_path), unmounted however the test ends."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                   check=True, timeout=30)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


def fill(directory: Path) -> Path:
    """Use up every free block of the filesystem of `directory`."""
    filler = directory / "filler"
    block = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def _says_backup_store_is_full(result: subprocess.CompletedProcess[str], backup: Path) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"the backup store at {backup} is full" in lines[0]
    assert "free some space there" in lines[0] and "ISOLATED_AGENT_HOME" in lines[0]
    assert "move it away" not in lines[0] and "Traceback" not in result.stderr


def test_a_full_backup_store_says_which_and_what_to_do(
    agentctl: Agentctl, project: Path, store_home: Path
) -> None:
    """The backup store on a filesystem of its own (as a user may mount one), full: before its
    catalog exists (SQLite: "database or disk is full") and after (SQLite: "disk I/O error",
    its WAL index cannot be made)."""
    backup = store_home / "backup"
    with tiny_tmpfs(backup, "1m"):
        run = agentctl("run", "-q", "--env", "e1", "--", "sh", "-c", "echo first > README.md",
                       cwd=project, timeout=120)
        assert run.returncode == 0, run.stderr
        filler = fill(backup)
        _says_backup_store_is_full(agentctl("commit", "e1", cwd=project, timeout=120), backup)
        assert (project / "README.md").read_text() == "# demo\n"

        filler.unlink()
        committed = agentctl("commit", "e1", cwd=project, timeout=120)
        assert committed.returncode == 0, committed.stderr
        assert (project / "README.md").read_text() == "first\n"

        run = agentctl("run", "-q", "--env", "e1", "--", "sh", "-c", "echo second > README.md",
                       cwd=project, timeout=120)
        assert run.returncode == 0, run.stderr
        fill(backup)
        _says_backup_store_is_full(agentctl("commit", "e1", cwd=project, timeout=120), backup)
        assert (project / "README.md").read_text() == "first\n"


def test_a_full_store_says_its_filesystem_is_full(
    agentctl: Agentctl, project: Path, store_home: Path
) -> None:
    """The whole store (envs, catalogs, backups) on a full filesystem: the catalog it cannot
    open is named with the reason, not as a damaged file."""
    with tiny_tmpfs(store_home, "8m"):
        run = agentctl("run", "-q", "--env", "e1", "--", "sh", "-c", "echo first > README.md",
                       cwd=project, timeout=120)
        assert run.returncode == 0, run.stderr
        fill(store_home)
        result = agentctl("commit", "e1", cwd=project, timeout=120)
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert f"the store at {store_home} is full" in result.stderr, result.stderr
        assert "ISOLATED_AGENT_HOME" in result.stderr and "move it away" not in result.stderr
        assert "Traceback" not in result.stderr
        assert (project / "README.md").read_text() == "# demo\n"


def test_filter_records_are_private(
    agentctl: Agentctl, project: Path, store_home: Path
) -> None:
    """The daemon runs with umask 0 (the kernel hands it modes already masked): its record
    must still be 0600, as its socket is."""
    started = agentctl("filter", "start", str(project), env={"ISOLATED_AGENT_FILTER_IDLE": "60"})
    try:
        assert started.returncode == 0, started.stderr
        files = sorted((store_home / "run" / "filters").iterdir())
        assert {p.suffix for p in files} >= {".json", ".sock"}, files
        modes = {p.name: stat.S_IMODE(os.lstat(p).st_mode) for p in files}
        assert modes == dict.fromkeys(modes, 0o600), modes  # record, socket, lock, log
    finally:
        stopped = agentctl("filter", "stop", str(project))
        force_unmount(project)
    assert stopped.returncode == 0, stopped.stderr
