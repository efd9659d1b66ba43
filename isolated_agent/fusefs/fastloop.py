"""A faster wait for the next FUSE request, installed into pyfuse3's session loop.

Why: pyfuse3's worker loop waits for every request with `trio.lowlevel.wait_readable` on the
/dev/fuse fd — an epoll registration, a trip through trio's scheduler and an epoll_wait each
time, about 25 µs per request on this project's benchmark machine, more than agentfs spends
answering most requests. When the daemon is busy the next request is usually there already.

What: before pyfuse3's own wait, poll(2) the fd — without blocking, then busy for at most
`SPIN_SECONDS`, then blocking for at most `SPIN_MS` — and go straight to reading the request
when it is readable. Only when the fd stays quiet does the loop fall back to pyfuse3's wait
(so an idle daemon sleeps in trio, as before). Every `YIELD_EVERY` requests it passes through
a trio checkpoint anyway, so signal handlers (SIGTERM unmounts) and other tasks run even under
a constant stream of requests.

Why busy at all: a request's caller and the daemon usually run on two CPUs, and a CPU with
nothing to run halts. Waking a halted CPU is what a FUSE request costs most of on a virtual
machine — on this project's 2-vCPU benchmark VM a request to an empty C daemon (libfuse, one
thread) costs 63 µs across CPUs and 5 µs on one CPU (benchmarks/fuse_floor_bench.py). A daemon
that keeps polling for a moment after each answer is awake when the next request of a burst
comes: ours then answers in 20–30 µs instead of 70–80. The spin ends `SPIN_SECONDS` after the
last request (an idle daemon costs nothing), and each poll(2) in it is a point where the
scheduler hands the CPU to a task woken there — the caller too: with the daemon and its caller
pinned to one CPU a request still costs 10 µs. After a write of `BULK_WRITE` bytes or more
(`rest`) the daemon sleeps at once: a stream of large writes leaves dirty pages that the
kernel's writeback threads must flush on the same CPUs, and a spinning daemon took their time
(agentfs's sequential 512 MiB write was 1.5–1.8× slower with the spin, with or without a
sched_yield at each turn).

No spin where the kernel wakes a FUSE daemon on its caller's CPU (wakeup.py: the
`fuse.wake_here` parameter some kernels have, this project's benchmark VM's among them).
There a request and its answer are two context switches on one CPU — 11 µs for ours, 7 µs for
the C daemon, against 20 µs spinning (fuse_floor_bench.py) — and a daemon spinning after its
answer only keeps the caller it just woke from that CPU. The setting is read again whenever
the daemon goes idle, so a running daemon follows a change of it.

Valid only with one worker task (`pyfuse3.main(max_tasks=1)`), which is how agentfs runs: the
original wait also serialises several readers with a lock, which one reader does not need.
Installed only when pyfuse3 has the function this replaces (3.2 to 3.5 do); otherwise agentfs
runs on pyfuse3's own loop, correct and slower.
"""

from __future__ import annotations

import logging
import os
import select
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import trio  # type: ignore[import-untyped]

from isolated_agent.fusefs import wakeup

log = logging.getLogger("agentfs")

SPIN_SECONDS = 200e-6
# Microseconds to spin instead (0: none), to measure what the spin gives (benchmarks/).
SPIN_ENV = "AGENTFS_SPIN_US"
SPIN_MS = 2
BULK_WRITE = 64 * 1024
YIELD_EVERY = 128
_FUSE_DEVICE = os.makedev(10, 229)


def fuse_fd() -> int | None:
    """The session's /dev/fuse fd (pyfuse3 does not expose it): the one fd of this process
    open on the FUSE device."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(int(name))
        except (OSError, ValueError):
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == _FUSE_DEVICE:
            found.append(int(name))
    return found[0] if len(found) == 1 else None


def spin_seconds(callers_cpu: bool | None) -> float:
    """How long to poll busily after an answer: `SPIN_ENV` when given, else `SPIN_SECONDS`
    unless the daemon is woken on its caller's CPU (module docstring)."""
    given = os.environ.get(SPIN_ENV, "")
    if given.isdigit():
        return int(given) / 1e6
    return 0.0 if callers_cpu else SPIN_SECONDS


def _machines_spin() -> float:
    """`spin_seconds` for where this machine's kernel wakes FUSE daemons now."""
    return spin_seconds(wakeup.callers_cpu_wakeups())


_rest_next = False


def rest() -> None:
    """No spin before the next request: the one being answered was a bulk write."""
    global _rest_next
    _rest_next = True


def install(fd: int | None = None) -> bool:
    """Install the fast wait for the session that `pyfuse3.init` just opened. Returns whether
    it is installed."""
    original: Callable[[], Awaitable[bool]] | None = getattr(pyfuse3, "_wait_fuse_readable", None)
    if original is None:
        log.info("agentfs: pyfuse3 has no _wait_fuse_readable; using its own loop")
        return False
    session = fd if fd is not None else fuse_fd()
    if session is None:
        return False
    poller = select.poll()
    poller.register(session, select.POLLIN)
    served = 0
    spin_for = _machines_spin()

    def spin() -> bool:
        """Readable within `spin_for`, polled without sleeping (module docstring)."""
        if not spin_for:
            return False
        end = time.perf_counter() + spin_for
        while time.perf_counter() < end:
            if poller.poll(0):
                return True
        return False

    async def wait_fuse_readable() -> Any:
        nonlocal served, spin_for
        global _rest_next
        resting, _rest_next = _rest_next, False
        if poller.poll(0) or (not resting and spin()) or poller.poll(SPIN_MS):
            served += 1
            if served % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            return True
        # Idle: read the machine's setting again, so that a daemon left running follows it
        # once root changes it (`agentctl doctor` says how); a few µs once per burst.
        spin_for = _machines_spin()
        return await original()

    pyfuse3._wait_fuse_readable = wait_fuse_readable  # type: ignore[attr-defined]
    return True
