"""What a daemon started on demand does to itself first: leave its caller's session, working
directory and terminal, and allow itself as many descriptors as the system lets it."""

from __future__ import annotations

import contextlib
import os
import resource


def detach_process(log_path: str | None) -> None:
    """A session of its own (no controlling terminal, no signal meant for its caller's
    process group), "/" as its working directory (its caller's may be inside a guarded or
    mounted directory: held there, the daemon would reach the files below a guard's mount and
    keep a mount busy), stdio to /dev/null or to `log_path`."""
    with contextlib.suppress(PermissionError):  # EPERM: it leads a session or group already
        os.setsid()
    os.chdir("/")
    detach_stdio(log_path)


def detach_stdio(log_path: str | None) -> None:
    """A daemon's stdin from /dev/null, its stdout and stderr to `log_path` (or nowhere)."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    if log_path:
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    else:
        out = null
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        if fd > 2:
            os.close(fd)


def raise_fd_limit() -> None:
    """A FUSE daemon holds one O_PATH fd per node the kernel holds: allow as many as the
    system lets us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if os.geteuid() == 0:
        with contextlib.suppress(OSError, ValueError), open("/proc/sys/fs/nr_open") as f:
            wanted = max(hard, int(f.read()))
    for limit in (wanted, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
            return
        except (OSError, ValueError):
            continue
