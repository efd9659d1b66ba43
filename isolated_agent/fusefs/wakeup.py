"""Where the kernel wakes a FUSE daemon for a request — most of what a request costs on a
virtual machine.

A process that asks a FUSE file system something sleeps until the daemon answers; the daemon
sleeps until asked. When the kernel wakes the daemon on another CPU and that CPU has halted,
the hypervisor must wake it: on this project's 2-vCPU benchmark VM one request to an empty C
daemon then costs about 60 µs, and 6–8 µs when the daemon runs on the caller's CPU
(benchmarks/fuse_floor_bench.py). Some kernels let root choose the latter for every FUSE
request: the `fuse.wake_here` parameter (not in mainline Linux). The daemons read it to decide
whether to keep their CPU awake after an answer (fastloop.py); `agentctl doctor` reports it.
"""

from __future__ import annotations

WAKE_HERE = "/sys/module/fuse/parameters/wake_here"
ENABLE = f"echo Y | sudo tee {WAKE_HERE}"  # until reboot; at boot: fuse.wake_here=Y


def callers_cpu_wakeups(parameter: str = WAKE_HERE) -> bool | None:
    """Whether the kernel wakes a FUSE daemon on its caller's CPU; None when this kernel has
    no such setting."""
    try:
        with open(parameter) as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return None
