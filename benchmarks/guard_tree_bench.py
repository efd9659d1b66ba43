"""The guard on a real tree: native vs `agentctl guard` vs fuse-overlayfs, on the Django 5.1
sdist made a git repository: first pass (cold), second pass (one pass through the mount
before), steady (two passes before: where repeated passes settle; agentfs_bench.py's states).

    sudo .venv/bin/python benchmarks/guard_tree_bench.py               # 3 repetitions
    sudo .venv/bin/python benchmarks/guard_tree_bench.py --reps 1 --workload 'git status'
    sudo .venv/bin/python benchmarks/guard_tree_bench.py --requests --setup native --setup guard

`--requests` also counts what the guard's daemon answered in each timed pass (and how long its
handlers took: fusefs/accounting.py), and reports the guard's time beyond native per request.

Setups: `native` (a fresh copy of the tree), `guard` (`agentctl guard start` over such a
copy, started before the runner and stopped after it: every measurement mounts afresh), and
`fuse-overlayfs` over the tree (the yardstick of a FUSE file system in front of a tree, for
the first pass). Everything else is the agentfs benchmark's harness (agentfs_bench.py): the
same runner, handshake, cache states, quiet gate and scratch ext4 image. Runs as root.
See benchmarks/README-guard.md for the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from agentfs_bench import FuseOverlayfsSetup, report, run_all  # noqa: E402
from core_bench import django_tree, tree_stats  # noqa: E402
from harness import (  # noqa: E402
    DEFAULT_CACHE_DIR,
    BenchContext,
    Measurement,
    NativeSetup,
    QuietGate,
    Setup,
    copy_tree,
    default_agentctl,
    filesystem_of,
    format_seconds,
    inconsistent_checks,
    machine_info,
    print_table,
    reexec_in_private_mount_namespace,
    remove,
    run_script,
    source_state,
    work_directory,
    write_json,
)
from workloads import (  # noqa: E402
    DAEMON_PID_ENV,
    GIT_ENV,
    REQUESTS_ENV,
    Workload,
    read_all,
    walk_stat,
)

STATES = ("cold", "second", "steady")
OTHER_BRANCH = "other"


def remove_package(tree: str) -> int:
    """`rm -rf` of the tree's biggest directory (django/: about 2 800 files)."""
    done = subprocess.run(["rm", "-rf", "django"], cwd=tree)
    return done.returncode


WORKLOADS = [
    Workload("walk+stat", "scandir the tree (.git excluded), lstat() every entry", walk_stat),
    Workload("grep -r", "grep -rn for an identifier over the tree, wc -l",
             "grep -rn --exclude-dir=.git -e get_response . | wc -l", tools=("grep", "wc")),
    Workload("read all", "open and read every regular file", read_all),
    Workload("git status", "git status of the clean repository", "git status --porcelain | wc -l",
             tools=("git", "wc")),
    Workload("git checkout", "git checkout of a branch that changes 10% of the files",
             f"git checkout -q {OTHER_BRANCH} && git status --porcelain | wc -l",
             mutates=True, tools=("git", "wc")),
    Workload("rm -rf", "rm -rf of django/ (about 2 800 files)", remove_package, mutates=True),
]


class GuardSetup(NativeSetup):
    """A fresh copy of the tree with `agentctl guard start` over it for each measurement. With
    `requests_file`, the guard's daemon counts its requests (fusefs/accounting.py) and the
    runner takes their totals around each timed pass (workloads.daemon_requests)."""

    name = "guard"
    description = "agentctl guard over a copy of the tree (a fresh mount per measurement)"

    def __init__(self, requests_file: str | None = None) -> None:
        super().__init__()
        self.requests_file = requests_file

    def start(self, ctx: BenchContext) -> None:
        super().start(ctx)  # its copy in ctx.workdir/guard
        self.store = os.path.join(ctx.workdir, "guard-store")
        self.agentctl = default_agentctl()

    def command(self, argv: list[str]) -> list[str]:
        script = ('set -e; started=$("$AGENTCTL" guard start --json --no-backupd "$DIR"); '
                  f'export {DAEMON_PID_ENV}=$(printf %s "$started" | "$PYTHON" -c '
                  '"import json, sys; print(json.load(sys.stdin)[\'pid\'])"); set +e; '
                  '"$@"; rc=$?; "$AGENTCTL" guard stop "$DIR" >/dev/null; exit $rc')
        counting = [f"{REQUESTS_ENV}={self.requests_file}"] if self.requests_file else []
        return ["env", f"ISOLATED_AGENT_HOME={self.store}", f"AGENTCTL={self.agentctl}",
                f"PYTHON={sys.executable}", f"DIR={self.path}", *counting,
                "/bin/sh", "-c", script, "sh", *argv]

    def stop(self) -> None:
        super().stop()
        remove(self.store)


