"""The backup store: blob store conformance (run against every BlobStore implementation), the
event catalog, and `agentctl backup list|show|restore|verify` on backups made by real commits."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isolated_agent.backup import Backups, BlobStore, LocalBlobStore
from isolated_agent.backup.capture import capture
from isolated_agent.backup.catalog import BackupCatalog, BackupEvent
from isolated_agent.backup.restore import parse_time
from isolated_agent.errors import BackupError, BlobCorrupt, UsageError
from tests.review.conftest import Workspace, file_hash

# -- blob store conformance ---------------------------------------------------------------------


@pytest.fixture(params=["local"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    """Every BlobStore implementation (an S3-compatible one joins this list)."""
    if request.param == "local":
        yield LocalBlobStore(str(tmp_path / "bucket"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_all(store: BlobStore, digest: str) -> bytes:
    with store.get(digest) as reader:
        return reader.read()


def test_put_get_exists_list(blobs: BlobStore) -> None:
    data = os.urandom(3 << 20)  # several read chunks
    assert not blobs.exists(sha(data))
    assert blobs.put(io.BytesIO(data)) == sha(data)
    assert blobs.exists(sha(data))
    assert read_all(blobs, sha(data)) == data
    assert blobs.put(io.BytesIO(b""), sha(b"")) == sha(b"")
    assert read_all(blobs, sha(b"")) == b""
    assert sorted(blobs.list()) == sorted([sha(data), sha(b"")])


def test_put_refuses_data_that_does_not_match_its_digest(blobs: BlobStore) -> None:
    with pytest.raises(BlobCorrupt):
        blobs.put(io.BytesIO(b"one thing"), sha(b"another"))
    assert list(blobs.list()) == []


def test_a_batch_publishes_at_its_end_and_nothing_when_it_fails(blobs: BlobStore) -> None:
    with blobs.batch():
        digest = blobs.put(io.BytesIO(b"in a batch"))
        assert blobs.exists(digest)  # known to the batch already
        assert blobs.put(io.BytesIO(b"in a batch")) == digest  # once
    assert read_all(blobs, digest) == b"in a batch"
    with pytest.raises(RuntimeError), blobs.batch():
        failed = blobs.put(io.BytesIO(b"lost"))
        raise RuntimeError("boom")
    assert not blobs.exists(failed)
    assert list(blobs.list()) == [digest]


def test_local_layout_written_once_read_only_and_verified_on_read(tmp_path: Path) -> None:
    store = LocalBlobStore(str(tmp_path / "bucket"))
    digest = store.put(io.BytesIO(b"payload"))
    path = tmp_path / "bucket" / "blobs" / "sha256" / digest[:2] / digest
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    inode = path.stat().st_ino
    store.put(io.BytesIO(b"payload"))
    assert path.stat().st_ino == inode, "an existing blob is never rewritten"
    assert os.listdir(tmp_path / "bucket" / "tmp") == []
    path.chmod(0o644)
    path.write_bytes(b"paylOad")
    with pytest.raises(BlobCorrupt):
        read_all(store, digest)
    path.unlink()
    with pytest.raises(BackupError, match="missing"):
        read_all(store, digest)
    with pytest.raises(BackupError, match="not a sha256"):
        store.get("../../etc/passwd")


def test_capture_and_adopt_reach_paths_longer_than_path_max(tmp_path: Path) -> None:
    """A commit backs up what it replaces deep in a tree a job built past PATH_MAX."""
    names = [(b"d%02d" % i).ljust(250, b"x") for i in range(20)]
    deep = os.fsencode(tmp_path) + b"/" + b"/".join(names)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        file_fd = os.open("f", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
        os.write(file_fd, b"deep down\n")
        os.close(file_fd)
        os.symlink("f", "l", dir_fd=fd)
        backups = Backups.of_store(str(tmp_path / "store"))
        try:
            paths = [deep + b"/f", deep + b"/l", deep + b"/gone", deep + b"/no/such/dir"]
            captured = capture(backups, paths, reason="commit", adoptable={deep + b"/f"})
            assert {p: e.kind for p, e in captured.events.items()} == {
                deep + b"/f": "file", deep + b"/l": "symlink"}
            assert read_all(backups.blobs, captured.events[deep + b"/l"].sha256 or "") == b"f"
            assert captured.to_adopt == {deep + b"/f": sha(b"deep down\n")}
            backups.local.adopt(deep + b"/f", sha(b"deep down\n"))  # the commit moves it in
            assert sorted(os.listdir(fd)) == ["l"]
            assert read_all(backups.blobs, sha(b"deep down\n")) == b"deep down\n"
        finally:
            backups.close()
    finally:
        os.close(fd)


# -- catalog ------------------------------------------------------------------------------------


def event(path: bytes, when: float, digest: str | None = None) -> BackupEvent:
    return BackupEvent(0, path, "commit", when, "file", 1, 0o100644, 0, 0, 0, digest)


def test_catalog_selects_by_subtree_and_time(tmp_path: Path) -> None:
    catalog = BackupCatalog(str(tmp_path / "catalog.sqlite"))
    ids = catalog.add([
        event(b"/p/a", 100), event(b"/p/a/x", 110), event(b"/p/ab", 120),
        event(b"/p/a", 130), event(b"/p/\xff", 140),
    ])
    assert ids == [1, 2, 3, 4, 5]
    assert [e.id for e in catalog.find(path=b"/p/a")] == [1, 2, 4]
    assert [e.id for e in catalog.find(since=115)] == [3, 4, 5]
    assert [e.id for e in catalog.latest(b"/p/a", at=125)] == [1, 2]
    assert [e.id for e in catalog.latest(b"/p/a")] == [4, 2]
    assert catalog.get(5) is not None and catalog.get(5).path == b"/p/\xff"  # type: ignore[union-attr]
    assert catalog.get(99) is None


def test_parse_time() -> None:
    now = 1_000_000.0
    assert parse_time("2h", now) == now - 7200
    assert parse_time("30m", now) == now - 1800
    assert parse_time("1700000000") == 1_700_000_000
    assert parse_time("2026-03-01T00:00:00Z") == 1_772_323_200
    local = parse_time("2026-03-01 12:30")
    assert time.localtime(local)[:5] == (2026, 3, 1, 12, 30)
    with pytest.raises(UsageError):
        parse_time("soon")


# -- the commands, on backups made by real commits -----------------------------------------------


def two_commits(ws: Workspace) -> tuple[str, str, float]:
    """README.md rewritten twice by two commits; returns its two old versions' hashes and a time
    between the commits."""
    first = file_hash(ws.project / "README.md")
    ws.run("echo second > README.md; rm docs/guide.txt")
    assert ws.ctl("commit").returncode == 0
    second = file_hash(ws.project / "README.md")
    time.sleep(1.1)
    between = time.time()
    time.sleep(0.1)
    ws.run("echo third > README.md")
    assert ws.ctl("commit").returncode == 0
    return first, second, between


def test_list_show_and_restore(ws: Workspace) -> None:
    first, second, between = two_commits(ws)
    listed = json.loads(ws.ctl("backup", "list", "--json").stdout)
    readme = str(ws.project / "README.md")
    assert [(e["path"], e["sha256"]) for e in listed if e["path"] == readme] == [
        (readme, first), (readme, second)]
    assert {e["reason"] for e in listed} == {"commit"}
    assert all(e["env"] == "e1" for e in listed)
    only = json.loads(ws.ctl("backup", "list", "--path", "docs", "--json").stdout)
    assert [e["path"] for e in only] == [str(ws.project / "docs" / "guide.txt")]
    recent = json.loads(ws.ctl("backup", "list", "--since", str(between), "--json").stdout)
    assert [e["sha256"] for e in recent] == [second]
    table = ws.ctl("backup", "list").stdout.splitlines()
    assert table[0].split("\t") == ["ID", "TIME", "REASON", "KIND", "SIZE", "ENV", "PATH"]
    first_id = next(e["id"] for e in listed if e["sha256"] == first)
    shown = json.loads(ws.ctl("backup", "show", str(first_id), "--json").stdout)
    assert shown["blob_present"] and shown["mode"] == "100644" and shown["path"] == readme

    # Never overwrite: README.md exists, so the backup lands beside it.
    result = ws.ctl("backup", "restore", str(first_id))
    assert result.returncode == 0, result.stderr
    assert (ws.project / "README.md").read_text() == "third\n"
    beside = ws.project / f"README.md.restored-{first_id}"
    assert file_hash(beside) == first
    # By path, as of a time between the two commits: the first old version.
    target = ws.tmp / "out"
    target.mkdir()
    result = ws.ctl("backup", "restore", readme, "--at", str(between), "--to", str(target))
    assert result.returncode == 0, result.stderr
    assert file_hash(target / "README.md") == first
    # By path, latest, with --force: overwrites in place.
    result = ws.ctl("backup", "restore", "README.md", "--force")
    assert result.returncode == 0, result.stderr
    assert file_hash(ws.project / "README.md") == second
    # A deleted file comes back where it was, with its mode.
    result = ws.ctl("backup", "restore", "docs/guide.txt")
    assert result.returncode == 0, result.stderr
    assert (ws.project / "docs" / "guide.txt").read_text() == "guide\n"


def test_a_deleted_tree_restores_whole(ws: Workspace) -> None:
    before = {p: file_hash(p) for p in (ws.project / "src").rglob("*") if p.is_file()}
    ws.run("rm -rf src")
    assert ws.ctl("commit").returncode == 0
    assert not (ws.project / "src").exists()
    result = ws.ctl("backup", "restore", "src", "--json")
    assert result.returncode == 0, result.stderr
    assert {p: file_hash(p) for p in (ws.project / "src").rglob("*") if p.is_file()} == before


def test_verify_reports_corruption_and_restore_refuses_it(ws: Workspace) -> None:
    ws.run("echo new > README.md; echo new > run.sh")
    assert ws.ctl("commit").returncode == 0
    ok = ws.ctl("backup", "verify")
    assert ok.returncode == 0 and "all intact" in ok.stderr
    events = json.loads(ws.ctl("backup", "list", "--json").stdout)
    victim = next(e for e in events if e["path"].endswith("README.md"))
    blob = ws.store_home / "backup" / "blobs" / "sha256" / victim["sha256"][:2] / victim["sha256"]
    blob.chmod(0o644)
    blob.write_bytes(b"# dem0\n")

    bad = ws.ctl("backup", "verify", "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["corrupt"] == [{"sha256": victim["sha256"], "events": [victim["id"]]}]
    assert not report["ok"] and "corrupt or missing" in bad.stderr

    (ws.project / "README.md").unlink()
    refused = ws.ctl("backup", "restore", str(victim["id"]))
    assert refused.returncode == 1
    assert "corrupt" in refused.stderr and "nothing was restored" in refused.stderr
    assert not (ws.project / "README.md").exists()
    assert [p.name for p in ws.project.iterdir() if "restore" in p.name] == []


def test_backups_are_usable_in_process(ws: Workspace) -> None:
    ws.run("echo new > README.md")
    assert ws.ctl("commit").returncode == 0
    backups = Backups.of_store(str(ws.store_home))
    try:
        [readme] = [e for e in backups.catalog.find() if e.path.endswith(b"README.md")]
        assert readme.sha256 is not None
        assert read_all(backups.blobs, readme.sha256) == b"# demo\n"
    finally:
        backups.close()
