"""The confinement rules that need no job to check: which sockets a view covers, and that the
seccomp baseline loads and refuses what it lists (in a forked child, which it confines)."""

from __future__ import annotations

import errno
import fcntl
import os
import termios

import pytest

from isolated_agent.jobs.host_sockets import (
    NAME_SERVICE_SOCKETS,
    parse_unix_table,
    sockets_to_mask,
)
from isolated_agent.jobs.supervisor import Places

TABLE = (
    b"Num       RefCount Protocol Flags    Type St Inode Path\n"
    b"0000000000000000: 00000002 00000000 00010000 0001 01 1001 /run/docker.sock\n"
    b"0000000000000000: 00000002 00000000 00010000 0001 01 1002 @/containerd-shim/x.sock\n"
    b"0000000000000000: 00000002 00000000 00000000 0001 03 1003\n"
    b"0000000000000000: 00000002 00000000 00010000 0001 01 1004 /srv/a dir/with space.sock\n"
)


def test_the_unix_table_gives_pathname_sockets_only() -> None:
    assert parse_unix_table(TABLE) == {"/run/docker.sock", "/srv/a dir/with space.sock"}


def test_writable_allowed_and_name_service_sockets_stay_reachable() -> None:
    bound = ["/run/docker.sock", "/srv/project/test.sock", "/tmp/x.sock",
             "/run/user/1000/ssh.sock", "/run/user/1000/bus", NAME_SERVICE_SOCKETS[0]]
    masked = sockets_to_mask(bound, writable=["/srv/project", "/tmp"],
                             allowed=["/run/user/1000/ssh.sock"])
    assert masked == ["/run/docker.sock", "/run/user/1000/bus"]


SYSCALL_NUMBERS = {
    "x86_64": {"keyctl": 250, "unshare": 272, "mount": 165, "clone3": 435},
    "aarch64": {"keyctl": 219, "unshare": 97, "mount": 40, "clone3": 435},
}


@pytest.mark.parametrize("attempt", ["tiocsti", "tiocsti-upper-bits", "keyctl", "unshare",
                                     "mount", "clone3"])
def test_the_baseline_refuses_what_it_lists(attempt: str) -> None:
    """Load the baseline in a child (it cannot be taken off again) and try one thing there."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 0
        try:
            import ctypes

            from isolated_agent.jobs.syscall_filter import install_baseline
            from isolated_agent.system import libc

            libc.set_no_new_privs()
            install_baseline()
            c = ctypes.CDLL(None, use_errno=True)
            number = SYSCALL_NUMBERS[os.uname().machine]
            if attempt.startswith("tiocsti"):
                request = termios.TIOCSTI | ((1 << 32) if attempt.endswith("bits") else 0)
                master, _ = os.openpty()
                try:
                    fcntl.ioctl(master, request, b"x")
                except OSError as e:
                    code = e.errno or 0
            else:
                c.syscall(number[attempt], 0x10000000 if attempt == "unshare" else 0, 0, 0, 0)
                code = ctypes.get_errno()
        finally:
            os.write(write_end, str(code).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        got = int(f.read() or -1)
    os.waitpid(pid, 0)
    expected = errno.ENOSYS if attempt == "clone3" else errno.EPERM
    assert got == expected, os.strerror(got) if got > 0 else got


def _places() -> Places:
    return Places(writable=("/srv/project", "/home/u/.cache"), scratch=("/tmp", "/dev/shm"),
                  kept_sockets=("/run/user/1000/ssh.sock", "/run/nscd/socket"),
                  host_sockets=frozenset({"/run/docker.sock", "/tmp/tmux-0/default",
                                          "/srv/project/dev.sock", "/run/nscd/socket"}))


@pytest.mark.unit
def test_the_filter_job_changes_metadata_only_where_it_may_write() -> None:
    places = _places()
    for allowed in ("/srv/project", "/srv/project/a/b", "/home/u/.cache/x", "/tmp/x",
                    "/dev/shm/y", None):
        assert places.may_change(allowed), allowed
    for refused in ("/tmp", "/dev/shm", "/srv", "/srv/project2", "/usr/bin/su", "/etc/passwd",
                    "/home/u/.bashrc", "/tmpx"):
        assert not places.may_change(refused), refused


@pytest.mark.unit
def test_the_filter_job_reaches_its_own_sockets_and_the_kept_ones() -> None:
    places = _places()
    for allowed in ("/srv/project/dev.sock", "/srv/project/t.sock", "/tmp/job.sock",
                    "/run/user/1000/ssh.sock", "/run/nscd/socket"):
        assert places.may_connect(allowed), allowed
    for refused in ("/run/docker.sock", "/tmp/tmux-0/default", "/run/later.sock",
                    "/run/user/1000/bus"):
        assert not places.may_connect(refused), refused
    assert places.refused_host_sockets() == ["/run/docker.sock", "/tmp/tmux-0/default"]
