"""Running agentfs: mount, serve until unmounted or signalled, always leave nothing mounted.

One daemon serves one mount (pyfuse3 keeps one session per process). Its life:

    open the layers (paths, once)  ->  mount (or adopt a /dev/fuse fd)  ->  ready
    ->  serve requests (trio)  ->  SIGTERM/SIGINT/SIGHUP: end the session and unmount;
                                   umount by someone else: the kernel ends the session

`serve` runs it in the calling process (foreground); `start_background` forks a daemon
(`system/daemon.fork_daemon`) that reports it is mounted, or the reason it could not mount,
before its parent returns, as a mount helper must.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3

from isolated_agent.engines.fuse.filesystem import OverlayFileSystem
from isolated_agent.engines.id_swap import IdSwap
from isolated_agent.env.layers import FREEZING
from isolated_agent.fusefs import fastloop
from isolated_agent.fusefs.adapter import Adapter, FuseKernel
from isolated_agent.fusefs.cache import EXCLUSIVE, CacheMode
from isolated_agent.fusefs.replies import handle_free_supported
from isolated_agent.fusefs.serve import hold_stop_signals, run_trio, serve_session
from isolated_agent.overlay.copyup import FaultHook
from isolated_agent.overlay.layers import LayerError, Layers
from isolated_agent.overlay.merge import Overlay
from isolated_agent.protocol import server as control_server
from isolated_agent.protocol.frames import Code, Frame, error_frame
from isolated_agent.protocol.peer import PeerCred
from isolated_agent.system.daemon import DaemonFailed, Reporter, fork_daemon, raise_fd_limit

log = logging.getLogger("agentfs")

# Test hook: "POINT:MARKER[,POINT:MARKER]". An overlay step at POINT ("lookup", "copy_up")
# meeting a name that contains MARKER raises an unexpected exception, to prove that the daemon
# answers EIO, cleans up and goes on serving.
FAULT_ENV = "AGENTFS_FAULTS"
# Set to serve with pyfuse3's own request loop (see fastloop.py), to measure what it costs.
PLAIN_LOOP_ENV = "AGENTFS_PLAIN_LOOP"
# Set to answer OPEN/OPENDIR with file handles even where handle-free mode is possible (see
# filesystem.py): to test and measure that mode, which is also what an unpatched pyfuse3 gets.
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
    live_socket: str | None = None,
) -> None:
    """Mount and serve until the mount ends. `mountpoint` may be `/dev/fd/N`: a /dev/fuse fd
    already mounted by someone else (the job's namespace); then there is nothing to unmount.
    `live_socket`: where to take live checkpoints (FREEZE), for a job's daemon.
    """
    os.umask(0)  # modes arrive from the kernel already masked with the caller's umask
    raise_fd_limit()
    hold_stop_signals()
    overlay = Overlay(layers, fault_hook_from_env())
    handle_free = (config.cache.keep_cache and handle_free_supported()
                   and not os.environ.get(HANDLES_ENV))
    model = OverlayFileSystem(overlay, config.cache, FuseKernel(), handle_free=handle_free,
                              id_swap=config.id_swap)
    operations = Adapter(model)
    log.info("agentfs: %s", "handle-free" if handle_free else "file handles")
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
        tasks = [] if live_socket is None else [
            functools.partial(serve_live_checkpoints, live_socket, model, config.upper)]
        run_trio(serve_session, operations, None if given.isdigit() else mountpoint, tasks)
    finally:
        if live_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(live_socket)
        operations.close()
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
        overlay.close()


async def serve_live_checkpoints(path: str, model: OverlayFileSystem, upper: str) -> None:
    """The control port of a job's agentfs daemon: FREEZE, a live checkpoint (env/stack.py).
    The handler runs between two FUSE requests (one trio thread; it never awaits), so the job
    sees no moment in which its files are half frozen."""

    async def handle(frame: Frame, peer: PeerCred) -> Frame:
        if frame.code is not Code.FREEZE:
            return error_frame(f"the agentfs daemon does not take {frame.code.name}")
        began = time.perf_counter()
        freeze_upper(model, upper, str(frame.body["into"]))
        return Frame(Code.ACK, {"paused_ms": (time.perf_counter() - began) * 1000})

    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        await control_server.serve(path, handle)
    except OSError as e:
        log.warning("agentfs: no live checkpoints for this job: %s", e)


def freeze_upper(model: OverlayFileSystem, upper: str, into: str) -> None:
    """Rename the upper to `into` (a pending layer's root, env/layers.py) and go on with an
    empty upper in its place, with the same owner and bits."""
    if not os.path.basename(os.path.dirname(os.path.dirname(into))).startswith(FREEZING):
        raise ValueError(f"{into} is not the root of a layer being frozen")
    st = os.stat(upper)
    os.rename(upper, into)
    os.mkdir(upper, 0o700)
    os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, stat.S_IMODE(st.st_mode))
    model.freeze_upper(os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))


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
    live_socket: str | None = None,
) -> int:
    """Fork a daemon that mounts and serves; return its pid once the mount is in place.
    Raises MountFailed (the daemon is gone by then) when it cannot mount. The daemon keeps
    every fd of the caller it was forked with (an env lock, for one); it works from "/", so
    every path is made absolute first."""
    config = dataclasses.replace(
        config, lowers=[os.path.abspath(p) for p in config.lowers],
        upper=os.path.abspath(config.upper), work=os.path.abspath(config.work))
    mountpoint = os.path.abspath(mountpoint)

    def daemon(reporter: Reporter) -> int:
        setup_logging(debug)
        serve(open_layers(config), mountpoint, config, on_ready=reporter.ready,
              live_socket=live_socket)
        return 0

    try:
        pid, _ = fork_daemon(daemon, log_path, "agentfs", expected=(MountFailed,))
    except DaemonFailed as e:
        raise MountFailed(str(e)) from None
    return pid
