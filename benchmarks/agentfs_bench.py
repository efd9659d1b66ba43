"""The agentfs benchmark: native vs kernel overlayfs vs fuse-overlayfs vs agentfs, on the same
tree as the core benchmark (the Django 5.1 sdist), in three cache states.

    sudo .venv/bin/python benchmarks/agentfs_bench.py                # everything
    sudo .venv/bin/python benchmarks/agentfs_bench.py --reps 1 --workload 'walk+stat'
    sudo .venv/bin/python benchmarks/agentfs_bench.py --profile 'grep -r' --state cold

Cache states (every overlay is mounted afresh for every measurement):

    cold        page cache, dentries and inodes dropped, then a fresh mount
    fresh-warm  the lower read natively first (its page cache and inodes are hot), then a
                fresh mount: what the overlay itself costs when the disk is out of the way
    second      a fresh mount, one warm-up pass through it (every entry lstat'ed, every file
                read), then the timed pass: what the kernel's caches of the mount give
    steady      as second, with one untimed pass of the workload itself before the timed one
                (a workload that changes the tree gets a second warm-up pass instead): what
                repeated passes settle at. It differs from second on FUSE only: a READ, or a
                listing the kernel did not have, marks the inode's atime stale, so the next
                stat of it asks the daemon (one GETATTR) once

Runs as root (drop_caches, mounts), in a private mount namespace, on a fresh ext4 image like the
core benchmark. Uses the core benchmark's harness (harness.py, workloads.py) unchanged: each
measurement starts the same runner in the setup, which times the workload from inside it.
See benchmarks/README-agentfs.md for the method and the results.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from core_bench import django_tree, tree_stats  # noqa: E402
from harness import (  # noqa: E402
    DEFAULT_CACHE_DIR,
    BenchContext,
    BenchError,
    KernelOverlaySetup,
    Measurement,
    NativeSetup,
    QuietGate,
    Setup,
    copy_tree,
    drop_caches,
    filesystem_of,
    format_seconds,
    inconsistent_checks,
    machine_info,
    print_table,
    reexec_in_private_mount_namespace,
    remove,
    run_runner,
    run_script,
    source_state,
    work_directory,
    write_json,
)
from workloads import (  # noqa: E402
    GIT_ENV,
    Workload,
    create_delete,
    read_all,
    walk,
    walk_stat,
)

from isolated_agent.fusefs.fastloop import SPIN_ENV, SPIN_SECONDS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATES = ("cold", "fresh-warm", "second", "steady")
RENAME_DIR, RENAME_FILES = "bench-rename", 100
STORM_FILES = 500
OPEN_CLOSE = 5000
SEQ_SIZE_MIB = 512


# -- workloads (module-level: the runner imports this file to run them) ------------------------


def open_close(tree: str) -> int:
    """open(2) + close(2) of one lower file, 5 000 times."""
    path = os.path.join(tree, "pyproject.toml")
    for _ in range(OPEN_CLOSE):
        os.close(os.open(path, os.O_RDONLY))
    return OPEN_CLOSE


def copy_up_storm(tree: str) -> int:
    """Append a line to 500 lower files (every one a copy-up in an overlay)."""
    files = sorted(e.path for e in walk(tree)
                   if e.is_file(follow_symlinks=False) and e.name.endswith(".py"))
    picked = files[:: max(1, len(files) // STORM_FILES)][:STORM_FILES]
    for path in picked:
        with open(path, "a") as f:
            f.write("# appended by the benchmark\n")
    return len(picked)


def seq_write(tree: str) -> int:
    """Write a new 512 MiB file in 1 MiB writes."""
    block = b"\xa5" * (1 << 20)
    with open(os.path.join(tree, "seq-written.bin"), "wb", buffering=0) as f:
        for _ in range(SEQ_SIZE_MIB):
            f.write(block)
    return SEQ_SIZE_MIB


def seq_read(tree: str) -> int:
    """Read the 512 MiB lower file in 1 MiB reads."""
    total = 0
    with open(os.path.join(tree, "seq.bin"), "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            total += len(chunk)
    return total


TREE_WORKLOADS = [
    Workload("walk+stat", "scandir the tree (.git excluded), lstat() every entry", walk_stat),
    Workload("grep -r", "grep -rn for an identifier over the tree, wc -l",
             "grep -rn --exclude-dir=.git -e get_response . | wc -l", tools=("grep", "wc")),
    Workload("read all", "open and read every regular file", read_all),
    Workload("open+close x5000", "open(2) + close(2) of one lower file, 5 000 times", open_close),
    Workload("copy-up storm", "append a line to 500 lower .py files", copy_up_storm,
             mutates=True),
    Workload("create+delete 2000", "create 2 000 files of 1 KiB in a new dir, delete them",
             create_delete, mutates=True),
    Workload("git init+add+commit", "git init && git add -A && git commit (a tree with no .git)",
             "git init -q && git add -A && git commit -q -m bench && git ls-files | wc -l",
             mutates=True, tools=("git", "wc")),
    Workload("rename lower dir", f"mv a lower dir of {RENAME_FILES} files (rename(2), or "
             "copy + delete where the overlay answers EXDEV)",
             f"mv {RENAME_DIR} {RENAME_DIR}-moved && ls {RENAME_DIR}-moved | wc -l",
             mutates=True, tools=("mv", "ls", "wc")),
]
SEQ_WORKLOADS = [
    Workload("seq write 512 MiB", "write a new 512 MiB file in 1 MiB writes", seq_write,
             mutates=True),
    Workload("seq read 512 MiB", "read a 512 MiB lower file in 1 MiB reads", seq_read),
]


# -- setups ---------------------------------------------------------------------------------------


class FuseOverlaySetup(Setup):
    """A FUSE overlay mounted by its own command at a mount point beside the lower, in a
    private mount namespace (`unshare -m`) that also unmounts it when the runner is done."""

    name = "fuse"
    mount_template = ""

    def start(self, ctx: BenchContext) -> None:
        super().start(ctx)
        self.base = os.path.join(ctx.workdir, self.name)
        self.upper = os.path.join(self.base, "upper")
        self.work = os.path.join(self.base, "work")
        self.mnt = os.path.join(self.base, "mnt")
        os.makedirs(self.mnt, exist_ok=True)

    def reset(self, workload: Workload) -> None:
        for part in (self.upper, self.work):
            self.ctx.trash.discard(part)
            os.makedirs(part)

    def tree(self) -> str:
        return self.mnt

    def mount_command(self) -> str:
        return self.mount_template.format(lower=self.ctx.lower, upper=self.upper,
                                          work=self.work, mnt=self.mnt, python=sys.executable)

    def command(self, argv: list[str]) -> list[str]:
        script = ('set -e; eval "$1"; shift; set +e; "$@"; rc=$?; cd /; '
                  'umount "$MNT" || umount -l "$MNT"; exit $rc')
        return ["unshare", "--mount", "--propagation", "private", "--", "env",
                f"MNT={self.mnt}", "/bin/sh", "-c", script, "sh", self.mount_command(), *argv]

    def stop(self) -> None:
        remove(self.base)


class FuseOverlayfsSetup(FuseOverlaySetup):
    name = "fuse-overlayfs"
    description = "fuse-overlayfs (Debian package) mounted by hand, empty upper"
    mount_template = "fuse-overlayfs -o lowerdir={lower},upperdir={upper},workdir={work} {mnt}"


class AgentfsSetup(FuseOverlaySetup):
    name = "agentfs"
    description = "agentfs (python -m isolated_agent.engines.fuse), empty upper"
    mount_template = ("{python} -m isolated_agent.engines.fuse --lower {lower} --upper {upper} "
                      "--work {work} {mnt}")

    def __init__(self, name: str = "agentfs", environ: dict[str, str] | None = None) -> None:
        self.name = name
        self.extra_environ = environ or {}
        if environ:
            self.description = f"agentfs with {' '.join(f'{k}={v}' for k, v in environ.items())}"

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.extra_environ}


# -- measuring ----------------------------------------------------------------------------------


def warm_natively(path: str) -> None:
    """Read every file and lstat every entry of `path` outside any overlay."""
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb", buffering=0) as f:
                    while f.read(1 << 20):
                        pass
        del st


def run_state(setup: Setup, ctx: BenchContext, workload: Workload, state: str,
              environ: dict[str, str] | None = None) -> dict[str, Any]:
    """One measurement, with the harness's handshake: the runner starts in the setup (the
    overlay mounted afresh), does the untimed prepare step and says "ready"; then the caches
    are dropped (and for fresh-warm the lower is read natively), and the runner goes on."""
    setup.reset(workload)

    def go(pid: int) -> None:
        ctx.gate.wait()
        drop_caches(3)
        if state == "fresh-warm":
            warm_natively(setup.tree() if isinstance(setup, NativeSetup) else ctx.lower)

    # Steady: a pass of the workload itself settles the caches before the timed one; one that
    # changes the tree cannot run twice, so a second warm-up pass settles them instead.
    settle_twice = state == "steady" and workload.mutates
    warm = 2 if settle_twice else state in ("second", "steady")
    result = run_runner(setup, ctx, workload, go, warm=warm,
                        repeat=2 if state == "steady" and not settle_twice else 1,
                        environ=environ,
                        label=f"{workload.name} ({state})")
    if state == "steady" and not settle_twice:  # the first pass only settled the caches
        result["seconds"] = result["seconds"][1:]
        result["requests"] = result.get("requests", [])[1:]
    return result


def run_all(ctx: BenchContext, setups: list[Setup], workloads: list[Workload],
            states: list[str], reps: int, results: list[Measurement]) -> list[Measurement]:
    """Appends each finished cell to `results` at once: a failure later keeps them."""
    started: list[Setup] = []
    try:
        for setup in setups:
            setup.start(ctx)
            started.append(setup)
        for workload in workloads:
            for state in states:
                cells = {s.name: Measurement(workload.name, s.name, state) for s in setups}
                for rep in range(reps):
                    order = setups[rep % len(setups):] + setups[:rep % len(setups)]
                    for setup in order:
                        _progress(f"{workload.name} {state} {rep + 1}/{reps} {setup.name}")
                        result = run_state(setup, ctx, workload, state)
                        cells[setup.name].seconds.extend(result["seconds"])
                        cells[setup.name].requests.extend(result.get("requests", []))
                        cells[setup.name].checks.append([result["check"], result["verify"]])
                results.extend(cells.values())
                # A journaled scratch filesystem: deleting between cells costs nothing later
                # (harness.Trash explains why the core benchmark waits), and what one cell
                # leaves would not fit many times over (seq write: 2.5 GiB per repetition).
                ctx.trash.empty()
    finally:
        for setup in reversed(started):
            setup.stop()
        ctx.trash.empty()
        _progress("")
    return results


def prepare_lowers(ctx: BenchContext, source: str) -> str:
    """The Django tree without .git (the git workload makes the repository) plus a dir of 100
    files to rename; and a second lower holding one 512 MiB file. Returns the second."""
    ctx.lower = os.path.join(ctx.workdir, "lower", os.path.basename(source.rstrip("/")))
    copy_tree(source, ctx.lower)
    remove(os.path.join(ctx.lower, ".git"))
    rename_dir = os.path.join(ctx.lower, RENAME_DIR)
    os.makedirs(rename_dir)
    donors = sorted(e.path for e in walk(ctx.lower) if e.is_file(follow_symlinks=False))
    for i in range(RENAME_FILES):
        shutil.copy2(donors[i * 7 % len(donors)], os.path.join(rename_dir, f"f{i:03d}"))
    big = os.path.join(ctx.workdir, "lower-seq", "big")
    os.makedirs(big)
    block = os.urandom(1 << 20)
    with open(os.path.join(big, "seq.bin"), "wb") as f:
        for _ in range(SEQ_SIZE_MIB):
            f.write(block)
    os.sync()
    return big


OPERATIONS_FILE = os.path.join("fusefs", "adapter.py")  # every request passes its handler
FUSE_HANDLERS = frozenset({
    "lookup", "forget", "getattr", "setattr", "readlink", "statfs", "access", "mknod", "mkdir",
    "symlink", "link", "unlink", "rmdir", "rename", "open", "create", "read", "write", "flush",
    "fsync", "release", "opendir", "readdir", "releasedir", "fsyncdir", "getxattr", "listxattr",
    "setxattr", "removexattr"})
# Where the daemon waits for the next request (fastloop's poll, trio's epoll).
IDLE_FUNCTIONS = frozenset({"<method 'poll' of 'select.poll' objects>",
                            "<method 'poll' of 'select.epoll' objects>"})


def profile(ctx: BenchContext, workload: Workload, state: str, top: int) -> dict[str, Any]:
    """One run of `workload` on agentfs with the daemon under cProfile."""
    import pstats

    setup = AgentfsSetup()
    setup.start(ctx)
    out = os.path.join(ctx.workdir, "agentfs.prof")
    try:
        result = run_state(setup, ctx, workload, state, environ={"AGENTFS_PROFILE": out})
        deadline = time.monotonic() + 20
        while not os.path.exists(out) and time.monotonic() < deadline:
            time.sleep(0.1)  # written by the daemon when its mount ends
        stats = pstats.Stats(out)
        rows = []
        raw = stats.stats  # type: ignore[attr-defined]
        for (filename, line, function), (_, calls, own, cumulative, _) in raw.items():
            where = (os.path.relpath(filename, REPO) if filename.startswith(REPO)
                     else os.path.basename(filename))
            rows.append({"function": f"{where}:{line}({function})", "calls": calls,
                         "self_s": own, "cumulative_s": cumulative})
        rows.sort(key=lambda r: r["self_s"], reverse=True)
        # One call of an Operations method per FUSE request (`_handler` wraps each in a
        # coroutine of the same code object, listed apart): the requests the kernel sent.
        handlers = [{"handler": function, "calls": calls, "cumulative_s": cumulative}
                    for (filename, _, function), (_, calls, _, cumulative, _) in raw.items()
                    if filename.endswith(OPERATIONS_FILE) and function in FUSE_HANDLERS]
        handlers.sort(key=lambda r: r["cumulative_s"], reverse=True)
        idle = sum(own for (_, _, function), (_, _, own, _, _) in raw.items()
                   if function in IDLE_FUNCTIONS)
        return {"workload": workload.name, "state": state, "seconds": result["seconds"],
                "total_s": stats.total_tt, "idle_s": idle,  # type: ignore[attr-defined]
                "requests": sum(h["calls"] for h in handlers),
                "handlers_s": sum(h["cumulative_s"] for h in handlers),
                "handlers": handlers, "top": rows[:top]}
    finally:
        setup.stop()


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [w.name for w in TREE_WORKLOADS + SEQ_WORKLOADS]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tree", help="benchmark this tree instead of the Django sdist")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--scratch-dir", metavar="DIR",
                   help="run in DIR's filesystem instead of a fresh loop-mounted ext4 image")
    p.add_argument("--scratch-size", default="16G")
    p.add_argument("--reps", type=int, default=3, help="measurements per cell (3)")
    p.add_argument("--workload", action="append", choices=names, help="only these (repeatable)")
    p.add_argument("--state", action="append", choices=STATES, help="only these (repeatable)")
    p.add_argument("--setup", action="append",
                   choices=list(SETUPS),
                   help=f"only these (repeatable; default: {', '.join(DEFAULT_SETUPS)})")
    p.add_argument("--quiet-threshold", type=float, default=0.25)
    p.add_argument("--quiet-timeout", type=float, default=20.0)
    p.add_argument("--profile", metavar="WORKLOAD", choices=names,
                   help="instead: profile the agentfs daemon on one workload (first --state)")
    p.add_argument("--json", nargs="?", const="", metavar="FILE")
    return p.parse_args(argv)


# Every setup --setup can name, made afresh for each run.
SETUPS: dict[str, Callable[[], Setup]] = {
    "native": NativeSetup,
    "overlay": KernelOverlaySetup,
    "fuse-overlayfs": FuseOverlayfsSetup,
    "agentfs": AgentfsSetup,
    # With an unpatched pyfuse3 (or AGENTFS_HANDLES set) agentfs answers opens with handles.
    "agentfs-handles": lambda: AgentfsSetup("agentfs-handles", {"AGENTFS_HANDLES": "1"}),
    "agentfs-pyfuse3-loop": lambda: AgentfsSetup("agentfs-pyfuse3-loop",
                                                 {"AGENTFS_PLAIN_LOOP": "1"}),
    # fastloop.py's spin off: the daemon sleeps at once after each answer.
    "agentfs-no-spin": lambda: AgentfsSetup("agentfs-no-spin", {SPIN_ENV: "0"}),
    # The spin on, whatever the machine's fuse.wake_here (which turns it off by default).
    "agentfs-spin": lambda: AgentfsSetup("agentfs-spin",
                                         {SPIN_ENV: str(round(SPIN_SECONDS * 1e6))}),
}
DEFAULT_SETUPS = ["native", "overlay", "fuse-overlayfs", "agentfs"]


def make_setups(chosen: list[str] | None) -> list[Setup]:
    return [SETUPS[name]() for name in chosen or DEFAULT_SETUPS]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("agentfs_bench: run as root (it drops caches and mounts)", file=sys.stderr)
        return 2
    if shutil.which("fuse-overlayfs") is None:
        print("agentfs_bench: apt-get install fuse-overlayfs", file=sys.stderr)
        return 2
    reexec_in_private_mount_namespace()
    source = os.path.realpath(args.tree) if args.tree else django_tree(args.cache_dir)
    many_inodes = ("mkfs.ext4", "-q", "-F", "-i", "4096")  # for the many small files
    with work_directory(args.scratch_dir, "agentfs-bench", args.cache_dir, "agentfs-",
                        args.scratch_size, many_inodes) as workdir:
        return run(args, source, workdir)


def run(args: argparse.Namespace, source: str, workdir: str) -> int:
    remove(workdir)
    os.makedirs(workdir)
    gate = QuietGate(args.quiet_threshold, args.quiet_timeout)
    ctx = BenchContext(workdir=workdir, source=source, gate=gate)
    states = args.state or list(STATES)
    chosen = set(args.workload or [w.name for w in TREE_WORKLOADS + SEQ_WORKLOADS])
    print(f"preparing {source} -> {workdir} ...", file=sys.stderr)
    big = prepare_lowers(ctx, source)
    os.environ.update(GIT_ENV)
    if args.profile:
        workload = next(w for w in TREE_WORKLOADS + SEQ_WORKLOADS if w.name == args.profile)
        if workload in SEQ_WORKLOADS:
            ctx.lower = big
        found = profile(ctx, workload, states[0], 30)
        requests, busy = found["requests"], found["total_s"] - found["idle_s"]
        print(f"agentfs, {found['workload']} ({found['state']}): "
              f"{format_seconds(found['seconds'][0])} (under the profiler); daemon "
              f"{found['total_s']:.2f} s profiled, of which {found['idle_s']:.2f} s waiting "
              f"for requests; {requests} requests, {requests / found['seconds'][0]:.0f}/s; "
              f"per request {busy / max(1, requests) * 1e6:.0f} µs busy, "
              f"{found['handlers_s'] / max(1, requests) * 1e6:.0f} µs in the handlers")
        rows = [[h["handler"], str(h["calls"]), f"{h['cumulative_s'] * 1000:.0f} ms",
                 f"{h['cumulative_s'] / h['calls'] * 1e6:.0f} µs"] for h in found["handlers"]]
        print_table("agentfs requests by handler (time inside the handler, profiled)",
                    ["handler", "requests", "total", "per request"], rows, left=1)
        rows = [[r["function"], str(r["calls"]), f"{r['self_s'] * 1000:.0f} ms",
                 f"{r['cumulative_s'] * 1000:.0f} ms"] for r in found["top"]]
        print_table("agentfs daemon profile, by own time", ["function", "calls", "self",
                                                            "cumulative"], rows, left=1)
        if args.json is not None:
            print(f"JSON: {write_json('agentfs-profile', found, args.json or None)}")
        return 0
    payload: dict[str, Any] = {
        "benchmark": "agentfs",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {**machine_info(), "filesystem": filesystem_of(workdir)},
        "tree": {"source": source, **tree_stats(ctx.lower)},
        "reps": args.reps, "states": states,
        "source": source_state(),
        "load_average_before": os.getloadavg(),
    }
    results: list[Measurement] = []
    tree_workloads = [w for w in TREE_WORKLOADS if w.name in chosen]
    seq_workloads = [w for w in SEQ_WORKLOADS if w.name in chosen]
    began = time.monotonic()
    failure: BenchError | None = None
    try:
        if tree_workloads:
            run_all(ctx, make_setups(args.setup), tree_workloads, states, args.reps, results)
        if seq_workloads:
            seq_ctx = BenchContext(workdir=os.path.join(workdir, "seq"), source=big, gate=gate)
            os.makedirs(seq_ctx.workdir)
            seq_ctx.lower = big
            run_all(seq_ctx, make_setups(args.setup), seq_workloads, states, args.reps, results)
    except BenchError as e:  # report (and save) the cells measured so far, then fail
        failure = e
        payload["failure"] = str(e)
    payload["results"] = [m.as_dict() for m in results]
    payload["inconsistent_checks"] = inconsistent_checks(results)
    payload["quiet_gate"] = gate.summary()
    payload["elapsed_seconds"] = time.monotonic() - began
    payload["load_average_after"] = os.getloadavg()
    report(results, [s.name for s in make_setups(args.setup)], payload)
    if args.json is not None:
        print(f"JSON: {write_json('agentfs', payload, args.json or None)}")
    if failure is not None:
        raise failure
    return 0


def report(results: list[Measurement], setups: list[str], payload: dict[str, Any],
           ratios: list[tuple[str, str]] | None = None) -> None:
    """The table of medians, with the ratios of the setup pairs given (default: agentfs's)."""
    cell = {(m.workload, m.cache, m.setup): m for m in results}
    keys = list(dict.fromkeys((m.workload, m.cache) for m in results))
    if ratios is None:
        ratios = [(a, b) for a, b in (("agentfs", "native"), ("fuse-overlayfs", "native"),
                                      ("agentfs", "fuse-overlayfs"))
                  if a in setups and b in setups]
    header = ["workload", "state", *setups, *(f"{a} / {b}" for a, b in ratios)]
    rows = []
    for workload, state in keys:
        row = [workload, state]
        for s in setups:
            m = cell.get((workload, state, s))
            row.append(format_seconds(statistics.median(m.seconds)) if m else "")
        for a, b in ratios:
            ma, mb = cell.get((workload, state, a)), cell.get((workload, state, b))
            row.append(f"{ma.median / mb.median:.2f}×" if ma and mb and mb.median else "")
        rows.append(row)
    print_table("median time per workload and cache state (every overlay freshly mounted)",
                header, rows)
    for problem in payload["inconsistent_checks"]:
        print(f"WARNING: check values differ between runs/setups: {problem}")
    gate = payload["quiet_gate"]
    print(f"(whole run: {payload['elapsed_seconds']:.0f} s; {gate['busy_starts']} of "
          f"{gate['starts']} measurements started while other processes used more than "
          f"{gate['threshold']:.0%} of the CPUs)")


def _progress(message: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{message}")
        sys.stderr.flush()


if __name__ == "__main__":
    run_script(main, "agentfs_bench")
