"""A job cannot talk to the host's daemons over unix sockets unless the user names them.

A read-only view does not stop connect(2). The namespaced engines cover every socket the host
is listening on (in any network namespace) with an inert file; under the filter the job's
connect() waits for its keeper, which refuses the host's sockets (jobs/supervisor.py). Landlock
scopes keep every engine's job from the host's abstract sockets; `--network none` gives a job a
loopback of its own.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunAs
from tests.security.conftest import Hostile

# Connect to each address given; print one verdict a line.
CONNECT = r"""
import socket, sys
for address in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(address.replace("@", "\0", 1) if address.startswith("@") else address)
        print(address, "CONNECTED")
    except OSError as e:
        print(address, "refused", e.errno)
"""


class Listener:
    """A host daemon's socket: a pathname one (optionally bound in a network namespace of its
    own) or an abstract one, accepting while the test runs."""

    def __init__(self, address: str, netns: bool = False) -> None:
        self.address = address
        script = (
            "import socket, sys, time\n"
            "a = sys.argv[1]\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.bind(a.replace('@', '\\0', 1) if a.startswith('@') else a)\n"
            "s.listen()\n"
            "import os\n"
            "if not a.startswith('@'): os.chmod(a, 0o777)\n"
            "print('listening', flush=True)\n"
            "time.sleep(120)\n"
        )
        argv = [sys.executable, "-c", script, address]
        if netns:
            argv = ["unshare", "--net", *argv]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "listening"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def daemons(hostile: Hostile) -> Iterator[dict[str, str]]:
    """Three host daemons: a pathname socket outside the project, one bound in another network
    namespace (as a containerised or rootless daemon's), and an abstract one."""
    hostile.outside.chmod(0o755)
    tag = uuid.uuid4().hex[:8]
    started = [
        Listener(str(hostile.outside / "daemon.sock")),
        Listener(str(hostile.outside / "netns-daemon.sock"), netns=True),
        Listener(f"@ia-test-{tag}"),
    ]
    try:
        yield {"path": started[0].address, "netns": started[1].address,
               "abstract": started[2].address}
    finally:
        for listener in started:
            listener.stop()


def verdicts(output: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) if "CONNECTED" in line else line.split(" refused ")
                for line in output.splitlines() if line)


@pytest.mark.parametrize("hostile", ["kernel"], indirect=True)  # the host's view: any will do
def test_the_hosts_daemons_answer_on_the_host(daemons: dict[str, str]) -> None:
    """The battery's daemons are reachable, so a refusal in a job is the job's confinement."""
    probe = subprocess.run([sys.executable, "-c", CONNECT, *daemons.values()],
                           capture_output=True, text=True, timeout=30)
    assert probe.stdout.count("CONNECTED") == 3, probe.stdout


def test_no_job_reaches_a_host_abstract_socket(
    hostile: Hostile, daemons: dict[str, str]
) -> None:
    result = hostile.run("python3", "-c", CONNECT, daemons["abstract"])
    assert result.returncode == 0, result.stderr
    assert verdicts(result.stdout)[daemons["abstract"]] == "1", result.stdout  # Landlock: EPERM


def test_the_job_reaches_no_host_pathname_socket(
    hostile: Hostile, daemons: dict[str, str]
) -> None:
    result = hostile.run("python3", "-c", CONNECT, daemons["path"], daemons["netns"])
    assert result.returncode == 0, result.stderr
    found = verdicts(result.stdout)
    assert found[daemons["path"]] == "111", result.stdout  # ECONNREFUSED: covered
    assert found[daemons["netns"]] == "111", result.stdout


def test_allow_socket_lets_one_through(hostile: Hostile, daemons: dict[str, str]) -> None:
    result = hostile.run("python3", "-c", CONNECT, daemons["path"], daemons["netns"],
                         options=("--allow-socket", daemons["path"]))
    assert result.returncode == 0, result.stderr
    found = verdicts(result.stdout)
    assert found[daemons["path"]] == "CONNECTED", result.stdout
    assert found[daemons["netns"]] == "111", result.stdout


