"""The `fuse` engine of `agentctl run`: agentfs serving each root inside the job's namespace.

Who does what, so that the job can neither see nor signal its filesystem daemon, and nothing is
ever mounted on the host:

    launcher (host)      start(): for each root, a socketpair and an agentfs daemon forked on
                         the host side — outside the job's pid namespace, in its own session
                         (Ctrl-C in the terminal is for the job, not for it), dying with the
                         launcher; it opens the root's layers by path, on the host, then waits
     B (job's pid 1)     mount_root(): opens /dev/fuse, mounts `fuse.agentfs` with fd=N at the
                         root's path inside the job's mount namespace, hands the fd over the
                         socket (SCM_RIGHTS), closes its copy, waits for "ok"
    daemon               serves the fd as an already-mounted session (libfuse's /dev/fd/N)
    job ends             the namespace goes, the kernel ends the session, the daemon exits;
                         stop() makes sure of it

Fail closed: if a daemon cannot open its layers or dies, B gets an error (or end-of-file) and
the command never runs; a daemon that dies later leaves the job ENOTCONN, never the host files
(B holds no copy of the fd, so the kernel aborts the connection when the daemon goes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import stat
import time

from isolated_agent.engines.id_swap import id_swap_for
from isolated_agent.env.store import Env, Root, live_socket_path
from isolated_agent.errors import IsolationError
from isolated_agent.fusefs.daemon_log import LogWatch
from isolated_agent.system import libc
from isolated_agent.system.daemon import Report, detach_stdio

_ANSWER_TIMEOUT = 30.0


def check_dev_fuse(engine: str) -> None:
    """Raise IsolationError saying what keeps this user from /dev/fuse, and the fix."""
    try:
        st = os.stat("/dev/fuse")
    except OSError:
        raise IsolationError(engine, "/dev/fuse is missing",
                             "load the fuse module: modprobe fuse") from None
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise IsolationError(
            engine, f"/dev/fuse is not open to you (mode {stat.S_IMODE(st.st_mode):04o})",
            "make it 0666, as the fuse3 package's udev rule does: chmod 0666 /dev/fuse")


class FuseEngine:
    name = "fuse"
    namespaces = True

    def __init__(self) -> None:
        self._links: dict[int, socket.socket] = {}
        self._daemons: list[int] = []
        self._logs: list[tuple[str, LogWatch]] = []

    def check(self, rootless: bool) -> None:
        check_dev_fuse("fuse engine")
        try:
            import pyfuse3  # noqa: F401
            import trio  # type: ignore[import-untyped]  # noqa: F401
        except ImportError as e:
            raise IsolationError(
                "fuse engine", f"{e.name} is not installed",
                "install fuse3 and libfuse3-dev, then `pip install pyfuse3`",
            ) from None

    # -- host side ------------------------------------------------------------------------------

    def start(self, env: Env, log_dir: str) -> None:
        """Fork one daemon per root; they wait for their /dev/fuse fd."""
        for root in env.roots:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            key = hashlib.sha256(os.fsencode(root.upper)).hexdigest()[:12]
            log_path = os.path.join(log_dir, f"agentfs-{key}.log")  # one per env root
            self._logs.append((root.path, LogWatch(log_path)))
            launcher = os.getpid()
            pid = os.fork()
            if pid == 0:
                ours.close()
                for other in self._links.values():
                    other.close()
                _daemon_main(root, theirs, launcher, log_path,
                             live_socket_path(log_dir, env.id, root.index))
            theirs.close()
            self._links[root.index] = ours
            self._daemons.append(pid)

    def job_started(self, pid: int, cgroup_dir: str | None) -> None:
        pass  # each daemon serves its own mount, in the job's namespace: nobody to tell

    def problems(self) -> list[str]:
        return [line for root, watch in self._logs
                for line in watch.problem(f"agentfs (the env's view of {root})")]

    def stop(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()
        for pid in self._daemons:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for pid in self._daemons:
            while True:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    break  # reaped already (the launcher reaps as a subreaper)
                if done:
                    break
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
                    break
                time.sleep(0.01)
        self._daemons.clear()

    # -- inside the job's mount namespace -------------------------------------------------------

    def mount_root(self, root: Root, target: str, lower: str) -> None:
        step = f"agentfs mount of {root.path}"
        link = self._links.get(root.index)
        if link is None:
            raise IsolationError(step, "no agentfs daemon was started for this root")
        try:
            fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise IsolationError(step, f"/dev/fuse: {os.strerror(e.errno or 0)}") from e
        try:
            options = ",".join((
                f"fd={fuse_fd}",
                f"rootmode={stat.S_IFDIR:o}",
                f"user_id={os.getuid()}",
                f"group_id={os.getgid()}",
                "default_permissions",
            ))
            libc.mount("agentfs", target, "fuse.agentfs", libc.MS_NOSUID | libc.MS_NODEV, options)
            socket.send_fds(link, [b"fd"], [fuse_fd])
        except OSError as e:
            raise IsolationError(step, os.strerror(e.errno or 0)) from e
        finally:
            os.close(fuse_fd)  # the daemon's copy must be the only one: its death aborts
        try:
            link.settimeout(_ANSWER_TIMEOUT)
            report = Report.decode(link.recv(4096), "the agentfs daemon exited")
        except OSError as e:
            raise IsolationError(step, f"no answer from the agentfs daemon: {e}") from e
        finally:
            link.close()
        if not report.ok:
            raise IsolationError(step, report.detail)


def _daemon_main(root: Root, link: socket.socket, launcher: int, log_path: str,
                 live_socket: str) -> None:
    """The host-side daemon of one root. Never returns."""
    code = 1
    try:
        libc.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != launcher:
            os._exit(1)  # the launcher is gone already
        os.setsid()  # out of the terminal's process group: Ctrl-C belongs to the job
        for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP,
                       signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.chdir("/")
        from isolated_agent.engines.fuse.daemon import (
            MountConfig,
            MountFailed,
            open_layers,
            serve,
            setup_logging,
        )
        detach_stdio(log_path)
        setup_logging()
        config = MountConfig(lowers=root.lowers, upper=root.upper, work=root.work,
                             id_swap=id_swap_for(root.path))
        try:
            layers = open_layers(config)
        except MountFailed as e:
            link.send(Report(False, str(e)).encode())
            os._exit(1)
        _, fds, _, _ = socket.recv_fds(link, 16, 1)
        if not fds:
            os._exit(0)  # the job never got to mount: nothing to serve

        def ready() -> None:
            link.send(Report(True).encode())

        serve(layers, f"/dev/fd/{fds[0]}", config, on_ready=ready, live_socket=live_socket)
        code = 0
    except BaseException as e:  # noqa: BLE001 - report, never unwind into the launcher
        with contextlib.suppress(Exception):
            link.send(Report(False, f"agentfs daemon failed: {e!r}").encode())
    finally:
        os._exit(code)
