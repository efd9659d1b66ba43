"""The guard fails closed, and crashes lose nothing: when the old content cannot be kept the
delete fails; SIGKILL of the guard and of backupd at random points, over and over, leaves
every file either in place or backed up exactly once."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isolated_agent.backup import Backups
from isolated_agent.system import libc
from tests.guard.conftest import (
    Backupd,
    Guards,
    agentctl_cmd,
    guard_mounted,
    upload_all,
    wait_for,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a directory whose filesystem can be filled up."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    libc.mount("tmpfs", str(mount_point), "tmpfs", 0, "size=4m,mode=0755")
    try:
        yield mount_point
    finally:
        with contextlib.suppress(OSError):
            libc.umount(str(mount_point), libc.MNT_DETACH)


def test_no_space_to_stage_means_no_delete(small_fs: Path, guards: Guards) -> None:
    (small_fs / "precious").write_bytes(b"keep me" * 1000)
    (small_fs / "log").write_bytes(b"old log\n" * 1000)
    guards.start(small_fs)
    filler = small_fs / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 16))
            f.flush()
    for script in ("rm precious", ": > log", "mv log precious"):
        done = subprocess.run(["sh", "-c", script], cwd=small_fs, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode != 0, script
        assert "No space left" in done.stderr, done.stderr
    assert (small_fs / "precious").read_bytes() == b"keep me" * 1000
    assert (small_fs / "log").read_bytes() == b"old log\n" * 1000
    backups = Backups.of_store(str(guards.home))
    try:
        assert backups.catalog.counts() == {}
    finally:
        backups.close()
    guards.stop(small_fs)
    staging = small_fs / ".isolated-agent-guard"
    assert os.listdir(staging / "items") == [] and os.listdir(staging / "tmp") == []


def make_tree(root: Path, seed: int, files: int = 60) -> dict[Path, bytes]:
    rng = random.Random(seed)
    made: dict[Path, bytes] = {}
    for i in range(files):
        path = root / f"w{seed}" / f"d{i % 6}" / f"f{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.choice([0, 10, 3000, 70_000]))
        path.write_bytes(data)
        made[path] = data
    return made


def guard_pid(home: Path, directory: Path) -> int | None:
    import json

    done = agentctl_cmd(home, "guard", "status", "--json")
    for row in json.loads(done.stdout)["guards"]:
        if row["dir"] == str(directory) and row["state"] == "guarded":
            return int(row["pid"])
    return None


@pytest.mark.slow
def test_sigkill_of_guard_and_backupd_at_random_points(tmp_path: Path, guards: Guards) -> None:
    home = guards.home
    directory = tmp_path / "guarded"
    directory.mkdir()
    rng = random.Random(99)
    files: dict[Path, bytes] = {}
    daemon = Backupd(home, args=("--rescan", "0.3", "--backoff-base", "0.1",
                                 "--backoff-cap", "1"))
    try:
        for iteration in range(18):
            if not guard_mounted(directory) or guard_pid(home, directory) is None:
                guards.start(directory)  # replaces a dead mount, reconciling first
            files.update(make_tree(directory, iteration))
            pid = guard_pid(home, directory)
            assert pid is not None
            if iteration % 2 == 0 and not daemon.running:
                daemon.start(wait=False)
            rm = subprocess.Popen(["rm", "-rf", f"w{iteration}"], cwd=directory,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(pid, signal.SIGKILL)  # the guard, mid-rm (or just after it)
            if rng.random() < 0.5:
                daemon.kill()  # and the daemon, mid-upload
            rm.wait(30)
        daemon.kill()
        guards.start(directory)
        guards.stop(directory)
        upload_all(home)
    finally:
        daemon.kill()
    backups = Backups.of_store(str(home))
    try:
        file_events: dict[bytes, list[str | None]] = {}
        for event in backups.catalog.find():
            if event.kind == "file":
                file_events.setdefault(event.path, []).append(event.sha256)
        counts = backups.catalog.counts()
    finally:
        backups.close()
    assert set(counts) <= {"purged", "recorded"}, counts
    deleted = 0
    for path, data in files.items():
        saved = file_events.get(os.fsencode(path), [])
        if path.exists():
            assert path.read_bytes() == data and saved == [], path  # untouched, not backed up
        else:
            assert saved == [sha(data)], (path, saved)  # gone: backed up exactly once
            deleted += 1
    assert deleted > len(files) // 4, "the kills left too little deleted to prove anything"
    assert len(file_events) == deleted
    staging = directory / ".isolated-agent-guard"
    assert os.listdir(staging / "items") == [] and os.listdir(staging / "tmp") == []
    wait_for(lambda: not guard_mounted(directory), what="guard unmounted")


@pytest.mark.parametrize("point", ["after-journal", "after-stage", "after-record"])
@pytest.mark.parametrize("operation", ["rm victim", "mv other victim", ": > victim"])
def test_a_crash_between_any_two_staging_steps_loses_nothing(
    point: str, operation: str, tmp_path: Path, guards: Guards
) -> None:
    """The guard SIGKILLs itself at each point of the write ordering (staging.py); after a
    restart (which reconciles) the old content is in place or backed up, never both gone."""
    home, directory = guards.home, tmp_path / "guarded"
    directory.mkdir()
    old = os.urandom(5000)
    (directory / "victim").write_bytes(old)
    (directory / "other").write_bytes(b"other content")
    guards.start(directory, env={"ISOLATED_AGENT_GUARD_FAULT": f"{point}:victim"})
    done = subprocess.run(["sh", "-c", operation], cwd=directory, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode != 0 and "connection abort" in done.stderr, done.stderr
    guards.start(directory)  # replaces the dead mount; reconciles staging with the catalog
    guards.stop(directory)
    upload_all(home)
    backups = Backups.of_store(str(home))
    try:
        saved = [e.sha256 for e in backups.catalog.find() if e.kind == "file"]
        assert set(backups.catalog.counts()) <= {"purged"}
    finally:
        backups.close()
    victim = directory / "victim"
    if victim.exists() and victim.read_bytes() == old:
        # The operation did not happen; at most an extra backup of the untouched file.
        assert saved in ([], [sha(old)]), saved
        assert point != "after-stage" or operation != "rm victim"
    else:
        assert saved == [sha(old)]  # it happened, and the old content was kept exactly once
    staging = directory / ".isolated-agent-guard"
    assert os.listdir(staging / "items") == [] and os.listdir(staging / "tmp") == []
