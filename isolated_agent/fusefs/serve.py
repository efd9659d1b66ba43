"""The serve loop every FUSE daemon of ours runs: trio, one worker, stopped by a signal.

    hold_stop_signals()   before mounting: a SIGTERM/SIGINT/SIGHUP that comes while mounting is
                          remembered, not fatal (dying then would leave a dead mount, ENOTCONN)
    run_trio(main, ...)   a daemon's whole life, under cProfile when $AGENTFS_PROFILE names a file
                          (and its requests counted when $AGENTFS_REQUESTS does: accounting.py)
    serve_session(...)    serve the mounted session until it ends, beside the daemon's own tasks
    terminate_on_signal   the task that ends the FUSE session on a stop signal
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pyfuse3
import trio  # type: ignore[import-untyped]

from isolated_agent.fusefs import accounting
from isolated_agent.fusefs.adapter import Adapter
from isolated_agent.fusefs.mount import raise_readahead_when_initialized

log = logging.getLogger("agentfs")

# Where to write a cProfile of the daemon when its mount ends (for benchmarks/README-agentfs.md).
PROFILE_ENV = "AGENTFS_PROFILE"

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_early_signals: list[int] = []


def hold_stop_signals() -> None:
    """Until trio listens, remember a stop signal instead of dying of it: the default action
    would kill the daemon while it mounts and leave the mount dead (ENOTCONN)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _remember_signal)
    if accounting.enabled():  # a benchmark's early "write your counts" must not kill it
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _remember_signal(signum: int, frame: object) -> None:
    _early_signals.append(signum)


def run_trio(main: Callable[..., Awaitable[object]], *args: object) -> None:
    """trio.run(main, *args): a daemon's whole life. Under cProfile when $AGENTFS_PROFILE names
    a file, written when it returns (benchmarks/README-agentfs.md)."""
    try:
        _run_trio(main, *args)
    finally:
        accounting.write()


def _run_trio(main: Callable[..., Awaitable[object]], *args: object) -> None:
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


async def terminate_on_signal(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """End the FUSE session (pyfuse3.main returns, the daemon unmounts) on the first stop
    signal — also on one that came while mounting (`hold_stop_signals`). With request
    accounting on, SIGUSR2 writes the counts so far (accounting.py)."""
    accounting_signals = (signal.SIGUSR2,) if accounting.enabled() else ()
    with trio.open_signal_receiver(*STOP_SIGNALS, *accounting_signals) as signals:
        task_status.started()
        if _early_signals:
            log.info("signal %d while mounting, unmounting", _early_signals[0])
            pyfuse3.terminate()
            return
        async for signum in signals:
            if signum in accounting_signals:
                accounting.write()
                continue
            log.info("signal %d, unmounting", signum)
            pyfuse3.terminate()
            return


async def serve_session(adapter: Adapter, readahead_path: str | None = None,
                        tasks: Sequence[Callable[[], Awaitable[object]]] = (),
                        on_ready: Callable[[], None] | None = None) -> None:
    """Serve the session `pyfuse3.init` opened until it ends (unmounted, or a stop signal), with
    one worker task — a model sees one request at a time (adapter.py), and fastloop.py's wait
    needs one reader — beside the daemon's own `tasks`, which end with it. The read-ahead is
    raised once FUSE_INIT is answered where the mount is at a path of this namespace
    (`readahead_path`; not in a job's, whose sysfs is not ours to write). `on_ready` runs once
    stop signals are handled."""
    async with trio.open_nursery() as nursery:
        await nursery.start(terminate_on_signal)
        if readahead_path is not None:
            nursery.start_soon(raise_readahead_when_initialized, adapter.initialized,
                               readahead_path)
        for task in tasks:
            nursery.start_soon(task)
        if on_ready is not None:
            on_ready()
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()
