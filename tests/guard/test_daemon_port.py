"""backupd's control port: fuzzed bytes and fuzzed frames never crash it (hypothesis, against
the real daemon process), and a client of another uid is refused by SO_PEERCRED."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isolated_agent.backupd import Daemon, Settings, Worker
from isolated_agent.protocol.client import ControlError, request
from isolated_agent.protocol.frames import HEADER, VERSION, Code, Frame, FrameReader
from tests.conftest import DISK_SCRATCH_PREFIX
from tests.guard.conftest import Backupd, Staged
from tests.protocol.test_control_port import frames, json_values

bodies = st.dictionaries(st.sampled_from(["id", "ids", "path", "reason", "x"]) | st.text(
    max_size=6), json_values, max_size=4)
fuzz_settings = settings(max_examples=80, deadline=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backupd]:
    """One real backupd for the module, with one staged item and its guard."""
    home = tmp_path_factory.mktemp("port") / "home"
    directory = home.parent / "dir"
    directory.mkdir()
    (directory / "f").write_bytes(b"content")
    staged = Staged(home, directory)
    staged.delete("f")
    staged.close()
    daemon = Backupd(home, args=("--rescan", "0.2"))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.kill()


def alive(daemon: Backupd) -> bool:
    assert daemon.process is not None and daemon.process.poll() is None
    return request(daemon.socket, Frame(Code.HEARTBEAT), timeout=5).code is Code.ACK


def exchange(path: str, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
        return received


@fuzz_settings
@given(garbage=st.binary(min_size=1, max_size=300))
def test_fuzzed_bytes_never_crash_backupd(running: Backupd, garbage: bytes) -> None:
    exchange(running.socket, garbage)
    assert alive(running)


@fuzz_settings
@given(sent=st.lists(frames | st.builds(Frame, st.sampled_from(
    [Code.BACKUP, Code.SKIP, Code.PURGE, Code.QUERY]), bodies), min_size=1, max_size=5))
def test_fuzzed_frames_get_one_answer_each_and_never_crash_backupd(
    running: Backupd, sent: list[Frame]
) -> None:
    replies = FrameReader().feed(exchange(running.socket, b"".join(f.encode() for f in sent)))
    assert len(replies) == len(sent)
    assert all(r.code in (Code.ACK, Code.ERROR) for r in replies)
    assert alive(running)


def test_malformed_headers_get_an_error_frame(running: Backupd) -> None:
    for data in (HEADER.pack(VERSION, ord("D"), 2**32 - 1), HEADER.pack(9, ord("B"), 0),
                 HEADER.pack(VERSION, ord("?"), 0), HEADER.pack(VERSION, ord("D"), 3) + b"[1]"):
        [reply] = FrameReader().feed(exchange(running.socket, data))
        assert reply.code is Code.ERROR
    assert alive(running)
    with pytest.raises(ControlError, match="one item id"):
        request(running.socket, Frame(Code.PURGE, {"path": "/etc/passwd"}))


@settings(max_examples=300, deadline=None)
@given(code=st.sampled_from([Code.BACKUP, Code.SKIP, Code.PURGE, Code.QUERY,
                             Code.REGISTER_ENV, Code.BLOB]), body=bodies)
def test_every_answer_is_a_frame(tmp_path_factory: pytest.TempPathFactory, code: Code,
                                 body: dict[str, object]) -> None:
    """In process, fast: the handler answers anything with ACK or ERROR, never raises."""
    home = str(tmp_path_factory.getbasetemp() / "answer-home")
    worker = Worker(home, Settings())
    try:
        reply = Daemon(home, Settings()).answer(worker, Frame(code, body))
    finally:
        worker.close()
    assert reply.code in (Code.ACK, Code.ERROR)


CLIENT = (
    "import sys; from isolated_agent.protocol.client import request, ControlError\n"
    "from isolated_agent.protocol.frames import Frame, Code\n"
    "try:\n"
    "    request(sys.argv[1], Frame(Code.PURGE, {'id': 1})); print('accepted')\n"
    "except ControlError as e:\n"
    "    print('refused:', e)\n"
)


def test_a_client_of_another_uid_is_refused(
    backupd_factory: Callable[..., Backupd]
) -> None:
    user = "ia-rootless"
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", user], check=True)
    reachable = Path(tempfile.mkdtemp(prefix=DISK_SCRATCH_PREFIX + "backupd-"))
    try:
        reachable.chmod(0o755)
        home = reachable / "home"
        daemon = backupd_factory(home)
        daemon.start()
        (home / "run").chmod(0o755)
        os.chmod(daemon.socket, 0o666)  # file modes out of the way: SO_PEERCRED must refuse
        repo = str(Path(__file__).resolve().parents[2])
        done = subprocess.run(
            ["runuser", "-u", user, "--", "/usr/bin/python3", "-c", CLIENT, daemon.socket],
            capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": repo})
        assert done.stdout.startswith("refused: uid"), (done.stdout, done.stderr)
        assert alive(daemon)
        daemon.kill()
    finally:
        shutil.rmtree(reachable)
