"""The core benchmark: native disk vs a hand-mounted kernel overlayfs vs `agentctl run`
(kernel engine) on a realistic tree, warm and cold, plus `agentctl run -- true` start-up.

    sudo .venv/bin/python benchmarks/core_bench.py            # Django 5.1 sdist
    sudo .venv/bin/python benchmarks/core_bench.py --tree DIR # any other tree

Runs as root (drop_caches, mounts). See benchmarks/README.md for the method and the results.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (  # noqa: E402
    DEFAULT_CACHE_DIR,
    AgentctlSetup,
    BenchContext,
    BenchError,
    KernelOverlaySetup,
    Measurement,
    NativeSetup,
    QuietGate,
    Setup,
    filesystem_of,
    format_seconds,
    inconsistent_checks,
    machine_info,
    overlay_options,
    print_table,
    reexec_in_private_mount_namespace,
    remove,
    results_table,
    run_matrix,
    run_script,
    sh,
    source_state,
    time_command,
    work_directory,
    write_json,
)
from workloads import WORKLOADS  # noqa: E402

DJANGO_VERSION = "5.1"
TARGET_RATIO = 1.05  # agentctl vs the hand-mounted overlay, per workload
TARGET_STARTUP = 0.150  # seconds, `agentctl run -q -- true`


def django_tree(cache_dir: str) -> str:
    """The extracted Django sdist (about 6 800 files), downloaded once into the cache dir."""
    tree = os.path.join(cache_dir, "trees", f"Django-{DJANGO_VERSION}")
    if os.path.isdir(tree):
        return tree
    download = os.path.join(cache_dir, "dl")
    archives = glob.glob(os.path.join(download, f"[Dd]jango-{DJANGO_VERSION}.tar.gz"))
    if not archives:
        print(f"downloading the Django {DJANGO_VERSION} sdist into {download} ...", file=sys.stderr)
        sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
            f"django=={DJANGO_VERSION}", "-d", download])
        archives = glob.glob(os.path.join(download, f"[Dd]jango-{DJANGO_VERSION}.tar.gz"))
    if not archives:
        raise BenchError(f"pip download left no Django-{DJANGO_VERSION}.tar.gz in {download}")
    partial = tree + ".partial"
    remove(partial)
    os.makedirs(partial)
    sh(["tar", "-xzf", archives[0], "-C", partial, "--strip-components=1", "--no-same-owner"])
    os.rename(partial, tree)
    return tree


def tree_stats(tree: str) -> dict[str, int]:
    files = dirs = size = 0
    for root, dirnames, filenames in os.walk(tree):
        if ".git" in dirnames:
            dirnames.remove(".git")
        dirs += len(dirnames)
        for name in filenames:
            files += 1
            size += os.lstat(os.path.join(root, name)).st_size
    return {"files": files, "dirs": dirs, "bytes": size}


# -- start-up -----------------------------------------------------------------------------------

# Run under the agentctl interpreter: time the phases of `agentctl run -q -- true` by wrapping
# the launcher's steps; every process of the job writes `@ts NAME MONOTONIC` on stderr (the
# wrappers survive fork, and CLOCK_MONOTONIC is one clock for every pid namespace).
PHASE_DRIVER = r"""
import os, sys, time
def ts(name):
    os.write(2, f"@ts {name} {time.monotonic()}\n".encode())
ts("main")
import isolated_agent.cli.main as cli_main
from isolated_agent.jobs import launcher, run as run_mod
from isolated_agent.system.cgroup import JobCgroup
ts("imported")
def wrap(owner, attr, name):
    inner = getattr(owner, attr)
    def wrapper(*args, **kwargs):
        ts(name + ".start")
        try:
            return inner(*args, **kwargs)
        finally:
            ts(name + ".end")
    setattr(owner, attr, wrapper)
