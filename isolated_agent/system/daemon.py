"""Starting a daemon, the same way for each of ours (agentfs, the filter, the guard, backupd):

    fork_daemon(body, log, name)   fork; the child detaches (`detach_process`) and runs `body`;
                                   the caller gets the daemon's pid once it reports ready, or
                                   DaemonFailed with the reason it reported (or that it died)
    Reporter / read_report         the two ends of that report (a pipe, or a socket): one JSON
                                   line, `Report(ok, detail)`, then the daemon's end is closed
    become_daemon                  the child's side alone, for a daemon that is a fresh
                                   interpreter (`python -m ...`) handed the pipe's end
    raise_fd_limit                 as many descriptors as the system allows
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import select
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn


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


class DaemonFailed(Exception):
    """A daemon could not start; the message says why, in one line."""


@dataclass(frozen=True)
class Report:
    """What a daemon tells whoever started it, once: that it serves (with whatever the starter
    needs to know, e.g. when its mount was in place), or why it could not start."""

    ok: bool
    detail: str = ""

    def encode(self) -> bytes:
        return (json.dumps({"ok": self.ok, "detail": self.detail}) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, died: str) -> Report:
        """The report in `data`; `died` (failed) when there is none: the daemon ended first."""
        try:
            fields = json.loads(data.decode(errors="replace").splitlines()[0])
            return cls(bool(fields["ok"]), str(fields["detail"]))
        except (IndexError, ValueError, KeyError, TypeError):
            return cls(False, died)


class Reporter:
    """The daemon's end of its starter's pipe (or socket): one report, then it is closed, so
    that the starter, reading to the end, never waits for a daemon that serves."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def ready(self, detail: str = "") -> None:
        self._send(Report(True, detail))

    def failed(self, reason: str) -> None:
        self._send(Report(False, reason.replace("\n", " ")))

    def _send(self, report: Report) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.write(fd, report.encode())
        except OSError:
            pass  # the starter is gone: nobody to tell
        finally:
            os.close(fd)


def read_report(fd: int, died: str, timeout: float | None = None) -> Report:
    """Wait for the report on `fd` (the starter's end; closed here): the daemon's, `died`
    when it ended without one, a failure when none came within `timeout` seconds."""
    with os.fdopen(fd, "rb") as reader:
        if timeout is not None and not select.select([reader], [], [], timeout)[0]:
            return Report(False, f"no answer within {timeout:.0f} s")
        return Report.decode(reader.read(), died)


def become_daemon(body: Callable[[Reporter], int], reporter: Reporter, log_path: str | None,
                  name: str, expected: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """Run a daemon's life in this (forked) process and exit with `body`'s status: detached
    first (`detach_process`), its failure reported in one line — an `expected` exception by
    its message, anything else as "`name` failed: ..." with the traceback in its log."""
    code = 1
    try:
        detach_process(log_path)
        code = body(reporter)
    except BaseException as e:  # noqa: BLE001 - report, never unwind into the starter's code
        reporter.failed(str(e) if isinstance(e, expected) else f"{name} failed: {e!r}")
        with contextlib.suppress(Exception):
            logging.getLogger(name).exception("%s ended with an error", name)
    finally:
        os._exit(code)


def fork_daemon(body: Callable[[Reporter], int], log_path: str | None, name: str,
                expected: tuple[type[BaseException], ...] = ()) -> tuple[int, Report]:
    """Fork a daemon that runs `body` (see `become_daemon`); return its pid and its report once
    it is ready. Raises DaemonFailed with its reason when it is not (it is gone by then). The
    daemon keeps every descriptor of the caller it was forked with (an env lock, for one)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        become_daemon(body, Reporter(write_end), log_path, name, expected)
    os.close(write_end)
    report = read_report(read_end, f"the {name} daemon died")
    if not report.ok:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise DaemonFailed(report.detail)
    return pid, report
