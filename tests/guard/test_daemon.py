"""backupd: staged items are uploaded, verified and only then purged; the catalog is the truth
(messages only wake it); retries back off; a SIGKILL at any point loses nothing and uploads
nothing twice — against the local bucket and a real S3-compatible server."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from isolated_agent.backup import Backups
from isolated_agent.backup.s3 import S3BlobStore
from isolated_agent.backupd import Daemon, Settings, Worker, backoff
from isolated_agent.protocol.client import ControlError, request
from isolated_agent.protocol.frames import Code, Frame
from tests.guard.conftest import Backupd, MotoServer, Staged, wait_all_purged, wait_for


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_files(directory: Path, count: int, seed: int, big_every: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    for i in range(count):
        size = (3 << 20) + rng.randrange(1 << 20) if big_every and i % big_every == 0 else \
            rng.randrange(0, 5000)
        data = rng.randbytes(size)
        name = f"f{seed}-{i}"
        (directory / name).write_bytes(data)
        files[name] = data
    return files


def catalog_view(home: Path) -> tuple[dict[str, int], dict[bytes, str | None]]:
    backups = Backups.of_store(str(home))
    try:
        events = {e.path: e.sha256 for e in backups.catalog.find() if e.reason == "guard"}
        return backups.catalog.counts(), events
    finally:
        backups.close()


def assert_everything_backed_up(home: Path, directory: Path, files: dict[str, bytes]) -> None:
    counts, events = catalog_view(home)
    assert counts == {"purged": len(files)}, counts
    assert len(events) == len(files)
    backups = Backups.of_store(str(home))
    try:
        for name, data in files.items():
            digest = events[os.fsencode(directory / name)]
            assert digest == sha(data)
            with backups.blobs.get(digest) as reader:
                assert reader.read() == data
    finally:
        backups.close()
    staging = directory / ".isolated-agent-guard"
    assert os.listdir(staging / "items") == [] and os.listdir(staging / "tmp") == []


def ctl(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isolated_agent", *args], capture_output=True, text=True,
        timeout=120, env={**os.environ, "ISOLATED_AGENT_HOME": str(home), **(env or {})})


def test_once_uploads_verifies_purges_and_restores(tmp_path: Path) -> None:
    home, directory = tmp_path / "home", tmp_path / "dir"
    files = make_files(directory, 12, seed=1, big_every=5)
    os.link(directory / "f1-1", directory / "hardlink")  # two links: staged as a copy
    files["hardlink"] = files["f1-1"]
    (directory / "link").symlink_to("f1-2")
    staged = Staged(home, directory)
    try:
        for name in [*files, "link"]:
            staged.delete(name)
    finally:
        staged.close()
    assert os.listdir(directory) == [".isolated-agent-guard"]
    counts, _ = catalog_view(home)
    assert counts == {"staged": len(files) + 1}

    done = ctl(home, "backupd", "--once")
    assert done.returncode == 0, done.stderr
    assert "uploaded and verified 14 item(s)" in done.stderr
    (directory / "link").symlink_to("elsewhere")
    files_and_link = dict(files)
    listed = json.loads(ctl(home, "backup", "list", "--json").stdout)
    assert {e["reason"] for e in listed} == {"guard"}
    assert {e["state"] for e in listed} == {"purged"}
    assert {e["cause"] for e in listed} == {"unlink"}
    restored = ctl(home, "backup", "restore", str(directory))
    assert restored.returncode == 0, restored.stderr
    for name, data in files_and_link.items():
        assert (directory / name).read_bytes() == data
    assert os.readlink(directory / "link") == "elsewhere"
    assert os.readlink(directory / f"link.restored-{len(files) + 1}") == "f1-2"


def test_the_catalog_is_the_truth_messages_only_wake(
    tmp_path: Path, backupd_factory: Callable[..., Backupd]
) -> None:
    home, directory = tmp_path / "home", tmp_path / "dir"
    files = make_files(directory, 3, seed=2)
    staged = Staged(home, directory)
    try:
        staged.delete("f2-0")  # staged while no daemon listens: the message is lost
        daemon = backupd_factory(home, args=("--rescan", "3600"))
        daemon.start()  # ... and the item is found at start all the same
        wait_all_purged(home, 1, timeout=20)
        # The upload loop looks for more work right after each item: let it find none and
        # sleep, or it would pick up the next item without any message (seen once in CI).
        time.sleep(1.0)
        staged.delete("f2-1")  # no message sent: a long rescan, nothing happens
        time.sleep(1.0)
        assert catalog_view(home)[0] == {"purged": 1, "staged": 1}
        assert request(daemon.socket, Frame(Code.BACKUP, {"ids": [2]})).code is Code.ACK
        wait_all_purged(home, 2, timeout=20)
        staged.delete("f2-2")
        request(daemon.socket, Frame(Code.BACKUP))  # a wake-up with no body does as well
        wait_all_purged(home, 3, timeout=20)
    finally:
        staged.close()
    del files["f2-0"], files["f2-1"], files["f2-2"]


def test_purge_is_by_id_only_and_only_after_a_verified_upload(
    tmp_path: Path, backupd_factory: Callable[..., Backupd]
) -> None:
    home, directory = tmp_path / "home", tmp_path / "dir"
    make_files(directory, 2, seed=3)
    staged = Staged(home, directory)
    try:
        staged.delete("f3-0")
        staged.delete("f3-1")
    finally:
        staged.close()
    # In process: an item uploaded and verified but not purged yet, and one still staged.
    worker = Worker(str(home), Settings())
    daemon = Daemon(str(home), Settings())
    try:
        [first] = worker.catalog.claim_due(time.time(), 1)
        digest = worker._put(first)
        assert digest is not None
        worker.catalog.mark_uploaded([(first.event_id, *digest)])
        refused = daemon.answer(worker, Frame(Code.PURGE, {"id": 2}))
        assert refused.code is Code.ERROR and "staged, not uploaded" in refused.body["error"]
        for body in ({"path": str(directory / "f3-0")}, {"id": "1"}, {"id": 1, "path": "/"},
                     {"id": True}, {}):
            reply = daemon.answer(worker, Frame(Code.PURGE, body))
            assert reply.code is Code.ERROR and "one item id" in reply.body["error"], body
        assert daemon.answer(worker, Frame(Code.PURGE, {"id": 99})).code is Code.ERROR
        assert len(os.listdir(directory / ".isolated-agent-guard" / "items")) == 2
        assert daemon.answer(worker, Frame(Code.PURGE, {"id": 1})) == Frame(
            Code.ACK, {"purged": 1})
        assert len(os.listdir(directory / ".isolated-agent-guard" / "items")) == 1
        assert worker.catalog.counts() == {"purged": 1, "staged": 1}
    finally:
        worker.close()
    # Over the socket, a path is refused the same way.
    running = backupd_factory(home, args=("--rescan", "3600", "--backoff-base", "3600"))
    running.start()
    with pytest.raises(ControlError, match="one item id"):
        request(running.socket, Frame(Code.PURGE, {"path": str(directory)}))
    status = request(running.socket, Frame(Code.QUERY)).body
    assert status["bucket"] == "local directory" and status["pid"] == running.process.pid  # type: ignore[union-attr]


def test_backoff_is_exponential_capped_and_jittered() -> None:
    settings = Settings(backoff_base=1.0, backoff_cap=60.0)
    rng = random.Random(7)
    for attempts, ceiling in [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (30, 60)]:
        delays = [backoff(attempts, settings, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d < ceiling for d in delays)
        assert len(set(delays)) > 40  # jitter: no two daemons retry in lockstep


@pytest.mark.parametrize("point", ["after-put", "after-verify", "after-mark", "after-purge"])
def test_a_crash_in_every_window_of_an_upload(
    point: str, tmp_path: Path, moto_server: MotoServer
) -> None:
    """backupd SIGKILLs itself at each point of an item's life; the next run finishes the
    job: everything purged, every blob written exactly once (moto's request log)."""
    home, directory = tmp_path / "home", tmp_path / "dir"
    config = moto_server.config()
    S3BlobStore(config, str(tmp_path / "spool")).ensure_bucket()
    env = moto_server.environment(config)
    files = make_files(directory, 4, seed=9)
    staged = Staged(home, directory)
    try:
        for name in files:
            staged.delete(name)
    finally:
        staged.close()
    log_start = moto_server.log.stat().st_size
    crashed = ctl(home, "backupd", "--once", env={**env, "ISOLATED_AGENT_BACKUPD_FAULT": point})
    assert crashed.returncode == -9, crashed.stderr
    done = ctl(home, "backupd", "--once", env=env)
    assert done.returncode == 0, done.stderr
    os.environ.update(env)
    try:
        assert_everything_backed_up(home, directory, files)
    finally:
        for key in env:
            os.environ.pop(key, None)
    with open(moto_server.log, "rb") as f:
        f.seek(log_start)
        log = f.read().decode(errors="replace")
    writes = re.findall(rf'"PUT /{config.bucket}/blobs/sha256/../([0-9a-f]{{64}}) HTTP/1.1" 200',
                        log)
    assert sorted(writes) == sorted({sha(d) for d in files.values()})


@pytest.mark.slow
@pytest.mark.parametrize("bucket", ["local", "s3"])
def test_sigkill_at_random_points_loses_nothing_and_uploads_once(
    bucket: str, tmp_path: Path, backupd_factory: Callable[..., Backupd],
    moto_server: MotoServer,
) -> None:
    home, directory = tmp_path / "home", tmp_path / "dir"
    env: dict[str, str] = {}
    if bucket == "s3":
        config = moto_server.config()
        S3BlobStore(config, str(tmp_path / "spool")).ensure_bucket()
        env = moto_server.environment(config)
        os.environ.update(env)  # for this process's own Backups (restored below)
    rng = random.Random(1234)
    files: dict[str, bytes] = {}
    daemon = backupd_factory(home, env=env)
    log_start = moto_server.log.stat().st_size
    try:
        for iteration in range(15):
            wave = make_files(directory, 12, seed=100 + iteration, big_every=4)
            staged = Staged(home, directory)
            try:
                for name in wave:
                    staged.delete(name)
            finally:
                staged.close()
            files.update(wave)
            daemon.start(wait=False)
            time.sleep(rng.uniform(0.2, 1.5))
            daemon.kill()
        daemon.start()
        wait_all_purged(home, len(files), timeout=120)
        assert_everything_backed_up(home, directory, files)
        if bucket == "s3":
            with open(moto_server.log, "rb") as f:
                f.seek(log_start)
                log = f.read().decode(errors="replace")
            writes = re.findall(rf'"PUT /{config.bucket}/blobs/sha256/../([0-9a-f]{{64}}) '
                                r'HTTP/1.1" 200', log)
            assert sorted(writes) == sorted({sha(d) for d in files.values()}), \
                "every blob written exactly once"
    finally:
        for key in env:
            os.environ.pop(key, None)


@pytest.mark.slow
def test_s3_outage_items_wait_retries_back_off_all_upload_once_it_is_back(
    tmp_path: Path, backupd_factory: Callable[..., Backupd], own_moto_server: MotoServer,
) -> None:
    home, directory = tmp_path / "home", tmp_path / "dir"
    config = own_moto_server.config()
    S3BlobStore(config, str(tmp_path / "spool")).ensure_bucket()
    env = own_moto_server.environment(config)
    files = make_files(directory, 20, seed=5, big_every=10)
    own_moto_server.stop()  # down before anything is uploaded
    staged = Staged(home, directory)
    try:
        for name in files:
            staged.delete(name)
    finally:
        staged.close()
    daemon = backupd_factory(home, env=env, args=("--rescan", "1", "--backoff-base", "0.3",
                                                  "--backoff-cap", "2"))
    daemon.start()
    backups = Backups.of_store(str(home))
    try:
        wait_for(lambda: min(i.attempts for i in backups.catalog.items()) >= 3, timeout=30,
                 what="three failed attempts")
        items = backups.catalog.items()
        assert {i.state for i in items} <= {"staged", "uploading"}
        assert all("127.0.0.1" in (i.last_error or "") for i in items if i.state == "staged")
        assert len(os.listdir(directory / ".isolated-agent-guard" / "items")) == len(files)
    finally:
        backups.close()
    # Backed off: each retry delay is within [ceiling/2, ceiling), ceiling = 0.3 * 2^(n-1) <= 2.
    retries = re.findall(r"\(attempt (\d+)\) failed, retry in ([0-9.]+) s",
                         daemon.log.read_text())
    assert len(retries) >= 2 * len(files)
    for attempt, delay in retries:
        ceiling = min(2.0, 0.3 * 2 ** (int(attempt) - 1))
        assert ceiling / 2 - 0.05 <= float(delay) <= ceiling + 0.05, (attempt, delay)
    assert {int(a) for a, _ in retries} >= {1, 2}
    backups = Backups.of_store(str(home))
    try:
        assert backups.catalog.counts().get("purged", 0) == 0
    finally:
        backups.close()
    time.sleep(2)
    own_moto_server.start()  # back (empty: moto keeps nothing), with its bucket
    S3BlobStore(config, str(tmp_path / "spool")).ensure_bucket()
    wait_all_purged(home, len(files), timeout=60)
    for key, value in env.items():
        os.environ[key] = value
    try:
        assert_everything_backed_up(home, directory, files)
    finally:
        for key in env:
            os.environ.pop(key, None)