def test_a_failing_job_is_told_about_covered_sockets(
    hostile: Hostile, daemons: dict[str, str]
) -> None:
    done = hostile.run("python3", "-c", CONNECT_ONE.format(daemons["path"]), quiet=False)
    assert done.returncode == 1
    assert "--allow-socket" in done.stderr and daemons["path"] in done.stderr, done.stderr


CONNECT_ONE = "import socket; socket.socket(socket.AF_UNIX).connect({!r})"


def test_sockets_in_the_project_and_tmp_work(hostile: Hostile) -> None:
    script = r"""
import os, socket, sys, tempfile
for path in ("in-project.sock", os.path.join(tempfile.gettempdir(), sys.argv[1])):
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    conn, _ = server.accept()
    client.sendall(b"ping")
    print(path, conn.recv(4))
"""
    # The job's tmp: its own /tmp on the namespaced engines, the host's under the filter, its
    # TMPDIR under the copy engine.
    result = hostile.run("python3", "-c", script, f"ia-{uuid.uuid4().hex[:8]}.sock")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("b'ping'") == 2, result.stdout


def test_network_none_has_only_loopback(hostile: Hostile, daemons: dict[str, str]) -> None:
    script = CONNECT + r"""
print("interfaces", sorted(line.split(":")[0].strip()
                           for line in open("/proc/net/dev").read().splitlines()[2:]))
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
socket.create_connection(server.getsockname(), timeout=5)
print("loopback works")
"""
    result = hostile.run("python3", "-c", script, daemons["abstract"],
                         options=("--network", "none"))
    assert result.returncode == 0, result.stderr
    assert "interfaces ['lo']" in result.stdout, result.stdout
    assert "loopback works" in result.stdout
    assert "CONNECTED" not in result.stdout


def test_rootless_job_reaches_no_host_socket(
    run_as_user: RunAs, user_project: Path, user_dir: Path
) -> None:
    user_dir.chmod(0o755)
    outside = user_dir / "outside"
    outside.mkdir(mode=0o755)
    listener = Listener(str(outside / "daemon.sock"))
    try:
        time.sleep(0.1)
        done = run_as_user("run", "-q", "--", "python3", "-c", CONNECT, listener.address,
                           cwd=user_project)
    finally:
        listener.stop()
    assert done.returncode == 0, done.stderr
    assert verdicts(done.stdout)[listener.address] == "111", done.stdout


def test_a_symlink_to_a_host_socket_reaches_nothing(
    hostile: Hostile, daemons: dict[str, str]
) -> None:
    """The job names the host's socket through a symlink of its own, in the project and in
    /tmp: what counts is the socket reached, not the name given."""
    script = CONNECT.replace("for address in sys.argv[1:]:", (
        "import os, tempfile\n"
        "in_tmp = os.path.join(tempfile.gettempdir(), sys.argv[2])\n"
        "os.symlink(sys.argv[1], 'link.sock')\n"
        "os.symlink(sys.argv[1], in_tmp)\n"
        "for address in ('link.sock', in_tmp):"))
    name = f"ia-link-{uuid.uuid4().hex[:8]}.sock"
    link = f"/tmp/{name}"  # where the filter's job makes it (the host's /tmp)
    try:
        result = hostile.run("python3", "-c", script, daemons["path"], name)
    finally:
        Path(link).unlink(missing_ok=True)
    assert result.returncode == 0, result.stderr
    assert "CONNECTED" not in result.stdout and result.stdout.count("refused") == 2


def test_a_host_socket_in_the_shared_tmp_stays_the_hosts(hostile: Hostile) -> None:
    """Under the filter /tmp is the host's (tmux's socket lives there): a socket the host had
    bound when the job started is not the job's. The namespaced engines' /tmp is private."""
    path = f"/tmp/ia-host-{uuid.uuid4().hex[:8]}.sock"
    listener = Listener(path)
    try:
        result = hostile.run("python3", "-c", CONNECT, path)
    finally:
        listener.stop()
        Path(path).unlink(missing_ok=True)
    assert result.returncode == 0, result.stderr
    assert "CONNECTED" not in result.stdout, result.stdout
