"""Running agentfs: mount, serve until unmounted or signalled, always leave nothing mounted.

One daemon serves one mount (pyfuse3 keeps one session per process). Its life:

    open the layers (paths, once)  ->  mount (or adopt a /dev/fuse fd)  ->  ready
    ->  serve requests (trio)  ->  SIGTERM/SIGINT/SIGHUP: end the session and unmount;
                                   umount by someone else: the kernel ends the session

`serve` runs it in the calling process (foreground); `start_background` forks a daemon that
reports "mounted" or the reason it could not mount before its parent returns, as a mount
helper must.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio  # type: ignore[import-untyped]

from isolated_agent.engines.fuse import fastloop
from isolated_agent.engines.fuse.cache import EXCLUSIVE, CacheMode
from isolated_agent.engines.fuse.mount import raise_readahead_when_initialized
from isolated_agent.engines.fuse.operations import Operations
from isolated_agent.engines.id_swap import IdSwap
from isolated_agent.overlay.copyup import FaultHook
from isolated_agent.overlay.layers import LayerError, Layers
from isolated_agent.overlay.merge import Overlay

log = logging.getLogger("agentfs")

# Test hook: "POINT:MARKER[,POINT:MARKER]". An overlay step at POINT ("lookup", "copy_up")
# meeting a name that contains MARKER raises an unexpected exception, to prove that the daemon
# answers EIO, cleans up and goes on serving.
FAULT_ENV = "AGENTFS_FAULTS"
# Where to write a cProfile of the daemon when its mount ends (for benchmarks/README-agentfs.md).
PROFILE_ENV = "AGENTFS_PROFILE"
# Set to serve with pyfuse3's own request loop (see fastloop.py), to measure what it costs.
PLAIN_LOOP_ENV = "AGENTFS_PLAIN_LOOP"
# Set to answer OPEN/OPENDIR with file handles even where handle-free mode is possible (see
# operations.py): to test and measure that mode, which is also what an unpatched pyfuse3 gets.
HANDLES_ENV = "AGENTFS_HANDLES"


class MountFailed(Exception):
    """agentfs could not mount; the message says why in one line."""


@dataclass
class MountConfig:
    lowers: list[str]
    upper: str
    work: str
    allow_other: bool = False
    cache: CacheMode = EXCLUSIVE
    fsname: str = "agentfs"
    fuse_options: list[str] = field(default_factory=list)  # passed to libfuse as they are
    id_swap: IdSwap | None = None  # a root job's view of another user's tree (id_swap.py)

    def libfuse_options(self) -> set[str]:
        # default_permissions always: the daemon acts with its own (often root) rights, so
        # the kernel must check the caller's against the mode bits.
        options = {"default_permissions", f"fsname={self.fsname}", "subtype=agentfs"}
        if self.allow_other:
            options.add("allow_other")
        options.update(self.fuse_options)
        return options


def fault_hook_from_env() -> FaultHook | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    rules = []
    for item in spec.split(","):
        point, _, marker = item.partition(":")
        rules.append((point, os.fsencode(marker)))

    def fault(point: str, name: bytes) -> None:
        for wanted, marker in rules:
            if wanted == point and marker in name:
                raise RuntimeError(f"injected fault at {point} for {name!r}")

    return fault


def open_layers(config: MountConfig) -> Layers:
    try:
        return Layers.open(config.upper, config.work, config.lowers)
    except LayerError as e:
        raise MountFailed(str(e)) from None


def serve(
    layers: Layers,
    mountpoint: str,
    config: MountConfig,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Mount and serve until the mount ends. `mountpoint` may be `/dev/fd/N`: a /dev/fuse fd
    already mounted by someone else (the job's namespace); then there is nothing to unmount.
    """
    os.umask(0)  # modes arrive from the kernel already masked with the caller's umask
    raise_fd_limit()
    for signum in _STOP_SIGNALS:  # until trio listens: remembered, not fatal (see below)
        signal.signal(signum, _remember_signal)
    overlay = Overlay(layers, fault_hook_from_env())
    operations = Operations(overlay, config.cache,
                            handle_free=False if os.environ.get(HANDLES_ENV) else None,
                            id_swap=config.id_swap)
    log.info("agentfs: %s", "handle-free" if operations.handle_free else "file handles")
    try:
        pyfuse3.init(operations, mountpoint, config.libfuse_options())
    except RuntimeError as e:
        overlay.close()
        raise MountFailed(f"cannot mount agentfs at {mountpoint}: {e}") from None
    try:
        given = mountpoint.removeprefix("/dev/fd/")
        if not os.environ.get(PLAIN_LOOP_ENV):
            fastloop.install(int(given) if given.isdigit() else None)
        if on_ready is not None:
            on_ready()
        # The read-ahead is raised where the mount is at a path of this namespace (not in the
        # job's, whose sysfs is not ours to write).
        run_trio(_serve_until_signalled, operations, None if given.isdigit() else mountpoint)
    finally:
        operations.release_all()
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
        overlay.close()


