"""The cost of one FUSE request on this machine, with no file system work in it: the floor
under every FUSE daemon's figures (benchmarks/README-guard.md, README-filter.md).

    sudo .venv/bin/python benchmarks/fuse_floor_bench.py            # 5 rounds of 20 000 stats
    sudo .venv/bin/python benchmarks/fuse_floor_bench.py --json

Ways to answer `stat("f")`, timed in the same run, interleaved:

    native            a file on the work directory's filesystem (no FUSE at all)
    C                 floor/fuse_floor.c: libfuse's low-level API, one thread, attributes never
                      cached, an empty handler — every stat is one GETATTR round trip, and
                      nothing else; placed by the scheduler
    C, one CPU        the same, the daemon and the caller pinned to one CPU
    C, two CPUs       the same, pinned to two different CPUs
    python            the same file system as a model behind this project's one FUSE layer
                      (the pyfuse3 adapter, fastloop's wait, one trio worker: how agentfs, the
                      filter and the guard are served), its handler as empty
    python, no spin   the same with fastloop's spin off (AGENTFS_SPIN_US=0)
    …, woken here     where the kernel has `fuse.wake_here` (fusefs/wakeup.py): the same
                      daemons while the kernel wakes a daemon on its caller's CPU (the
                      setting is switched for these rows' rounds and put back afterwards)

The C figure is the protocol's floor here: the kernel, two context switches and libfuse; the
pinned pair shows how much of it is one CPU waking the other (on a virtual machine, a halted
vCPU woken by the hypervisor). The python figure is the floor of every daemon of ours. A
workload that needs R requests the caller waits for cannot take less than R times the floor.
Needs gcc and libfuse3-dev (for the C daemon); runs as root (it mounts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    BenchError,
    machine_info,
    print_table,
    run_script,
    source_state,
    write_json,
)

from isolated_agent.fusefs import wakeup  # noqa: E402
from isolated_agent.fusefs.fastloop import SPIN_ENV, SPIN_SECONDS  # noqa: E402

SPIN = {SPIN_ENV: str(round(SPIN_SECONDS * 1e6))}  # whatever the machine's wake placement
NO_SPIN = {SPIN_ENV: "0"}

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "floor", "fuse_floor.c")


class Daemon(NamedTuple):
    """One way to answer: the daemon's command (without its mount point) and environment,
    the CPUs the daemon and its caller are pinned to (None: wherever the scheduler puts
    them), and whether the kernel wakes the daemon on its caller's CPU meanwhile."""

    command: list[str]
    environ: dict[str, str]
    daemon_cpu: int | None = None
    caller_cpu: int | None = None
    woken_here: bool = False


NATIVE = Daemon([], {})  # the caller alone: no daemon


def build_c_daemon(workdir: str) -> str:
    if shutil.which("gcc") is None or shutil.which("pkg-config") is None:
        raise BenchError("needs gcc and pkg-config: apt-get install gcc pkg-config libfuse3-dev")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True,
                           text=True)
    if flags.returncode != 0:
        raise BenchError("libfuse3's headers are missing: apt-get install libfuse3-dev")
    binary = os.path.join(workdir, "fuse_floor")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", binary, SOURCE, *flags.stdout.split()],
                   check=True)
    return binary


def serve_python(mountpoint: str) -> None:
    """The python daemon (run in a child process by `--serve-python`)."""
    import pyfuse3

    from isolated_agent.fusefs import fastloop
    from isolated_agent.fusefs.adapter import Adapter
    from isolated_agent.fusefs.model import Attributes, Caller, Policy
    from isolated_agent.fusefs.serve import run_trio, serve_session

    root, file = os.stat(HERE), os.stat(SOURCE)  # any directory and regular file will do

    class OneFile:
        """The C daemon's file system as a model: one file, attributes never cached."""

        policy = Policy()

        def lookup(self, parent: int, name: bytes, caller: Caller) -> Attributes:
            if parent != 1 or name != b"f":
                raise FileNotFoundError(2, "no such file")
            return Attributes(2, file, entry_timeout=86400.0, attr_timeout=0.0)

        def forget(self, inode: int, count: int) -> bool:
            return False

        def getattr(self, inode: int, caller: Caller) -> Attributes:
            return Attributes(inode, root if inode == 1 else file)

        def close(self) -> None:
            pass

    adapter = Adapter(OneFile())  # type: ignore[arg-type]  # the two requests a stat needs
    pyfuse3.init(adapter, mountpoint, {"fsname=fuse-floor"})
    fastloop.install()
    print("ready", flush=True)
    try:
        run_trio(serve_session, adapter)
    finally:
        pyfuse3.close(unmount=True)


def start(argv: list[str], environ: dict[str, str], cpu: int | None) -> subprocess.Popen[str]:
    pin = None if cpu is None else (lambda: os.sched_setaffinity(0, [cpu]))
    daemon = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **environ}, preexec_fn=pin)
    assert daemon.stdout is not None
    if daemon.stdout.readline().strip() != "ready":
        daemon.kill()
        raise BenchError(f"{argv[0]} did not mount")
    return daemon