def report_requests(results: list[Measurement]) -> None:
    """What the guard's daemon answered in each timed pass, and what that cost: the time the
    guard took beyond native, per request."""
    native = {(m.workload, m.cache): m for m in results if m.setup == "native"}
    rows = []
    for m in results:
        if not m.requests:
            continue
        passes = len(m.requests)
        kinds: dict[str, list[float]] = {}
        for answered in m.requests:
            for name, (count, seconds) in answered.items():
                kind = kinds.setdefault(name, [0, 0.0])
                kind[0] += count / passes
                kind[1] += seconds / passes
        total = sum(count for count, _ in kinds.values())
        handlers = sum(seconds for _, seconds in kinds.values())
        top = sorted(kinds.items(), key=lambda item: -item[1][0])[:5]
        base = native.get((m.workload, m.cache))
        extra = m.median - base.median if base else None
        rows.append([m.workload, m.cache, f"{total:.0f}",
                     ", ".join(f"{name} {count:.0f}" for name, (count, _) in top),
                     format_seconds(handlers),
                     format_seconds(extra) if extra is not None else "",
                     f"{extra / total * 1e6:.0f} µs" if extra is not None and total else ""])
    if rows:
        print_table("the guard daemon's requests per timed pass (mean of the passes)",
                    ["workload", "state", "requests", "most asked", "in handlers",
                     "guard − native", "per request"], rows)


def prepare_lower(ctx: BenchContext, source: str) -> None:
    """The tree as a (packed) git repository on `main`, with a branch that changes 10% of
    its files."""
    ctx.lower = os.path.join(ctx.workdir, "lower", os.path.basename(source.rstrip("/")))
    copy_tree(source, ctx.lower)
    remove(os.path.join(ctx.lower, ".git"))

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=ctx.lower, check=True, capture_output=True,
                       env={**os.environ, **GIT_ENV})

    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("commit", "-q", "-m", "main")
    git("checkout", "-q", "-b", OTHER_BRANCH)
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(ctx.lower)
                   if ".git" not in d.split(os.sep) for n in names)
    for number, path in enumerate(files[::10]):
        if number % 3 == 0:
            os.unlink(path)
        else:
            with open(path, "a") as f:
                f.write("# changed on the other branch\n")
    os.makedirs(os.path.join(ctx.lower, "added"))
    for number in range(100):
        with open(os.path.join(ctx.lower, "added", f"f{number}"), "w") as f:
            f.write(f"{number}\n")
    git("add", "-A")
    git("commit", "-q", "-m", OTHER_BRANCH)
    git("checkout", "-q", "main")
    git("gc", "-q")  # packed, as a clone is (and as the guard's fd per inode needs it here)
    os.sync()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tree", help="benchmark this tree instead of the Django sdist")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--scratch-dir", metavar="DIR",
                   help="run in DIR's filesystem instead of a fresh loop-mounted ext4 image")
    p.add_argument("--scratch-size", default="8G")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workload", action="append", choices=[w.name for w in WORKLOADS])
    p.add_argument("--state", action="append", choices=STATES)
    p.add_argument("--setup", action="append", choices=["native", "guard", "fuse-overlayfs"])
    p.add_argument("--requests", action="store_true",
                   help="count the guard daemon's requests in each timed pass (and report them)")
    p.add_argument("--json", nargs="?", const="", metavar="FILE")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("guard_tree_bench: run as root (it drops caches and mounts)", file=sys.stderr)
        return 2
    if shutil.which("fuse-overlayfs") is None:
        print("guard_tree_bench: apt-get install fuse-overlayfs", file=sys.stderr)
        return 2
    reexec_in_private_mount_namespace()
    source = os.path.realpath(args.tree) if args.tree else django_tree(args.cache_dir)
    many_inodes = ("mkfs.ext4", "-q", "-F", "-i", "4096")
    with work_directory(args.scratch_dir, "guard-tree-bench", args.cache_dir, "guard-",
                        args.scratch_size, many_inodes) as workdir:
        remove(workdir)
        os.makedirs(workdir)
        gate = QuietGate()
        ctx = BenchContext(workdir=workdir, source=source, gate=gate)
        print(f"preparing {source} -> {workdir} ...", file=sys.stderr)
        prepare_lower(ctx, source)
        os.environ.update(GIT_ENV)
        requests_file = os.path.join(workdir, "guard-requests.json") if args.requests else None
        available: dict[str, Setup] = {"native": NativeSetup(),
                                       "guard": GuardSetup(requests_file),
                                       "fuse-overlayfs": FuseOverlayfsSetup()}
        setups = [available[n] for n in args.setup or available]
        workloads = [w for w in WORKLOADS if not args.workload or w.name in args.workload]
        payload: dict[str, Any] = {
            "benchmark": "guard-tree", "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": {**machine_info(), "filesystem": filesystem_of(workdir)},
            "tree": {"source": source, **tree_stats(ctx.lower)}, "reps": args.reps,
            "source": source_state(), "load_average_before": os.getloadavg(),
        }
        began = time.monotonic()
        results: list[Measurement] = []
        run_all(ctx, setups, workloads, list(args.state or STATES), args.reps, results)
        payload["results"] = [m.as_dict() for m in results]
        payload["inconsistent_checks"] = inconsistent_checks(results)
        payload["quiet_gate"] = gate.summary()
        payload["elapsed_seconds"] = time.monotonic() - began
        names = [s.name for s in setups]
        report(results, names, payload, [(a, b) for a, b in (
            ("guard", "native"), ("fuse-overlayfs", "native"), ("guard", "fuse-overlayfs"))
            if a in names and b in names])
        report_requests(results)
        if args.json is not None:
            print(f"JSON: {write_json('guard-tree', payload, args.json or None)}")
    return 0


if __name__ == "__main__":
    run_script(main, "guard_tree_bench")