def run_trio(main: Callable[..., Awaitable[object]], *args: object) -> None:
    """trio.run(main, *args): a daemon's whole life. Under cProfile when $AGENTFS_PROFILE names
    a file, written when it returns (benchmarks/README-agentfs.md)."""
    profile_path = os.environ.get(PROFILE_ENV)
    if not profile_path:
        trio.run(main, *args)
        return
    import cProfile

    profiler = cProfile.Profile()
    try:
        profiler.runcall(trio.run, main, *args)
    finally:
        profiler.dump_stats(profile_path)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_early_signals: list[int] = []


def _remember_signal(signum: int, frame: object) -> None:
    """A stop signal that came while mounting, before trio listened: the default action
    would kill the daemon and leave the mount dead (ENOTCONN); stop cleanly instead."""
    _early_signals.append(signum)


async def _serve_until_signalled(operations: Operations, readahead_path: str | None) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(terminate_on_signal)
        if readahead_path is not None:
            nursery.start_soon(raise_readahead_when_initialized, operations.initialized,
                               readahead_path)
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()


async def terminate_on_signal(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        task_status.started()
        if _early_signals:
            log.info("agentfs: signal %d while mounting, unmounting", _early_signals[0])
            pyfuse3.terminate()
            return
        async for signum in signals:
            log.info("agentfs: signal %d, unmounting", signum)
            pyfuse3.terminate()
            return


def raise_fd_limit() -> None:
    """One O_PATH fd per node the kernel holds: allow as many as the system lets us."""
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


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        stream=sys.stderr,
        format="agentfs[%(process)d] %(asctime)s %(message)s",
    )


def start_background(
    config: MountConfig,
    mountpoint: str,
    log_path: str | None = None,
    debug: bool = False,
) -> int:
    """Fork a daemon that mounts and serves; return its pid once the mount is in place.
    Raises MountFailed (the daemon is gone by then) when it cannot mount. The daemon keeps
    every fd of the caller it was forked with (an env lock, for one)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        try:
            os.close(read_end)
            os.setsid()
            detach_stdio(log_path)
            setup_logging(debug)
            layers = open_layers(config)

            def ready() -> None:
                os.write(write_end, b"ok\n")
                os.close(write_end)

            serve(layers, mountpoint, config, on_ready=ready)
            code = 0
        except BaseException as e:  # noqa: BLE001 - report, never unwind into the caller
            message = str(e) if isinstance(e, MountFailed) else f"agentfs failed: {e!r}"
            with contextlib.suppress(OSError):
                os.write(write_end, ("error " + message.replace("\n", " ") + "\n").encode())
            with contextlib.suppress(Exception):
                log.exception("agentfs: daemon ended with an error")
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        answer = reader.read().decode(errors="replace").strip()
    if answer.startswith("ok"):
        return pid
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    raise MountFailed(answer.removeprefix("error ").strip() or "the agentfs daemon died")


def detach_process(log_path: str | None) -> None:
    """What a daemon started on demand does first: a session of its own (no controlling
    terminal, no signal meant for its caller's process group), "/" as its working directory
    (its caller's may be inside a guarded or mounted directory: held there, the daemon would
    reach the files below a guard's mount and keep a mount busy), stdio to /dev/null or to
    `log_path`."""
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
