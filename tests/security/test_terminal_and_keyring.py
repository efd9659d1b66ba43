"""A job cannot type into the user's terminal, nor reach the kernel keyrings of its caller.

Terminal: the job gets a session and a pty of its own, and the seccomp baseline refuses TIOCSTI
and TIOCLINUX. The attack is run from a real interactive shell on a real pty: whatever the job
pushes into a terminal's input queue would be run by that shell once agentctl returns.
"""

from __future__ import annotations

import ctypes
import os
import time
import uuid

import pexpect

from tests.security.conftest import Hostile

# Push "touch MARKER" + newline into every terminal the job can name: its stdin, /dev/tty,
# and the caller's terminal by its path; TIOCLINUX too, and TIOCSTI with garbage in the upper
# 32 bits of the request (the kernel ignores them; a filter comparing all 64 would not).
INJECT = r"""
import fcntl, os, sys, termios
marker, caller_tty = sys.argv[1], sys.argv[2]
line = f"touch {marker}\n".encode()
targets = {"stdin": 0}
for name, path in (("dev-tty", "/dev/tty"), ("caller-tty", caller_tty)):
    try:
        targets[name] = os.open(path, os.O_RDWR | os.O_NOCTTY)
    except OSError as e:
        print(name, "open", e.errno)
for name, fd in targets.items():
    for request in (termios.TIOCSTI, termios.TIOCSTI | (1 << 32)):
        try:
            for byte in line:
                fcntl.ioctl(fd, request, bytes([byte]))
            print(name, hex(request), "INJECTED")
        except OSError as e:
            print(name, hex(request), "refused", e.errno)
    try:
        fcntl.ioctl(fd, 0x541C, bytes([2]))  # TIOCLINUX, TIOCL_SETSEL
        print(name, "TIOCLINUX INJECTED")
    except OSError as e:
        print(name, "TIOCLINUX refused", e.errno)
print("session", os.getsid(0), "pgrp", os.getpgrp())
"""


def test_a_job_cannot_type_into_the_users_terminal(hostile: Hostile) -> None:
    marker = hostile.outside / "typed-by-the-job"
    env = {**hostile.env, "PS1": "user$ ", "TERM": "dumb"}
    shell = pexpect.spawn("bash", ["--norc", "--noprofile", "-i"], cwd=str(hostile.project),
                          env=env, encoding="utf-8", timeout=30)
    try:
        shell.expect_exact("user$ ")
        script = hostile.project / "inject.py"
        script.write_text(INJECT)
        argv = hostile.argv("python3", str(script), str(marker), "$(tty)")
        shell.sendline(" ".join(argv) + "; echo job-exit=$?")
        shell.expect(r"job-exit=(\d+)")
        output = shell.before
        assert shell.match.group(1) == "0", output
        shell.expect_exact("user$ ")
        shell.sendline("echo shell-alive")
        shell.expect_exact("shell-alive")
        time.sleep(0.5)  # an injected line would have run by now
    finally:
        shell.close(force=True)
    assert "INJECTED" not in output, output
    assert output.count("refused 1") >= 4, output  # EPERM on stdin and on /dev/tty at least
    assert not marker.exists(), "the job typed a command into the user's shell"


KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_SESSION_KEYRING = -3
_SYS_ADD_KEY = 248 if os.uname().machine == "x86_64" else 217
_SYS_KEYCTL = 250 if os.uname().machine == "x86_64" else 219
_KEYCTL_REVOKE = 3

# What a job tries against its caller's keyrings: find the secret by its description in
# /proc/keys and read it, and plant a key where the caller would find it.
KEYRING_ATTACK = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
name = sys.argv[1].encode()
ADD_KEY, KEYCTL = int(sys.argv[2]), int(sys.argv[3])
for ring in (-4, -3, -5):  # user, session, user-session
    r = libc.syscall(ADD_KEY, b"user", b"planted-" + name, b"x", 1, ctypes.c_int(ring))
    print("add_key", ring, "PLANTED" if r >= 0 else f"refused {ctypes.get_errno()}")
KEYCTL_SEARCH, KEYCTL_READ = 10, 11
for ring in (-4, -3):
    r = libc.syscall(KEYCTL, KEYCTL_SEARCH, ctypes.c_int(ring), b"user", name, 0)
    if r >= 0:
        buf = ctypes.create_string_buffer(64)
        n = libc.syscall(KEYCTL, KEYCTL_READ, ctypes.c_int(r), buf, 64)
        print("search", ring, "FOUND", buf.raw[:max(n, 0)])
    else:
        print("search", ring, f"refused {ctypes.get_errno()}")
"""


def test_a_job_cannot_reach_its_callers_keyrings(hostile: Hostile) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    name = f"ia-secret-{uuid.uuid4().hex[:8]}"
    key = libc.syscall(_SYS_ADD_KEY, b"user", name.encode(), b"s3cret", 6,
                       ctypes.c_int(KEY_SPEC_USER_KEYRING))
    assert key > 0, os.strerror(ctypes.get_errno())
    try:
        result = hostile.run("python3", "-c", KEYRING_ATTACK, name, str(_SYS_ADD_KEY),
                             str(_SYS_KEYCTL))
    finally:
        libc.syscall(_SYS_KEYCTL, _KEYCTL_REVOKE, ctypes.c_int(key))
    assert result.returncode == 0, result.stderr
    assert "FOUND" not in result.stdout and "PLANTED" not in result.stdout, result.stdout
    assert result.stdout.count("refused 1") == 5, result.stdout
