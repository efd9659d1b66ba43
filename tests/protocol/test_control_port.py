"""The control-port protocol: frames round-trip, garbage never crashes a daemon, and only our
own user, outside any job, may talk to it."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isolated_agent.protocol.client import ControlError, request
from isolated_agent.protocol.frames import (
    HEADER,
    MAX_PAYLOAD,
    VERSION,
    Code,
    Frame,
    FrameReader,
    ProtocolError,
)
from isolated_agent.protocol.peer import PeerCred
from isolated_agent.protocol.server import serve
from tests.conftest import DISK_SCRATCH_PREFIX, REPO

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12,
)
frames = st.one_of(
    st.builds(Frame, st.sampled_from([c for c in Code if c is not Code.BLOB]),
              st.dictionaries(st.text(max_size=10), json_values, max_size=5)),
    st.builds(lambda blob: Frame(Code.BLOB, blob=blob), st.binary(max_size=300)),
)


@given(st.lists(frames, max_size=6), st.integers(1, 50))
def test_frames_round_trip_whatever_the_chunking(sent: list[Frame], chunk: int) -> None:
    wire = b"".join(f.encode() for f in sent)
    reader = FrameReader()
    received: list[Frame] = []
    for start in range(0, len(wire), chunk):
        received += reader.feed(wire[start : start + chunk])
    assert received == sent


@given(st.binary(max_size=200))
def test_decoder_fails_only_with_protocol_error(garbage: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        FrameReader().feed(garbage)


def test_decoder_rejects_bad_headers() -> None:
    with pytest.raises(ProtocolError, match="version"):
        FrameReader().feed(HEADER.pack(VERSION + 1, ord("0"), 0))
    with pytest.raises(ProtocolError, match="unknown frame code"):
        FrameReader().feed(HEADER.pack(VERSION, ord("?"), 0))
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameReader().feed(HEADER.pack(VERSION, ord("Q"), MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError, match="JSON object"):
        FrameReader().feed(HEADER.pack(VERSION, ord("Q"), 2) + b"[]")


class RunningDaemon:
    """A real control-port server on a real socket, in a thread with its own trio loop."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.calls: list[tuple[Frame, PeerCred]] = []
        self._started = threading.Event()
        self._cancel: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _handle(self, frame: Frame, peer: PeerCred) -> Frame:
        self.calls.append((frame, peer))
        if frame.code is Code.QUERY and frame.body.get("crash"):
            raise RuntimeError("handler bug")
        return Frame(Code.ACK, {"echo": frame.body})

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._cancel = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, self.path, self._handle)
                self._started.set()

    def __enter__(self) -> RunningDaemon:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._cancel is not None and self._token is not None
        self._token.run_sync_soon(self._cancel.cancel)
        self._thread.join(10)

    @property
    def alive(self) -> bool:
        return request(self.path, Frame(Code.HEARTBEAT)).code is Code.ACK


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[RunningDaemon]:
    with RunningDaemon(tmp_path / "control.sock") as running:
        yield running


def test_request_reply_and_socket_mode(daemon: RunningDaemon) -> None:
    assert os.stat(daemon.path).st_mode & 0o777 == 0o600
    reply = request(daemon.path, Frame(Code.QUERY, {"what": "status"}))
    assert reply == Frame(Code.ACK, {"echo": {"what": "status"}})
    frame, peer = daemon.calls[-1]
    assert (peer.pid, peer.uid) == (os.getpid(), os.getuid())


def test_a_failing_handler_answers_error_and_the_daemon_lives_on(daemon: RunningDaemon) -> None:
    with pytest.raises(ControlError, match="internal error"):
        request(daemon.path, Frame(Code.QUERY, {"crash": True}))
    assert daemon.alive


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=400))
def test_fuzzed_bytes_never_crash_the_daemon(daemon: RunningDaemon, garbage: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(daemon.path)
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    assert daemon.alive


def test_oversized_length_gets_an_error_frame(daemon: RunningDaemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(daemon.path)
        sock.sendall(HEADER.pack(VERSION, ord("Q"), 2**32 - 1))
        reply = FrameReader().feed(sock.recv(65536))
    assert reply[0].code is Code.ERROR and "exceeds" in reply[0].body["error"]
    assert daemon.alive


CLIENT = (
    "import sys; from isolated_agent.protocol.client import request, ControlError\n"
    "from isolated_agent.protocol.frames import Frame, Code\n"
    "try:\n"
    "    request(sys.argv[1], Frame(Code.REGISTER_ENV, {'env': 'x'})); print('accepted')\n"
    "except ControlError as e:\n"
    "    print('refused:', e)\n"
)


@pytest.fixture
def package_copy() -> Iterator[str]:
    """A directory holding a copy of the package under test, for PYTHONPATH of processes that
    cannot see the checkout: a job has a /tmp of its own (the checkout may live under /tmp),
    and another user may not be able to read it. On the disk, outside /tmp, readable by all."""
    scratch = Path(DISK_SCRATCH_PREFIX)
    base = Path(tempfile.mkdtemp(prefix=scratch.name + "pkg-", dir=scratch.parent))
    try:
        shutil.copytree(REPO / "isolated_agent", base / "isolated_agent",
                        ignore=shutil.ignore_patterns("__pycache__"))
        base.chmod(0o755)
        yield str(base)
    finally:
        shutil.rmtree(base)


def test_a_client_of_another_uid_is_refused(package_copy: str) -> None:
    user = "ia-rootless"
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", user], check=True)
    reachable = Path(tempfile.mkdtemp(prefix=DISK_SCRATCH_PREFIX + "port-"))
    try:
        reachable.chmod(0o755)
        with RunningDaemon(reachable / "control.sock") as daemon:
            os.chmod(daemon.path, 0o666)  # the file mode out of the way: SO_PEERCRED must refuse
            done = subprocess.run(
                ["runuser", "-u", user, "--", "/usr/bin/python3", "-c", CLIENT, daemon.path],
                capture_output=True, text=True, timeout=30,
                env={**os.environ, "PYTHONPATH": package_copy},
            )
            assert done.stdout.startswith("refused: uid"), (done.stdout, done.stderr)
            assert all(frame.code is not Code.REGISTER_ENV for frame, _ in daemon.calls)
    finally:
        shutil.rmtree(reachable)


def test_a_caller_inside_a_job_is_refused(
    daemon: RunningDaemon, tmp_path: Path, store_home: Path, project: Path, package_copy: str
) -> None:
    """Even handed the socket (--allow), a job cannot use the control port. (The job imports
    the client from `package_copy`: it would not see a checkout under /tmp.)"""
    socket_dir = Path(daemon.path).parent
    done = subprocess.run(
        [sys.executable, "-m", "isolated_agent", "run", "-q", "--allow", str(socket_dir),
         "--", "/usr/bin/python3", "-c", CLIENT, daemon.path],
        cwd=project, capture_output=True, text=True, timeout=60,
        env={**os.environ, "ISOLATED_AGENT_HOME": str(store_home), "PYTHONPATH": package_copy},
    )
    assert done.stdout.strip() == "refused: processes inside a job may not use the control port", (
        done.stdout, done.stderr)
    assert all(frame.code is not Code.REGISTER_ENV for frame, _ in daemon.calls)