wrap(run_mod, "run_job", "run_job")
wrap(launcher.libc, "unshare", "unshare")
wrap(launcher, "build_view", "build_view")
wrap(JobCgroup, "add", "cgroup_add")
wrap(JobCgroup, "kill_and_remove", "cgroup_cleanup")
real_exec = os.execvpe
def execvpe(*args):
    ts("exec")
    return real_exec(*args)
os.execvpe = execvpe
code = cli_main.invoke(["run", "-q", "--", "true"])
ts("done")
sys.exit(code)
"""

# (label, start event, end event); "spawn" and "exit" are taken by the benchmark itself.
PHASES = [
    ("interpreter start-up (python + site)", "spawn", "main"),
    ("import the CLI and the run path (cli.main, jobs.run, launcher)", "main", "imported"),
    ("CLI: parse, load the run command, store, env lookup, lock", "imported", "run_job.start"),
    ("launcher: cgroup, fork, unshare", "run_job.start", "unshare.end"),
    ("  of which moving it into its cgroup (cgroup.procs)", "cgroup_add.start", "cgroup_add.end"),
    ("  of which unshare(2)", "unshare.start", "unshare.end"),
    ("fork pid 1, build the view (mounts, pivot_root)", "unshare.end", "build_view.end"),
    ("fork command, drop privileges, release, exec", "build_view.end", "exec"),
    ("`true` runs and exits, job torn down", "exec", "run_job.end"),
    ("  of which cgroup kill + rmdir", "cgroup_cleanup.start", "cgroup_cleanup.end"),
    ("interpreter exit", "run_job.end", "exit"),
]


def startup_phases(python: str, cwd: str, env: dict[str, str], runs: int,
                   gate: QuietGate) -> list[dict[str, Any]]:
    samples: dict[str, list[float]] = {label: [] for label, _, _ in PHASES}
    totals = []
    for i in range(runs + 2):
        if i >= 2:
            gate.wait()
        spawn = time.monotonic()
        done = subprocess.run([python, "-c", PHASE_DRIVER], cwd=cwd, env=env,
                              capture_output=True, text=True)
        end = time.monotonic()
        if done.returncode != 0:
            raise BenchError(f"start-up phase driver failed: {done.stderr.strip()}")
        events = {"spawn": spawn, "exit": end}
        for line in done.stderr.splitlines():
            match = re.fullmatch(r"@ts (\S+) ([0-9.]+)", line)
            if match:
                events[match.group(1)] = float(match.group(2))
        if i < 2:
            continue  # warm-up
        totals.append(end - spawn)
        for label, a, b in PHASES:
            if a in events and b in events:
                samples[label].append(events[b] - events[a])
    rows = [{"phase": label, "median": statistics.median(v)}
            for label, v in samples.items() if v]
    rows.append({"phase": "total (instrumented)", "median": statistics.median(totals)})
    return rows


RUN_TRUE_IN_PYTHON = ["-c", "from isolated_agent.cli.main import main; main()",
                      "run", "-q", "--", "true"]
RUN_PATH_IMPORTS = "import isolated_agent.cli.main, isolated_agent.cli.run_cmd"


def importtime_top(python: str, cwd: str, env: dict[str, str],
                   count: int = 12) -> list[dict[str, Any]]:
    """The modules with the largest cumulative import time in `agentctl run -q -- true`."""
    runs = []
    for _ in range(5):
        done = subprocess.run([python, "-X", "importtime", *RUN_TRUE_IN_PYTHON], cwd=cwd,
                              env=env, capture_output=True, text=True)
        table: dict[str, tuple[int, int, int]] = {}
        for line in done.stderr.splitlines():
            match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
            if match:
                depth = len(match.group(3)) // 2
                table[match.group(4)] = (int(match.group(1)), int(match.group(2)), depth)
        runs.append(table)
    names = set.intersection(*(set(t) for t in runs))
    rows: list[dict[str, Any]] = []
    for name in names:
        self_us = statistics.median(t[name][0] for t in runs)
        cumulative = statistics.median(t[name][1] for t in runs)
        rows.append({"module": name, "self_ms": self_us / 1000, "cumulative_ms": cumulative / 1000,
                     "depth": runs[0][name][2]})
    rows.sort(key=lambda r: float(r["cumulative_ms"]), reverse=True)
    return rows[:count]


def bytecode_environ(env: dict[str, str], cache_dir: str) -> dict[str, str]:
    """`env` with Python's bytecode cache on and kept outside the repository. The dev venv
    here is an editable install and this machine sets PYTHONDONTWRITEBYTECODE=1, so by default
    every agentctl start compiles isolated_agent from source, which an installed package never
    does."""
    cached = {**env, "PYTHONPYCACHEPREFIX": os.path.join(cache_dir, "pycache")}
    cached.pop("PYTHONDONTWRITEBYTECODE", None)
    return cached


def measure_startup(ctx: BenchContext, agentctl: str, runs: int, cache_dir: str) -> dict[str, Any]:
    """Wall time of `agentctl run -q -- true` in the tree's directory (its env already
    exists, as for every run after the first), what it is made of, and baselines. The commands
    take turns, run after run, so that a change in the machine's load hits all of them."""
    setup = AgentctlSetup(agentctl, name="startup")
    setup.start(ctx)
    try:
        env = setup.environ()
        cached = bytecode_environ(env, cache_dir)
        python = _shebang_python(agentctl)
        cwd = ctx.lower
        subprocess.run([agentctl, "run", "-q", "--env", setup.env_name, "--", "true"], cwd=cwd,
                       env=env, check=True)
        upper, work = (os.path.join(ctx.workdir, "startup-overlay", p) for p in ("upper", "work"))
        os.makedirs(upper)
        os.makedirs(work)
        options = overlay_options(ctx.lower, upper, work, ["userxattr", "nosuid", "nodev"])
        run_true = [agentctl, "run", "-q", "--", "true"]
        commands: list[tuple[str, list[str], dict[str, str]]] = [
            ("agentctl run -q -- true", run_true, env),
            ("agentctl run -q -- true, bytecode cached", run_true, cached),
            ("python -c pass", [python, "-c", "pass"], env),
            ("python -S -c pass (no site, no .pth files)", [python, "-S", "-c", "pass"], env),
            ("python -c 'import ...cli.main, ...cli.run_cmd' (the run path's imports)",
             [python, "-c", RUN_PATH_IMPORTS], env),
            ("python -c 'import ...cli.main, ...cli.run_cmd', bytecode cached",
             [python, "-c", RUN_PATH_IMPORTS], cached),
            ("agentctl --version", [agentctl, "--version"], env),
            ("unshare -m -p -i -f --mount-proc true",
             ["unshare", "-m", "-p", "-i", "-f", "--mount-proc", "true"], env),
            ("unshare -m + overlay mount by hand + true",
             ["unshare", "-m", "--propagation", "private", "--", "/bin/sh", "-c",
              'mount -t overlay overlay -o "$1" "$2" && exec true', "sh", options, ctx.lower],
             env),
        ]
        samples: dict[str, list[float]] = {label: [] for label, _, _ in commands}
        for i in range(runs + 3):
            for label, argv, environ in commands:
                if i >= 3:
                    ctx.gate.wait()
                elapsed = time_command(argv, 1, env=environ, cwd=cwd, warmup=0)[0]
                if i >= 3:
                    samples[label].append(elapsed)
        walls = {label: {"median": statistics.median(v), "min": min(v), "max": max(v),
                         "samples": v} for label, v in samples.items()}
        return {
            "runs": runs,
            "wall": walls,
            "phases": startup_phases(python, cwd, env, runs, ctx.gate),
            "phases_bytecode_cached": startup_phases(python, cwd, cached, runs, ctx.gate),
            "imports": importtime_top(python, cwd, cached),
        }
    finally:
        setup.stop()
        remove(os.path.join(ctx.workdir, "startup-overlay"))


