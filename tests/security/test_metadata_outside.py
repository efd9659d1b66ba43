"""A job changes no mode, owner, time or extended attribute outside its write paths.

The namespaced engines show the job a read-only host, so these fail with EROFS. Under the
filter the job sees the host's tree itself and Landlock does not judge these calls: they wait
for the job's keeper, which does them where they may act (jobs/supervisor.py). Every spelling a
clever job would try is here: by path, by descriptor (a file opened read-only, which Landlock
allows anywhere), through a symlink in the project, through /proc/self/fd, with the newest
system calls, and by racing a second thread against the check.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.security.conftest import Hostile

# Each attempt on argv[1] (a host file outside the project) prints its name and "changed" or
# the error it got.
ATTEMPTS = r"""
import ctypes, fcntl, os, struct, sys
target = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)

def attempt(name, action):
    try:
        action()
        print(name, "changed")
    except OSError as e:
        print(name, "refused", e.errno)

def raw(number, *args):
    if libc.syscall(number, *args) == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))

fd = os.open(target, os.O_RDONLY)
path_fd = os.open(target, os.O_PATH)
os.symlink(target, "link-out")
attempt("chmod", lambda: os.chmod(target, 0o4777))
attempt("chmod-via-symlink", lambda: os.chmod("link-out", 0o4777))
attempt("chmod-via-proc-fd", lambda: os.chmod(f"/proc/self/fd/{path_fd}", 0o4777))
attempt("fchmod", lambda: os.fchmod(fd, 0o4777))
attempt("fchmodat2", lambda: raw(452, -100, target.encode(), 0o4777, 0))
attempt("chown", lambda: os.chown(target, 65534, 65534))
attempt("fchown", lambda: os.fchown(fd, 65534, -1))
attempt("utime", lambda: os.utime(target, (1, 1)))
attempt("futimens", lambda: os.utime(fd, (1, 1)))
attempt("setxattr", lambda: os.setxattr(target, "user.planted", b"1"))
attempt("fsetxattr", lambda: os.setxattr(fd, "user.planted", b"1"))
attempt("setxattrat", lambda: raw(463, -100, target.encode(), 0, b"user.planted",
                                  struct.pack("=QII", 0, 0, 0), 16))
attempt("removexattr", lambda: os.removexattr(target, "user.kept"))
attempt("chattr-nodump", lambda: fcntl.ioctl(fd, 0x40086602, struct.pack("=i", 0x40)))
"""

WITHOUT_NAMESPACES = pytest.mark.parametrize("hostile", ["filter", "copy"], indirect=True)


def _verdicts(output: str) -> dict[str, str]:
    return {line.split()[0]: line.split(None, 1)[1] for line in output.splitlines() if line}


def _state(path: Path) -> tuple[object, ...]:
    st = path.stat()
    return (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, sorted(os.listxattr(path)))


def test_no_metadata_changes_outside_the_project(hostile: Hostile) -> None:
    victim = hostile.outside / "system-file"
    victim.write_text("host\n")
    victim.chmod(0o644)
    os.setxattr(victim, "user.kept", b"1")
    hostile.give(victim)
    hostile.outside.chmod(0o755)
    before = _state(victim)
    result = hostile.run("python3", "-c", ATTEMPTS, str(victim))
    assert result.returncode == 0, result.stderr
    found = _verdicts(result.stdout)
    assert len(found) == 14, result.stdout
    assert not [name for name, verdict in found.items() if verdict == "changed"], result.stdout
    assert _state(victim) == before


def test_metadata_inside_the_project_changes_the_env(hostile: Hostile) -> None:
    script = r"""
import os
os.chmod("a.txt", 0o600)
os.utime("a.txt", (1_000_000_000, 1_000_000_000))
os.setxattr("a.txt", "user.tag", b"x")
os.mkdir("d")
fd = os.open("d", os.O_RDONLY)
os.fchmod(fd, 0o2750)
st = os.stat("a.txt")
print(oct(st.st_mode & 0o7777), int(st.st_mtime), os.getxattr("a.txt", "user.tag"),
      oct(os.stat("d").st_mode & 0o7777))
"""
    result = hostile.run("python3", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0o600", "1000000000", "b'x'", "0o2750"]
    host = hostile.project / "a.txt"
    assert stat.S_IMODE(host.stat().st_mode) != 0o600
    assert os.listxattr(host) == []


@WITHOUT_NAMESPACES
def test_the_shared_tmp_itself_is_the_hosts(hostile: Hostile) -> None:
    """Without namespaces /tmp is the host's: beneath it the job's files are its own, but the
    directory itself keeps its mode."""
    script = r"""
import os, tempfile
try:
    os.chmod("/tmp", 0o777)
    print("tmp changed")
except OSError as e:
    print("tmp refused", e.errno)
fd, name = tempfile.mkstemp()
os.chmod(name, 0o4755)
print("own", oct(os.stat(name).st_mode & 0o7777))
os.unlink(name)
"""
    mode = os.stat("/tmp").st_mode
    result = hostile.run("python3", "-c", script)
    assert result.returncode == 0, result.stderr
    assert "tmp refused 1" in result.stdout and "own 0o4755" in result.stdout, result.stdout
    assert os.stat("/tmp").st_mode == mode


@WITHOUT_NAMESPACES
def test_racing_the_path_after_the_check_changes_nothing(hostile: Hostile) -> None:
    """A second thread rewrites the path between the keeper's read and the kernel's: the
    keeper reads the job's memory once and acts on what it opened, so the outside file is
    never reached whichever name the kernel would have seen."""
    victim = hostile.outside / "raced"
    victim.write_text("host\n")
    victim.chmod(0o644)
    hostile.give(victim)
    hostile.outside.chmod(0o755)
    script = r"""
import ctypes, os, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
inside, outside = b"a.txt".ljust(len(sys.argv[1]) + 1, b"\0"), sys.argv[1].encode() + b"\0"
buffer = ctypes.create_string_buffer(inside, len(outside) + 8)
stop = False
def flip():
    while not stop:
        ctypes.memmove(buffer, outside, len(outside))
        ctypes.memmove(buffer, inside, len(inside))
threading.Thread(target=flip, daemon=True).start()
changed = 0
for _ in range(3000):
    if libc.chmod(buffer, 0o4777) == 0:
        changed += 1
stop = True
print("done", changed)
"""
    result = hostile.run("python3", "-c", script, str(victim), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644

