"""Layer stacks (issue 14): how long checkpoint, rollback and fork take, and what a deep stack
costs the view and a commit.

    sudo .venv/bin/python benchmarks/stack_bench.py                 # everything
    sudo .venv/bin/python benchmarks/stack_bench.py --part ops --ops-files 1 --ops-files 100000
    sudo .venv/bin/python benchmarks/stack_bench.py --part view --reps 1 --workload 'git status'
    sudo .venv/bin/python benchmarks/stack_bench.py --part live

Three parts:

live    live checkpoints of a job that writes continuously on agentfs (`run --engine fuse`): how
        long the daemon held the job's requests (its own measure), and the job's slowest
        write against its median one (what the job felt, the copy-up of its file included).
ops     checkpoint, rollback and fork of an env holding 1 changed file and one holding 100 000:
        the library's time for the operation (the median of --ops-reps), and `agentctl`'s
        end-to-end time for the same operation beside it (a new Python process each time).
view    walk+stat, grep -r, read all and git status on the Django tree through an env whose
        changes (32 runs, each editing 20 files, adding one and deleting one) sit in 32 frozen
        layers, against the same changes in one layer: the kernel engine (second pass) and
        agentfs (`run --engine fuse`, steady: settled caches). The same runner and handshake
        as the other benchmarks (harness.py).
commit  `agentctl commit` of those changes from the 32-layer env and from the one-layer env,
        each on a fresh copy of the tree.

Runs as root, in a private mount namespace, on a fresh ext4 image (harness.work_directory).
See benchmarks/README-stack.md for the method and the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agentfs_bench import report, run_all  # noqa: E402
from core_bench import django_tree, tree_stats  # noqa: E402
from guard_tree_bench import WORKLOADS as TREE_WORKLOADS  # noqa: E402
from harness import (  # noqa: E402
    DEFAULT_CACHE_DIR,
    AgentctlSetup,
    BenchContext,
    Measurement,
    QuietGate,
    copy_tree,
    default_agentctl,
    filesystem_of,
    format_seconds,
    inconsistent_checks,
    machine_info,
    print_table,
    reexec_in_private_mount_namespace,
    remove,
    sh,
    source_state,
    timed,
    work_directory,
    write_json,
)
from workloads import GIT_ENV, Workload  # noqa: E402

from isolated_agent.env.stack import checkpoint, find_checkpoint, fork, rollback  # noqa: E402
from isolated_agent.env.store import Store  # noqa: E402

DEPTH = 32
VIEW_WORKLOADS = [w for w in TREE_WORKLOADS if w.name in (
    "walk+stat", "grep -r", "read all", "git status")]
STATES = ("second", "steady")


# -- the changes, one run each -------------------------------------------------------------------


def change_scripts(tree: str, count: int | None = None) -> list[str]:
    """`count` shell scripts, each editing 20 files spread over the tree, adding one and
    deleting one (the same in every setup)."""
    files = sorted(os.path.relpath(os.path.join(d, n), tree) for d, _, names in os.walk(tree)
                   if ".git" not in os.path.relpath(d, tree).split(os.sep) for n in names)
    deleted = set()
    scripts = []
    for layer in range(DEPTH if count is None else count):
        edited = [f for f in files[layer::97] if f not in deleted][:20]
        gone = next(f for f in files[layer * 13 + 5:] if f not in deleted and f not in edited)
        deleted.add(gone)
        lines = [f"echo '# layer {layer}' >> {shlex.quote(f)}" for f in edited]
        lines += [f"mkdir -p added && echo {layer} > added/layer{layer}.txt",
                  f"rm {shlex.quote(gone)}"]
        scripts.append("set -e\n" + "\n".join(lines))
    return scripts


class StackSetup(AgentctlSetup):
    """An env over the tree holding the DEPTH change runs: frozen into one layer each
    (`layered`), or all into a single one; `agentctl run --engine ENGINE` per measurement. The
    env is never discarded between measurements (it is the thing measured)."""

    def __init__(self, engine: str, layered: bool) -> None:
        layers = DEPTH if layered else 1
        super().__init__(engine=engine, name=f"{engine}-{layers}")
        self.layered = layered
        self.description = (f"agentctl run --engine {engine}, the changes in {layers} frozen "
                            f"layer{'s' if layered else ''}")

    def start(self, ctx: BenchContext) -> None:
        super().start(ctx)
        build_stack(self.agentctl, self.environ(), self.env_name, ctx.lower, self.layered)

    def reset(self, workload: Workload) -> None:
        pass


def build_stack(agentctl: str, environ: dict[str, str], env: str, tree: str,
                layered: bool) -> None:
    for script in change_scripts(tree):
        sh([agentctl, "run", "-q", "--env", env, "--engine", "kernel", "--no-default-allows",
            "--", "sh", "-c", script], env=environ, cwd=tree)
        if layered:
            sh([agentctl, "checkpoint", env], env=environ)
    if not layered:
        sh([agentctl, "checkpoint", env], env=environ)


# -- ops ------------------------------------------------------------------------------------------


def measure_ops(workdir: str, files: int, reps: int, agentctl: str) -> dict[str, Any]:
    """checkpoint, rollback, fork (at a checkpoint) and fork (of the current state) of an env
    whose upper holds `files` new (empty) files, each operation on a freshly filled upper, in a
    fresh store per repetition."""
    base = os.path.join(workdir, f"ops-{files}")
    library: dict[str, list[float]] = {"checkpoint": [], "rollback": [], "fork --at": [],
                                       "fork": []}
    cli: dict[str, list[float]] = {key: [] for key in library}
    for rep in range(reps):
        _ops_once(base, files, agentctl, library, cli)
        print(f"ops, {files} files: {rep + 1}/{reps}", file=sys.stderr)
    remove(base)
    return {"files": files, "reps": reps,
            "library": {k: statistics.median(v) for k, v in library.items()},
            "cli": {k: statistics.median(v) for k, v in cli.items()},
            "library_all": library, "cli_all": cli}


def _ops_once(base: str, files: int, agentctl: str, library: dict[str, list[float]],
              cli: dict[str, list[float]]) -> None:
    remove(base)
    project = os.path.join(base, "project")
    os.makedirs(project)
    with open(os.path.join(project, "README"), "w") as f:
        f.write("project\n")
    home = os.path.join(base, "store")
    environ = {**os.environ, "ISOLATED_AGENT_HOME": home}
    store = Store(home)
    first = checkpoint(store, store.create("ops", [project]), "empty")

    def fill() -> None:
        """`files` new files in the upper, then synced: what a job wrote a while ago (a
        checkpoint fsyncs two directories, and the first fsync after fresh writes waits for
        the filesystem's journal to take them all: 10 ms for 100 000 on this machine)."""
        directory = os.path.join(store.get("ops").roots[0].upper, f"d{time.monotonic_ns()}")
        os.mkdir(directory)
        for number in range(files):
            if number % 1000 == 0:
                sub = os.path.join(directory, str(number // 1000))
                os.mkdir(sub)
            os.close(os.open(os.path.join(sub, str(number)), os.O_WRONLY | os.O_CREAT))
        os.sync()

    def ctl(*args: str) -> float:
        return timed(lambda: sh([agentctl, *args], env=environ))

    fill()
    library["checkpoint"].append(timed(lambda: checkpoint(store, store.get("ops"))))
    fill()
    cli["checkpoint"].append(ctl("checkpoint", "ops"))
    fill()
    library["rollback"].append(timed(lambda: rollback(store, store.get("ops"), first)))
    fill()
    cli["rollback"].append(ctl("rollback", "ops", first.id))
    fill()
    at = checkpoint(store, store.get("ops"))
    library["fork --at"].append(timed(lambda: fork(
        store, store.get("ops"), "a", find_checkpoint(store, store.get("ops"), at.id))))
    cli["fork --at"].append(ctl("fork", "ops", "b", "--at", at.id))
    fill()
    library["fork"].append(timed(lambda: fork(store, store.get("ops"), "c")))
    fill()
    cli["fork"].append(ctl("fork", "ops", "d"))
    store.close()


def report_ops(results: list[dict[str, Any]]) -> None:
    rows = []
    for operation in ("checkpoint", "rollback", "fork --at", "fork"):
        row = [operation]
        for r in results:
            row += [f"{r['library'][operation] * 1000:.2f} ms",
                    format_seconds(r["cli"][operation])]
        rows.append(row)
    header = ["operation"]
    for r in results:
        header += [f"library, {r['files']} files", f"agentctl, {r['files']} files"]
    print_table("checkpoint, rollback and fork (median)", header, rows)


# -- live --------------------------------------------------------------------------------------

# The job: 4 KiB writes through one open file for as long as it is told, rewriting its first
# MiB over and over; prints the duration of every write, sorted, in microseconds.
LIVE_JOB = """
import json, sys, time
chunk, durations = b"x" * 4096, []
end = time.monotonic() + float(sys.argv[1])
with open("live.bin", "wb", buffering=0) as f:
    while time.monotonic() < end:
        began = time.perf_counter()
        f.write(chunk)
        durations.append(round((time.perf_counter() - began) * 1e6))
        if len(durations) % 256 == 0:
            f.seek(0)
print(json.dumps(sorted(durations)))
"""


def measure_live(workdir: str, agentctl: str, count: int) -> dict[str, Any]:
    base = os.path.join(workdir, "live")
    remove(base)
    project = os.path.join(base, "project")
    os.makedirs(project)
    home = os.path.join(base, "store")
    store = Store(home)
    env = store.create("live", [project])
    seconds = 2.0 + count * 0.3
    job = subprocess.Popen(
        [agentctl, "run", "-q", "--env", "live", "--engine", "fuse", "--", "python3", "-c",
         LIVE_JOB, str(seconds)], cwd=project, env={**os.environ, "ISOLATED_AGENT_HOME": home},
        stdout=subprocess.PIPE, text=True)
    paused: list[float] = []
    took: list[float] = []
    try:
        time.sleep(1.0)
        for _ in range(count):
            began = time.perf_counter()
            paused.extend(checkpoint(store, env).paused_ms)
            took.append(time.perf_counter() - began)
            time.sleep(0.3)
        output, _ = job.communicate(timeout=seconds + 60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    store.close()
    remove(base)
    writes = json.loads(output)
    return {"checkpoints": count, "paused_ms": paused, "library_ms": [t * 1000 for t in took],
            "writes": len(writes), "write_median_us": writes[len(writes) // 2],
            "slowest_writes_us": writes[-count:]}


def report_live(live: dict[str, Any]) -> None:
    slowest = live["slowest_writes_us"]
    print_table(f"live checkpoints of a writing job ({live['checkpoints']}, agentfs)",
                ["daemon pause, median", "daemon pause, max", "checkpoint call, median",
                 "job's median write", f"job's {len(slowest)} slowest writes"],
                [[f"{statistics.median(live['paused_ms']):.2f} ms",
                  f"{max(live['paused_ms']):.2f} ms",
                  f"{statistics.median(live['library_ms']):.2f} ms",
                  f"{live['write_median_us']} µs",
                  f"{slowest[0] / 1000:.2f}–{slowest[-1] / 1000:.2f} ms"]])


# -- depth: what the kernel's overlay pays per layer ----------------------------------------------

DEPTH_WORKLOADS = {
    "walk+stat": "find . -path ./.git -prune -o -printf '%s %T@\\n' > /dev/null",
    "grep -r": "grep -rn --exclude-dir=.git -e get_response . > /dev/null",
    "read all": "find . -path ./.git -prune -o -type f -print0 | xargs -0 cat > /dev/null",
    "git status": "git status --porcelain > /dev/null",
}


def measure_depths(ctx: BenchContext, depths: list[int], reps: int,
                   agentctl: str) -> dict[str, dict[int, list[float]]]:
    """The same 32 change runs frozen into each of `depths` layers (a checkpoint every
    32/depth runs, through agentfs, which never squashes), each stack mounted by hand as the
    kernel engine mounts it and kept mounted; every workload timed `reps` times on each, the
    depths interleaved (their order reversed every other round), after two settling runs."""
    mounts: dict[int, str] = {}
    for depth in depths:
        environ = {**os.environ, "ISOLATED_AGENT_HOME": os.path.join(ctx.workdir, f"d{depth}")}
        for number, script in enumerate(change_scripts(ctx.lower, 32), start=1):
            sh([agentctl, "run", "-q", "--env", "e", "--engine", "fuse", "--no-default-allows",
                "--", "sh", "-c", script], env=environ, cwd=ctx.lower)
            if number % (32 // depth) == 0:
                sh([agentctl, "checkpoint", "e"], env=environ)
        store = Store(environ["ISOLATED_AGENT_HOME"])
        root = store.get("e").roots[0]
        store.close()
        assert len(root.layers) == depth, (depth, len(root.layers))
        mounts[depth] = os.path.join(ctx.workdir, f"mnt{depth}")
        os.makedirs(mounts[depth])
        options = ",".join(("lowerdir=" + ":".join([*root.layers, ctx.lower]),
                            f"upperdir={root.upper}", f"workdir={root.work}", "userxattr"))
        sh(["mount", "-t", "overlay", "overlay", "-o", options, mounts[depth]])
    times: dict[str, dict[int, list[float]]] = {}
    try:
        for name, command in DEPTH_WORKLOADS.items():
            times[name] = {depth: [] for depth in depths}
            for depth in depths:
                for _ in range(2):
                    sh(["sh", "-c", command], cwd=mounts[depth])
            for rep in range(reps):
                for depth in (depths if rep % 2 == 0 else list(reversed(depths))):
                    ctx.gate.wait()
                    place = mounts[depth]
                    times[name][depth].append(timed(
                        lambda c=command, p=place: sh(["sh", "-c", c], cwd=p)))
    finally:
        for mount_point in mounts.values():
            subprocess.run(["umount", mount_point], check=False)
    return times


def report_depths(times: dict[str, dict[int, list[float]]]) -> None:
    rows = []
    for name, by_depth in times.items():
        one = statistics.median(by_depth[1])
        medians = [statistics.median(v) for v in by_depth.values()]
        rows.append([name, *(f"{m / one:.2f}× ({format_seconds(m)})" for m in medians)])
    depths = list(next(iter(times.values())))
    print_table("the kernel's overlay by stack depth, against 1 layer (median, mounts kept)",
                ["workload", *(f"{d} layers" for d in depths)], rows, left=1)


# -- commit -------------------------------------------------------------------------------------


def measure_commit(ctx: BenchContext, reps: int, agentctl: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"1 layer": [], f"{DEPTH} layers": []}
    for rep in range(reps):
        for label, layered in (("1 layer", False), (f"{DEPTH} layers", True)):
            times[label].append(_commit_once(ctx, agentctl, layered))
            print(f"commit {label} {rep + 1}/{reps}: {times[label][-1]:.2f} s", file=sys.stderr)
    return times


def _commit_once(ctx: BenchContext, agentctl: str, layered: bool) -> float:
    base = tempfile.mkdtemp(prefix="commit-", dir=ctx.workdir)
    tree = os.path.join(base, "tree")
    copy_tree(ctx.lower, tree)
    environ = {**os.environ, "ISOLATED_AGENT_HOME": os.path.join(base, "store")}
    sh([agentctl, "env", "create", "c", "--root", tree], env=environ)
    build_stack(agentctl, environ, "c", tree, layered)
    sh(["sync"])
    ctx.gate.wait()
    seconds = timed(lambda: sh([agentctl, "commit", "c"], env=environ))
    remove(base)
    return seconds


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    global DEPTH
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", action="append", choices=["ops", "live", "view", "depth", "commit"])
    p.add_argument("--tree", help="benchmark this tree instead of the Django sdist")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--scratch-dir", metavar="DIR",
                   help="run in DIR's filesystem instead of a fresh loop-mounted ext4 image")
    p.add_argument("--scratch-size", default="8G")
    p.add_argument("--ops-files", type=int, action="append",
                   help="env sizes for the ops part (default: 1 and 100000)")
    p.add_argument("--ops-reps", type=int, default=5)
    p.add_argument("--live-checkpoints", type=int, default=10)
    p.add_argument("--reps", type=int, default=3, help="repetitions of the view and commit parts")
    p.add_argument("--workload", action="append", choices=[w.name for w in VIEW_WORKLOADS])
    p.add_argument("--engine", action="append", choices=["kernel", "fuse"])
    p.add_argument("--depth-reps", type=int, default=25,
                   help="rounds of the depth part (each times every depth once)")
    p.add_argument("--depth", type=int, default=DEPTH,
                   help="how many change runs, each frozen into a layer of its own (default 32)")
    p.add_argument("--json", nargs="?", const="", metavar="FILE")
    args = p.parse_args(argv)
    DEPTH = args.depth
    if os.geteuid() != 0:
        print("stack_bench: run as root (it drops caches and mounts)", file=sys.stderr)
        return 2
    reexec_in_private_mount_namespace()
    parts = args.part or ["ops", "live", "view", "commit"]
    source = os.path.realpath(args.tree) if args.tree else django_tree(args.cache_dir)
    agentctl = default_agentctl()
    many_inodes = ("mkfs.ext4", "-q", "-F", "-i", "4096")
    with work_directory(args.scratch_dir, "stack-bench", args.cache_dir, "stack-",
                        args.scratch_size, many_inodes) as workdir:
        remove(workdir)
        os.makedirs(workdir)
        gate = QuietGate()
        ctx = BenchContext(workdir=workdir, source=source, gate=gate)
        payload: dict[str, Any] = {
            "benchmark": "stack", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": {**machine_info(), "filesystem": filesystem_of(workdir)},
            "source": source_state(), "load_average_before": os.getloadavg(),
        }
        began = time.monotonic()
        if "ops" in parts:
            ops = [measure_ops(workdir, files, args.ops_reps, agentctl)
                   for files in args.ops_files or [1, 100_000]]
            payload["ops"] = ops
            report_ops(ops)
        if "live" in parts:
            payload["live"] = measure_live(workdir, agentctl, args.live_checkpoints)
            report_live(payload["live"])
        if "view" in parts or "commit" in parts or "depth" in parts:
            print(f"preparing {source} -> {workdir} ...", file=sys.stderr)
            ctx.prepare()
            os.environ.update(GIT_ENV)
            payload["tree"] = {"source": source, **tree_stats(ctx.lower)}
        if "view" in parts:
            setups = [StackSetup(engine, layered) for engine in args.engine or ["kernel", "fuse"]
                      for layered in (False, True)]
            workloads = [w for w in VIEW_WORKLOADS if not args.workload or w.name in args.workload]
            results: list[Measurement] = []
            run_all(ctx, setups, workloads, list(STATES), args.reps, results)
            payload["view"] = [m.as_dict() for m in results]
            payload["inconsistent_checks"] = inconsistent_checks(results)
            payload["quiet_gate"] = gate.summary()
            payload["elapsed_seconds"] = time.monotonic() - began
            names = [s.name for s in setups]
            report(results, names, payload, [(f"{e}-{DEPTH}", f"{e}-1") for e in
                                             args.engine or ["kernel", "fuse"]])
        if "depth" in parts:
            depths = [1, 4, 8, 32]
            payload["depth"] = {name: {str(d): v for d, v in by_depth.items()} for name, by_depth
                                in measure_depths(ctx, depths, args.depth_reps, agentctl).items()}
            report_depths({name: {int(d): v for d, v in by_depth.items()}
                           for name, by_depth in payload["depth"].items()})
        if "commit" in parts:
            commits = measure_commit(ctx, args.reps, agentctl)
            payload["commit"] = commits
            one, deep = (statistics.median(v) for v in commits.values())
            print_table("agentctl commit of the same changes (median)",
                        ["1 layer", f"{DEPTH} layers", "ratio"],
                        [[format_seconds(one), format_seconds(deep), f"{deep / one:.2f}×"]])
        payload["elapsed_seconds"] = time.monotonic() - began
        if args.json is not None:
            print(f"JSON: {write_json('stack', payload, args.json or None)}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
