"""The copy engine (issue 15): how long cloning a project for a job takes, against
`cp -a --reflink=auto` of the same tree, and what recording an unchanged clone costs after it.

    sudo .venv/bin/python benchmarks/copy_bench.py --json
    sudo .venv/bin/python benchmarks/copy_bench.py --mkfs 'mkfs.xfs -q -f -m reflink=1'

For each of --reps rounds, in alternating order: `cp -a --reflink=auto TREE DEST` (a process,
timed whole) and the library's `env.clone.materialize` of an env over TREE (what `run --engine
copy` does before the job, in-process); then `env.clone.record` of that untouched clone (the walk
after the job). Page cache warm (one untimed pass of each first). Runs as root, in a private
mount namespace, on a fresh filesystem image (ext4 by default: no reflinks, so both copy the
data; with --mkfs of a reflink filesystem both share extents).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from core_bench import django_tree  # noqa: E402
from harness import (  # noqa: E402
    DEFAULT_CACHE_DIR,
    filesystem_of,
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

from isolated_agent.env import clone  # noqa: E402
from isolated_agent.env.store import Store  # noqa: E402

TARGET_RATIO = 1.5  # materialize / cp -a --reflink=auto


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tree", help="benchmark this tree instead of the Django sdist")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    p.add_argument("--scratch-dir", metavar="DIR",
                   help="run in DIR's filesystem instead of a fresh loop-mounted image")
    p.add_argument("--scratch-size", default="4G")
    p.add_argument("--mkfs", default="mkfs.ext4 -q -F", help="how the image is made")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", nargs="?", const="", metavar="FILE")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("copy_bench: run as root (it mounts a scratch filesystem)", file=sys.stderr)
        return 2
    reexec_in_private_mount_namespace()
    source = os.path.realpath(args.tree) if args.tree else django_tree(args.cache_dir)
    with work_directory(args.scratch_dir, "copy-bench", args.cache_dir, "copy-",
                        args.scratch_size, args.mkfs.split()) as workdir:
        os.makedirs(workdir, exist_ok=True)
        tree = os.path.join(workdir, "tree")
        sh(["cp", "-a", source, tree])
        store = Store(os.path.join(workdir, "store"))
        [root] = store.create("bench", [tree]).roots
        times: dict[str, list[float]] = {"cp -a --reflink=auto": [], "materialize": [],
                                         "record (unchanged)": []}

        def cp_once(timing: bool) -> None:
            dest = os.path.join(workdir, "cp-copy")
            seconds = timed(lambda: subprocess.run(["cp", "-a", "--reflink=auto", tree, dest],
                                                   check=True))
            if timing:
                times["cp -a --reflink=auto"].append(seconds)
            remove(dest)

        def materialize_once(timing: bool) -> None:
            dest = os.path.join(workdir, "clone")
            made: list[clone.Clone] = []
            seconds = timed(lambda: made.append(clone.materialize(root, dest)))
            recorded = timed(lambda: clone.record(made[0]))
            if timing:
                times["materialize"].append(seconds)
                times["record (unchanged)"].append(recorded)
            remove(dest)

        cp_once(False)
        materialize_once(False)
        for rep in range(args.reps):
            order = (cp_once, materialize_once) if rep % 2 == 0 else (materialize_once, cp_once)
            for step in order:
                sh(["sync"])
                step(True)
        fstype = filesystem_of(workdir)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["materialize"] / medians["cp -a --reflink=auto"]
    files = sum(len(f) + len(d) for _, d, f in os.walk(source))
    rows = [[name, fstype, f"{medians[name]:.3f}", f"{min(values):.3f}", f"{max(values):.3f}"]
            for name, values in times.items()]
    print_table(f"Cloning {files} entries ({os.path.basename(source)}), {args.reps} runs",
                ["step", "filesystem", "median s", "min s", "max s"], rows)
    print(f"materialize / cp -a --reflink=auto = {ratio:.2f}x (target <= {TARGET_RATIO}x)")
    if args.json is not None:
        path = write_json("copy", {
            "machine": machine_info(), "source": source_state(), "tree": source,
            "entries": files, "filesystem": fstype, "reps": args.reps, "times": times,
            "medians": medians, "ratio": ratio, "target": TARGET_RATIO,
        }, args.json or None)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