def stop(daemon: subprocess.Popen[str], mountpoint: str) -> None:
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(timeout=10)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
    subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def set_wake_here(on: bool) -> None:
    with open(wakeup.WAKE_HERE, "w") as f:
        f.write("Y" if on else "N")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_stats(path: str, count: int) -> float:
    """Seconds per stat(path), over `count` stats (after a few untimed ones)."""
    for _ in range(100):
        os.stat(path)
    start = time.perf_counter()
    for _ in range(count):
        os.stat(path)
    return (time.perf_counter() - start) / count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stats", type=int, default=20000, help="stats per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", nargs="?", const="", metavar="FILE")
    p.add_argument("--serve-python", metavar="MOUNTPOINT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_python:
        serve_python(args.serve_python)
        return 0
    if os.geteuid() != 0:
        print("fuse_floor_bench: run as root (it mounts)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fuse-floor-") as workdir:
        binary = build_c_daemon(workdir)
        native = os.path.join(workdir, "native")
        os.mkdir(native)
        with open(os.path.join(native, "f"), "wb") as f:
            f.write(b"\0" * 4096)
        python = [sys.executable, os.path.abspath(__file__), "--serve-python"]
        cpus = sorted(os.sched_getaffinity(0))
        setups: dict[str, Daemon] = {
            "C": Daemon([binary], {}),
            "python": Daemon(python, SPIN),
            "python, no spin": Daemon(python, NO_SPIN),
        }
        if len(cpus) >= 2:
            setups["C, one CPU"] = Daemon([binary], {}, cpus[0], cpus[0])
            setups["C, two CPUs"] = Daemon([binary], {}, cpus[0], cpus[1])
        machines_wake_here = wakeup.callers_cpu_wakeups()
        if machines_wake_here is not None:
            setups["C, woken here"] = Daemon([binary], {}, woken_here=True)
            setups["python, woken here"] = Daemon(python, SPIN, woken_here=True)
            setups["python, no spin, woken here"] = Daemon(python, NO_SPIN, woken_here=True)
        mountpoints = {name: os.path.join(workdir, f"m{number}")
                       for number, name in enumerate(setups)}
        samples: dict[str, list[float]] = {"native": [], **{name: [] for name in setups}}
        daemon_cpu: dict[str, list[float]] = {name: [] for name in setups}
        daemons: dict[str, subprocess.Popen[str]] = {}
        try:
            for name, setup in setups.items():
                os.mkdir(mountpoints[name])
                daemons[name] = start([*setup.command, mountpoints[name]], setup.environ,
                                      setup.daemon_cpu)
            paths = {"native": os.path.join(native, "f"),
                     **{name: os.path.join(mountpoint, "f")
                        for name, mountpoint in mountpoints.items()}}
            names = list(paths)
            for round_number in range(args.rounds):
                turn = round_number % len(names)
                for name in names[turn:] + names[:turn]:
                    setup = setups.get(name, NATIVE)
                    caller_cpu = setup.caller_cpu
                    os.sched_setaffinity(0, cpus if caller_cpu is None else [caller_cpu])
                    if machines_wake_here is not None:
                        set_wake_here(setup.woken_here)
                    before = cpu_seconds(daemons[name].pid) if name in daemons else 0.0
                    samples[name].append(time_stats(paths[name], args.stats))
                    if name in daemons:
                        daemon_cpu[name].append(
                            (cpu_seconds(daemons[name].pid) - before) / (args.stats + 100))
                os.sched_setaffinity(0, cpus)
        finally:
            os.sched_setaffinity(0, cpus)
            if machines_wake_here is not None:
                set_wake_here(machines_wake_here)
            for name, daemon in daemons.items():
                stop(daemon, mountpoints[name])
    medians = {name: statistics.median(values) for name, values in samples.items()}
    cpu = {name: statistics.median(values) for name, values in daemon_cpu.items()}
    rows = [[name, f"{medians[name] * 1e6:.1f} µs",
             f"{min(samples[name]) * 1e6:.1f}–{max(samples[name]) * 1e6:.1f} µs",
             "" if name == "native" else f"{(medians[name] - medians['native']) * 1e6:.1f} µs",
             f"{cpu[name] * 1e6:.1f} µs" if name in cpu else ""]
            for name in samples]
    print_table(f"stat(2) of one file, {args.stats} per round, median of {args.rounds} rounds",
                ["answered by", "per stat", "range", "one request (beyond native)",
                 "daemon CPU per request"], rows)
    if args.json is not None:
        payload: dict[str, Any] = {
            "benchmark": "fuse-floor", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": machine_info(), "source": source_state(), "stats": args.stats,
            "seconds_per_stat": samples, "median": medians,
            "daemon_cpu_seconds_per_request": daemon_cpu,
        }
        print(f"JSON: {write_json('fuse-floor', payload, args.json or None)}")
    return 0


if __name__ == "__main__":
    run_script(main, "fuse_floor_bench")
