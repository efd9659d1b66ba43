"""Fixtures for backup-on-delete: a real S3-compatible server (moto's) on 127.0.0.1, S3 bucket
configurations, guard mounts and backup daemons run as real processes — each always stopped,
unmounted and swept, even when the test fails."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from isolated_agent.backup.config import BucketConfig
from isolated_agent.backup.s3 import S3BlobStore

# Loopback only: never let a proxy setting send the test traffic anywhere.
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


class MotoServer:
    """moto's S3 server as a real process on 127.0.0.1; stop() and start() again keep the
    port and, for the outage tests, nothing else (moto keeps its state in memory)."""

    def __init__(self, log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answering(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_for(self.answering, what=f"moto server on port {self.port}")

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None
        wait_for(lambda: not self.answering(), what="moto server to stop")

    def config(self, bucket: str | None = None, **extra: object) -> BucketConfig:
        return BucketConfig(
            type="s3", bucket=bucket or f"t-{secrets.token_hex(6)}", endpoint=self.endpoint,
            region="us-east-1", access_key_id="testing", secret_access_key="testing",
            **extra,  # type: ignore[arg-type]
        )

    def environment(self, config: BucketConfig) -> dict[str, str]:
        """What selects this bucket for an agentctl process."""
        return {
            "ISOLATED_AGENT_S3_BUCKET": str(config.bucket),
            "ISOLATED_AGENT_S3_ENDPOINT": self.endpoint,
            "ISOLATED_AGENT_S3_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "NO_PROXY": "127.0.0.1,localhost",
        }


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto server for the session; each test uses a bucket of its own."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_moto_server(tmp_path: Path) -> Iterator[MotoServer]:
    """A moto server this test may stop and start (outages)."""
    server = MotoServer(tmp_path / "moto.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def s3_store(server: MotoServer, spool: Path, **extra: object) -> S3BlobStore:
    store = S3BlobStore(server.config(**extra), str(spool))
    store.ensure_bucket()
    return store


# -- staging items the way the guard does, without a mount ---------------------------------------


class Staged:
    """A guarded directory's staging dir and catalog, driven by the guard's own Stager (no
    FUSE: the tests of the daemon need items, not a mount)."""

    def __init__(self, home: Path, directory: Path) -> None:
        from isolated_agent.backup import Backups
        from isolated_agent.backup.staging import StagingDir
        from isolated_agent.guard.policy import Policy
        from isolated_agent.guard.stage import Stager

        self.home = home
        self.directory = directory
        self.backups = Backups.of_store(str(home))
        self.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        self.staging = StagingDir.create_in(self.dir_fd)
        dev, ino = self.staging.identity()
        guard_id = self.backups.catalog.register_guard(
            os.fsencode(directory), os.fsencode(directory) + b"/.isolated-agent-guard", dev, ino)
        guard = self.backups.catalog.guard(guard_id)
        assert guard is not None
        self.guard = guard
        self.stager = Stager(self.staging, self.backups.catalog, guard, Policy())

    def delete(self, name: str) -> None:
        st = os.lstat(self.directory / name)
        self.stager.unlink(self.dir_fd, os.fsencode(name),
                           os.fsencode(self.directory / name), st)

    def close(self) -> None:
        self.staging.close()
        os.close(self.dir_fd)
        self.backups.close()


class Backupd:
    """`agentctl backupd` as a real process; killed (SIGKILL) or stopped (SIGTERM) at will."""

    def __init__(self, home: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ("--rescan", "0.5", "--backoff-base", "0.2",
                                          "--backoff-cap", "2")) -> None:
        self.home = home
        self.env = {**os.environ, "ISOLATED_AGENT_HOME": str(home), **(env or {})}
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.log = home / "backupd-test.log"

    @property
    def socket(self) -> str:
        return str(self.home / "run" / "backupd.sock")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, wait: bool = True) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "isolated_agent", "backupd", *self.args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            from isolated_agent.protocol.client import ControlError, request
            from isolated_agent.protocol.frames import Code, Frame

            def answers() -> bool:
                try:
                    return request(self.socket, Frame(Code.HEARTBEAT), timeout=1).code is Code.ACK
                except ControlError:
                    assert self.process is not None and self.process.poll() is None, \
                        self.log.read_text()
                    return False

            wait_for(answers, what="backupd to answer")

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signum)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@pytest.fixture
def backupd_factory() -> Iterator[Callable[..., Backupd]]:
    made: list[Backupd] = []

    def make(home: Path, **kwargs: object) -> Backupd:
        daemon = Backupd(home, **kwargs)  # type: ignore[arg-type]
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill()


def wait_all_purged(home: Path, count: int, timeout: float = 60.0) -> None:
    from isolated_agent.backup import Backups

    def done() -> bool:
        backups = Backups.of_store(str(home))
        try:
            counts = backups.catalog.counts()
        finally:
            backups.close()
        return counts.get("purged", 0) == count

    wait_for(done, timeout=timeout, what=f"{count} items purged")


def agentctl_cmd(home: Path, *args: str, env: dict[str, str] | None = None,
                 cwd: Path | str | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isolated_agent", *args], capture_output=True, text=True,
        timeout=timeout, cwd=cwd,
        env={**os.environ, "ISOLATED_AGENT_HOME": str(home), **(env or {})})


def guard_mounted(directory: Path | str) -> bool:
    target = os.path.realpath(directory)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target and " fuse.isolated-agent-guard " in line
                   for line in f)


class Guards:
    """`agentctl guard start/stop` as real processes; at the end every guard daemon and
    backupd of the store is stopped and every guard mount under the test's dirs is gone."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.started: set[str] = set()

    def start(self, directory: Path, *args: str, env: dict[str, str] | None = None) -> int:
        done = agentctl_cmd(self.home, "guard", "start", str(directory), "--no-backupd",
                            "--json", *args, env=env)
        assert done.returncode == 0, done.stderr
        self.started.add(os.path.realpath(directory))
        import json

        return int(json.loads(done.stdout)["pid"])

    def stop(self, directory: Path) -> None:
        done = agentctl_cmd(self.home, "guard", "stop", str(directory))
        assert done.returncode == 0, done.stderr
        assert not guard_mounted(directory)

    def pid(self, directory: Path) -> int | None:
        import json

        done = agentctl_cmd(self.home, "guard", "status", "--json")
        for row in json.loads(done.stdout)["guards"]:
            if row["dir"] == os.path.realpath(directory):
                return row["pid"]  # type: ignore[no-any-return]
        return None

    def cleanup(self) -> None:
        import json

        run = self.home / "run"
        for state in run.glob("guard-*.json") if run.exists() else []:
            with contextlib.suppress(Exception):
                pid = json.loads(state.read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
        for directory in self.started:
            for _ in range(20):
                if not guard_mounted(directory):
                    break
                subprocess.run(["umount", "-l", directory], capture_output=True, check=False)
                time.sleep(0.05)
        pid_file = run / "backupd.pid"
        if pid_file.exists():
            text = pid_file.read_text().strip()
            if text.isdigit():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(text), signal.SIGKILL)


@pytest.fixture
def guards(tmp_path: Path) -> Iterator[Guards]:
    manager = Guards(tmp_path / "home")
    try:
        yield manager
    finally:
        manager.cleanup()


def upload_all(home: Path, env: dict[str, str] | None = None) -> None:
    done = agentctl_cmd(home, "backupd", "--once", env=env)
    assert done.returncode == 0, done.stderr
