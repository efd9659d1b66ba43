"""The job's terminal: a pty of its own, relayed by the launcher, never the caller's.

A job that shared the caller's terminal could push keystrokes into the user's shell with the
TIOCSTI ioctl (they run after the job exits: bubblewrap's CVE-2017-5226), read what the user
types to other programs, or take the terminal's foreground. So the job's command always starts
in a session of its own (setsid), and when the caller has a terminal on stdin, stdout or stderr,
those descriptors are replaced by the slave side of a new pseudo-terminal, the job's
controlling terminal. The launcher sits on the master side:

    caller's terminal  <-- raw bytes -->  launcher (relay thread)  <-->  pty master
                                                                          pty slave: the job

- The caller's terminal is put in raw mode while the job runs (only when the launcher is in
  its foreground, else reading it would stop the launcher), so Ctrl-C, Ctrl-Z and Ctrl-\\ reach
  the job's pty as bytes and its line discipline turns them into signals for the job's own
  foreground process group: job control works inside as in any shell.
- The job's pty starts with the caller's terminal settings and window size; a SIGWINCH of the
  caller's terminal is passed on.
- When every process holding the slave is gone the master reads end-of-file (EIO); what the
  job wrote before is drained first. The caller's terminal settings come back however the job
  ended.

A TIOCSTI on the job's pty only reaches the job itself (and the seccomp baseline refuses it
anyway); the caller's terminal is not the job's controlling terminal, so the kernel refuses
TIOCSTI there even to a process that opens it by its path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import termios
import threading
import tty
from typing import Any

STANDARD_FDS = (0, 1, 2)


class JobTerminal:
    """The pty a job gets when the caller has a terminal, or none (then the job only gets a
    session of its own). Create it before forking; the job's side calls `attach_job`, the
    launcher `start`, and `finish` when the job has ended."""

    def __init__(self) -> None:
        self.master: int | None = None
        self.slave: int | None = None
        self.tty_fds: tuple[int, ...] = ()  # which of 0, 1, 2 were the caller's terminal
        self._caller: int | None = None  # a descriptor of the caller's terminal
        self._saved_attrs: list[Any] | None = None
        self._relay: threading.Thread | None = None
        self._stop_r, self._stop_w = -1, -1
        self._previous_winch: Any = None

    @classmethod
    def open(cls) -> JobTerminal:
        terminal = cls()
        terminal.tty_fds = tuple(fd for fd in STANDARD_FDS if _is_tty(fd))
        if not terminal.tty_fds:
            return terminal
        terminal._caller = terminal.tty_fds[0]
        terminal.master, terminal.slave = os.openpty()  # both close on exec
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(terminal.slave, termios.TCSANOW,
                              termios.tcgetattr(terminal._caller))
        terminal._copy_window_size()
        return terminal

    # -- the job's side (in the process that will exec the command) --------------------------

    def attach_job(self) -> None:
        """Start a new session; make the pty its controlling terminal and the job's standard
        descriptors that were the caller's terminal."""
        os.setsid()
        if self.slave is None:
            return
        fcntl.ioctl(self.slave, termios.TIOCSCTTY, 0)
        for fd in self.tty_fds:
            os.dup2(self.slave, fd)
        os.close(self.slave)
        if self.master is not None:
            os.close(self.master)

    def close_in_child(self) -> None:
        """For a process of ours between the launcher and the command: it needs no master."""
        if self.master is not None:
            os.close(self.master)
            self.master = None

    def close_slave(self) -> None:
        """Once the command is forked: the slave is the job's alone, so the master reads
        end-of-file as soon as the job's last process is gone."""
        if self.slave is not None:
            os.close(self.slave)
            self.slave = None

    # -- the launcher's side ------------------------------------------------------------------

    def start(self) -> None:
        """After forking the job: drop our slave, put the caller's terminal in raw mode, and
        relay both ways until the job's side is closed."""
        if self.master is None:
            return
        self.close_slave()
        source: int | None = None
        if 0 in self.tty_fds and _in_foreground(0):
            source = 0
            with contextlib.suppress(OSError, termios.error):
                self._saved_attrs = termios.tcgetattr(0)
                tty.setraw(0, termios.TCSANOW)
        target = next((fd for fd in (1, 2, 0) if fd in self.tty_fds), 0)
        self._previous_winch = signal.signal(signal.SIGWINCH, self._on_winch)
        self._stop_r, self._stop_w = os.pipe()
        self._relay = threading.Thread(
            target=_relay, args=(self.master, source, target, self._stop_r),
            name="pty-relay", daemon=True)
        self._relay.start()

    def finish(self) -> None:
        """The job has ended: let the relay drain what it wrote, then restore the terminal."""
        if self._relay is not None:
            self._relay.join(timeout=2)  # the master reads EIO once the job's side is gone
            if self._relay.is_alive():  # a process of the job outlived it: stop relaying
                os.write(self._stop_w, b"x")
                self._relay.join(timeout=2)
            os.close(self._stop_r)
            os.close(self._stop_w)
            self._relay = None
        if self._previous_winch is not None:
            signal.signal(signal.SIGWINCH, self._previous_winch)
            self._previous_winch = None
        if self._saved_attrs is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(0, termios.TCSADRAIN, self._saved_attrs)
            self._saved_attrs = None
        for fd in (self.master, self.slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.master = self.slave = None

    def _on_winch(self, signum: int, frame: object) -> None:
        self._copy_window_size()

    def _copy_window_size(self) -> None:
        target = self.master if self.master is not None else self.slave
        if self._caller is None or target is None:
            return
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetwinsize(target, termios.tcgetwinsize(self._caller))


def _relay(master: int, source: int | None, target: int, stop: int) -> None:
    """Copy the caller's keystrokes to the job and the job's output to the caller until the
    job's side of the pty is closed (EIO) or we are told to stop."""
    watched = [master, stop] + ([source] if source is not None else [])
    while True:
        try:
            ready, _, _ = select.select(watched, [], [])
        except InterruptedError:
            continue
        if stop in ready:
            return
        if master in ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: no process holds the slave any more
                return
            if not data:
                return
            _write_all(target, data)
        if source is not None and source in ready:
            try:
                data = os.read(source, 65536)
            except OSError:
                data = b""
            if not data:  # the caller's input ended: no more keystrokes to pass on
                watched.remove(source)
                source = None
                continue
            _write_all(master, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except OSError:  # the other side is gone (EIO, EPIPE): nothing to deliver to
            return


def _is_tty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _in_foreground(fd: int) -> bool:
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False