def _shebang_python(script: str) -> str:
    with open(script, "rb") as f:
        first = f.readline().decode().strip()
    return first[2:].split()[0] if first.startswith("#!") else sys.executable


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tree", help="benchmark this tree instead of the Django sdist")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                   help="downloads, extracted trees and scratch space (default: %(default)s)")
    p.add_argument("--scratch-dir", metavar="DIR",
                   help="run in DIR's filesystem instead of a fresh loop-mounted ext4 image")
    p.add_argument("--scratch-size", default="4G", help="size of the scratch image (4G)")
    p.add_argument("--warm", type=int, default=5, help="repetitions with a warm cache (5)")
    p.add_argument("--warm-repeat", type=int, default=3,
                   help="timed runs per warm start, for workloads that leave the tree "
                        "unchanged (3)")
    p.add_argument("--cold", type=int, default=5, help="repetitions with a cold cache (5)")
    p.add_argument("--startup-runs", type=int, default=30,
                   help="runs of each start-up measurement (30)")
    p.add_argument("--quiet-threshold", type=float, default=0.25,
                   help="before each measurement, wait until other processes use at most this "
                        "fraction of the CPUs (0.25; 1 = never wait)")
    p.add_argument("--quiet-timeout", type=float, default=15.0,
                   help="... but no longer than this many seconds (15)")
    p.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                   help="only this workload (repeatable)")
    p.add_argument("--no-startup", action="store_true", help="skip the start-up benchmark")
    p.add_argument("--only-startup", action="store_true", help="only the start-up benchmark")
    p.add_argument("--agentctl", help="the agentctl to measure (default: beside this python)")
    p.add_argument("--json", nargs="?", const="", metavar="FILE",
                   help="also write the results as JSON (default file: "
                        "benchmarks/results/core-DATE.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("core_bench: run as root (it drops caches and mounts overlays)", file=sys.stderr)
        return 2
    reexec_in_private_mount_namespace()
    source = os.path.realpath(args.tree) if args.tree else django_tree(args.cache_dir)
    with work_directory(args.scratch_dir, "isolated-agent-bench", args.cache_dir, "",
                        args.scratch_size) as workdir:
        return run_benchmark(args, source, workdir)


def run_benchmark(args: argparse.Namespace, source: str, workdir: str) -> int:
    remove(workdir)
    ctx = BenchContext(workdir=workdir, source=source,
                       gate=QuietGate(args.quiet_threshold, args.quiet_timeout))
    agentctl = AgentctlSetup(args.agentctl)
    setups: list[Setup] = [NativeSetup(), KernelOverlaySetup(), agentctl]
    workloads = [WORKLOADS[name] for name in (args.workload or WORKLOADS)]
    began = time.monotonic()
    try:
        print(f"preparing {source} -> {workdir} ...", file=sys.stderr)
        ctx.prepare()
        stats = tree_stats(ctx.lower)
        payload: dict[str, Any] = {
            "benchmark": "core",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": {**machine_info(), "filesystem": filesystem_of(workdir),
                        "scratch": args.scratch_dir or f"ext4 image, {args.scratch_size}, loop"},
            "tree": {"source": source, **stats},
            "repetitions": {"warm": args.warm, "warm_repeat": args.warm_repeat,
                            "cold": args.cold},
            "setups": {s.name: s.description for s in setups},
            "workloads": {w.name: w.description for w in workloads},
            "agentctl": agentctl.agentctl,
            "source": source_state(),
        }
        print(f"tree: {stats['files']} files, {stats['dirs']} directories, "
              f"{stats['bytes'] / 2**20:.0f} MiB (+ .git); on {payload['machine']['filesystem']}",
              file=sys.stderr)
        payload["load_average_before"] = os.getloadavg()
        results: list[Measurement] = []
        if not args.only_startup:
            results = run_matrix(ctx, setups, workloads, {"warm": args.warm, "cold": args.cold},
                                 warm_repeat=args.warm_repeat, progress=_progress)
            _clear_progress()
            payload["results"] = [m.as_dict() for m in results]
            problems = inconsistent_checks(results)
            payload["inconsistent_checks"] = problems
        startup = None
        if not args.no_startup:
            print("measuring start-up ...", file=sys.stderr)
            startup = measure_startup(ctx, agentctl.agentctl, args.startup_runs,
                                      args.cache_dir)
            payload["startup"] = startup
        payload["quiet_gate"] = ctx.gate.summary()
        payload["elapsed_seconds"] = time.monotonic() - began
        payload["load_average_after"] = os.getloadavg()
    finally:
        remove(workdir)
    if results:
        report_matrix(results, [s.name for s in setups], payload.get("inconsistent_checks", []))
    if startup:
        report_startup(startup)
    before, after = payload["load_average_before"], payload["load_average_after"]
    gate = payload["quiet_gate"]
    print(f"(whole run: {payload['elapsed_seconds']:.0f} s; load average "
          f"{before[0]:.2f} before, {after[0]:.2f} after; {gate['busy_starts']} of "
          f"{gate['starts']} measurements started while other processes used more than "
          f"{gate['threshold']:.0%} of the CPUs; {gate['waited_seconds']:.0f} s spent waiting "
          "for a quiet machine)")
    if args.json is not None:
        print(f"JSON: {write_json('core', payload, args.json or None)}")
    return 0


