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
