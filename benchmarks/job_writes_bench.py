"""What many small writes cost a job on each engine: `python -m venv`, natively and under
`agentctl run --engine kernel|fuse|filter` (issue 12: the filter took 16.5 s against agentfs's
4.5 s; the bar is within 2x of agentfs).

    sudo .venv/bin/python benchmarks/job_writes_bench.py --user NAME [--reps 5] [--json]

The filter engine runs no root job, so under root every setup runs as `--user` (default: the
user sudo was called by) for a fair comparison; that user must be able to run the agentctl
given (a venv in a world-readable checkout).

Each repetition runs every setup once, in rotated order, after the quiet gate: a fresh project
directory on the disk (not /tmp, which a job sees private), a fresh store, and the whole
command timed (`agentctl run` start-up included; `-- true` is timed the same way to show it).
Medians, "±" the largest distance of a sample from the median, ratios of medians. See
benchmarks/README-filter.md for figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    QuietGate,
    default_agentctl,
    format_seconds,
    machine_info,
    print_table,
    source_state,
    write_json,
)

SETUPS = ("native", "kernel", "fuse", "filter")
WORKLOADS = {
    "python -m venv": "python3 -m venv venv",
    "create+delete 2000": "mkdir d && for i in $(seq 2000); do echo x > d/f$i; done && rm -r d",
    "run -- true": "true",
}


def as_user(user: str | None, argv: list[str]) -> list[str]:
    if user is None:
        return argv
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv]


def time_once(setup: str, script: str, scratch: str, agentctl: str, user: str | None) -> float:
    """One run of `script` in a fresh project (and store) under `setup`, by `user`."""
    base = tempfile.mkdtemp(dir=scratch)
    project = os.path.join(base, "project")
    os.makedirs(project)
    if user is not None:
        shutil.chown(base, user, user)
        shutil.chown(project, user, user)
    env = {**os.environ, "ISOLATED_AGENT_HOME": os.path.join(base, "store")}
    argv = ["sh", "-c", script]
    if setup != "native":
        argv = [agentctl, "run", "-q", "--engine", setup, "--no-default-allows", "--", *argv]
    try:
        start = time.perf_counter()
        done = subprocess.run(as_user(user, argv), cwd=project, env=env, capture_output=True)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{setup}: {script!r} failed: {done.stderr.decode().strip()}")
        return elapsed
    finally:
        if setup == "filter":
            subprocess.run(as_user(user, [agentctl, "filter", "stop", project]), env=env,
                           capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--scratch-dir", default="/var/tmp", help="where projects are made (disk)")
    p.add_argument("--setup", action="append", choices=SETUPS)
    p.add_argument("--workload", action="append", choices=list(WORKLOADS))
    p.add_argument("--json", nargs="?", const="", metavar="FILE")
    p.add_argument("--user", default=os.environ.get("SUDO_USER"),
                   help="who runs every setup when run as root (default: $SUDO_USER)")
    args = p.parse_args()
    setups = args.setup or list(SETUPS)
    workloads = args.workload or list(WORKLOADS)
    user = args.user if os.geteuid() == 0 else None
    if os.geteuid() == 0 and user is None and "filter" in setups:
        p.error("the filter engine runs no root job: give --user NAME (or leave out the filter)")
    agentctl = default_agentctl()
    gate = QuietGate()
    scratch = tempfile.mkdtemp(prefix="ia-writes-", dir=args.scratch_dir)
    if user is not None:
        shutil.chown(scratch, user, user)
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        for rep in range(args.reps):
            for name in workloads:
                order = setups[rep % len(setups):] + setups[:rep % len(setups)]
                for setup in order:
                    if setup == "native" and name == "run -- true":
                        continue
                    gate.wait()
                    print(f"{name} {rep + 1}/{args.reps} {setup}", file=sys.stderr)
                    seconds = time_once(setup, WORKLOADS[name], scratch, agentctl, user)
                    samples.setdefault((name, setup), []).append(seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def median(name: str, setup: str) -> float | None:
        found = samples.get((name, setup))
        return statistics.median(found) if found else None

    header = ["workload", *setups, "filter / fuse", "fuse / native"]
    rows = []
    for name in workloads:
        row = [name]
        for setup in setups:
            m, found = median(name, setup), samples.get((name, setup), [])
            spread = max(abs(s - m) for s in found) / m if m else 0
            row.append(f"{format_seconds(m)} ±{spread * 100:.0f}%" if m else "")
        for a, b in (("filter", "fuse"), ("fuse", "native")):
            ma, mb = median(name, a), median(name, b)
            row.append(f"{ma / mb:.2f}×" if ma and mb else "")
        rows.append(row)
    print_table(f"job writes, {args.reps} reps (medians)", header, rows, left=1)
    if args.json is not None:
        payload: dict[str, Any] = {
            "machine": machine_info(), "source": source_state(), "quiet_gate": gate.summary(),
            "samples": {f"{n} | {s}": v for (n, s), v in samples.items()},
        }
        print(write_json("job-writes", payload, args.json or None), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
