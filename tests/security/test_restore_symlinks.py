"""`agentctl backup restore` never writes through a symlink: a job that replaced a directory of
the project with a symlink to elsewhere, once committed, must not get restore to write there —
nor under a `--to DIR` whose subtree holds such a link. And restore walks by descriptor, so a
saved path longer than PATH_MAX comes back too."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

from isolated_agent.backup import Backups
from isolated_agent.backup.catalog import BackupEvent
from tests.conftest import Agentctl, Snapshot, snapshot

PATH_MAX = 4096


def _outside(tmp_path: Path) -> tuple[Path, Snapshot]:
    """A directory outside the project, and what it holds before the attack."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the project's\n")
    return outside, snapshot(outside)


def _commit_docs_replaced_by_symlink(agentctl: Agentctl, project: Path, outside: Path) -> None:
    """The job swaps docs/ for a symlink to `outside` (it need not see it: only the link's text
    matters), and the user commits that."""
    run = agentctl("run", "-q", "--env", "e1", "--", "sh", "-c",
                   f"rm -rf docs && ln -s {outside} docs", cwd=project, timeout=120)
    assert run.returncode == 0, run.stderr
    commit = agentctl("commit", "e1", cwd=project, timeout=120)
    assert commit.returncode == 0, commit.stderr
    assert os.readlink(project / "docs") == str(outside)


def test_restore_under_a_committed_symlink_writes_nothing_outside(
    agentctl: Agentctl, project: Path, tmp_path: Path
) -> None:
    outside, before = _outside(tmp_path)
    _commit_docs_replaced_by_symlink(agentctl, project, outside)

    # A file under the link: refused, in one line that says where and what to do.
    guide = project / "docs" / "guide.txt"
    refused = agentctl("backup", "restore", str(guide), cwd=project)
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(project / "docs") in lines[0] and "symlink" in lines[0]
    assert "--to DIR" in lines[0] and "Traceback" not in refused.stderr
    assert snapshot(outside) == before
    # ... and so is restoring it by its id.
    [event] = [e for e in json.loads(agentctl("backup", "list", "--json").stdout)
               if e["path"] == str(guide)]
    by_id = agentctl("backup", "restore", str(event["id"]), cwd=project)
    assert by_id.returncode == 1 and "symlink" in by_id.stderr
    assert snapshot(outside) == before

    # The directory itself: its place is taken (by the link), so it comes back beside it, with
    # its subtree; the link stays as the commit left it.
    whole = agentctl("backup", "restore", str(project / "docs"), "--json", cwd=project)
    assert whole.returncode == 0, whole.stderr
    results = {r["path"]: r for r in json.loads(whole.stdout)}
    beside = Path(results[str(project / "docs")]["restored_to"])
    assert results[str(project / "docs")]["status"] == "beside"
    assert beside.parent == project and beside.name.startswith("docs.restored-")
    assert not beside.is_symlink() and (beside / "guide.txt").read_text() == "guide\n"
    assert results[str(guide)]["restored_to"] == str(beside / "guide.txt")
    assert os.readlink(project / "docs") == str(outside)
    assert snapshot(outside) == before

    # --force replaces what is in the way, never what lies behind it.
    forced = agentctl("backup", "restore", str(guide), "--force", cwd=project)
    assert forced.returncode == 1 and "symlink" in forced.stderr
    assert snapshot(outside) == before


def test_restore_to_a_dir_does_not_follow_a_symlink_inside_it(
    agentctl: Agentctl, project: Path, tmp_path: Path
) -> None:
    outside, before = _outside(tmp_path)
    run = agentctl("run", "-q", "--env", "e1", "--", "sh", "-c", "rm -rf src",
                   cwd=project, timeout=120)
    assert run.returncode == 0, run.stderr
    assert agentctl("commit", "e1", cwd=project, timeout=120).returncode == 0
    # The destination already holds project/ as a symlink to elsewhere.
    destination = tmp_path / "dest"
    destination.mkdir()
    (destination / "project").symlink_to(outside)

    alone = agentctl("backup", "restore", str(project / "src"), "--to", str(destination),
                       cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr  # src's own place is free: restored there
    assert (destination / "src" / "pkg" / "mod.py").read_text() == "X = 1\n" * 100

    whole = agentctl("backup", "restore", str(project), "--to", str(destination), cwd=tmp_path)
    assert whole.returncode == 1, (whole.stdout, whole.stderr)
    assert str(destination / "project") in whole.stderr and "--to DIR" in whole.stderr
    assert snapshot(outside) == before


def _read_by_descriptor(path: bytes) -> bytes:
    """Read a file whose path is too long for one syscall, a component at a time."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    parts = [p for p in path.split(b"/") if p]
    try:
        for name in parts[:-1]:
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        with os.fdopen(leaf, "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def test_a_path_longer_than_path_max_is_restored(
    agentctl: Agentctl, store_home: Path, tmp_path: Path
) -> None:
    # A catalog row as a commit or the guard would write it for a deep tree (names from a
    # catalog row are not bounded by PATH_MAX; each component is by NAME_MAX).
    deep = os.fsencode(tmp_path / "deep") + (b"/" + b"d" * 250) * 20
    target = deep + b"/file.txt"
    assert len(target) > PATH_MAX
    data = b"from very deep\n"
    backups = Backups.of_store(str(store_home))
    try:
        digest = backups.blobs.put(io.BytesIO(data))
        [event_id] = backups.catalog.add([BackupEvent(
            0, target, "commit", 1.0, "file", len(data), stat.S_IFREG | 0o640, 0, 0,
            1_700_000_000_000_000_000, digest)])
    finally:
        backups.close()

    by_id = agentctl("backup", "restore", str(event_id), cwd=tmp_path)
    assert by_id.returncode == 0, by_id.stderr
    assert _read_by_descriptor(target) == data
    # Again, by path: the file is there already, and identical.
    by_path = agentctl("backup", "restore", os.fsdecode(tmp_path / "deep"), "--json",
                       cwd=tmp_path)
    assert by_path.returncode == 0, by_path.stderr
    assert [r["status"] for r in json.loads(by_path.stdout)] == ["identical"]