def report_matrix(results: list[Measurement], setups: list[str], problems: list[str]) -> None:
    comparisons = [("overlay", "native"), ("agentctl", "native"), ("agentctl", "overlay")]
    header, rows = results_table(results, setups, comparisons)
    last = len(header) - 1

    def highlight(column: int, text: str) -> str | None:
        if column == last and text:
            return "bold red" if float(text.rstrip("×")) > TARGET_RATIO else "green"
        return None

    print_table("wall time of the workload (median ±max deviation); ratios of medians", header,
                rows, highlight)
    header, rows = results_table([m.cpu_view() for m in results], setups, comparisons)
    print_table("CPU time (user + system) of the workload's processes (median ±max deviation); "
                "ratios of medians", header, rows, highlight)
    for problem in problems:
        print(f"WARNING: check values differ between runs/setups: {problem}")


def report_startup(startup: dict[str, Any]) -> None:
    rows = [[label, format_seconds(w["median"]),
             f"{format_seconds(w['min'])} – {format_seconds(w['max'])}"]
            for label, w in startup["wall"].items()]
    print_table(f"start-up, wall time of the whole command ({startup['runs']} runs)",
                ["command", "median", "min – max"], rows, left=1)
    cached = {p["phase"]: p["median"] for p in startup["phases_bytecode_cached"]}
    rows = [[p["phase"], format_seconds(p["median"]),
             format_seconds(cached[p["phase"]]) if p["phase"] in cached else ""]
            for p in startup["phases"]]
    print_table("where `agentctl run -q -- true` spends its time (medians, instrumented)",
                ["phase", "as is", "bytecode cached"], rows, left=1)
    rows = [[r["module"], f"{r['cumulative_ms']:.1f} ms", f"{r['self_ms']:.1f} ms"]
            for r in startup["imports"]]
    print_table("slowest imports of `agentctl run -q -- true` (python -X importtime, bytecode "
                "cached, medians of 5)",
                ["module", "cumulative", "self"], rows, left=1)
    for label in ("agentctl run -q -- true", "agentctl run -q -- true, bytecode cached"):
        total = startup["wall"][label]["median"]
        verdict = "meets" if total < TARGET_STARTUP else "MISSES"
        print(f"{label}: {format_seconds(total)} median, {verdict} the "
              f"{TARGET_STARTUP * 1000:.0f} ms target")


def _progress(message: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{message}")
        sys.stderr.flush()


def _clear_progress() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")


if __name__ == "__main__":
    run_script(main, "core_bench")
