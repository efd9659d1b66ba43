#!/usr/bin/env python3
"""Benchmark: `agentctl commit` (backup included) against `cp -a` of the same data, and
`agentctl diff --stat` over many changed files.

Scenarios, each measured in the same run, same filesystem, warm page cache, `sync` before every
timed step so one step's writeback is not billed to the next:

  small  a project of N small files (default 10 000 x 4 KiB); a job run with `agentctl run`
         appends a line to every one of them. Timed: `agentctl diff --stat` (warm, and with the
         files' data evicted from the page cache first), `agentctl commit`
         (backs up the 10 000 old versions, applies the new ones, empties the env), and the
         baseline `cp -a` of the env's changed files over a copy of the original project.
  large  a project holding one file of SIZE (default 1 GiB); the job appends a byte to it (a
         copy-up of the whole file). Timed: `agentctl commit` (backs up the old GiB, applies the
         new one) against `cp -a` of the new file over a copy of the original.

Commands are timed end to end as a user runs them (Python start-up included). The ratio
commit / cp -a is the figure the issue sets a bar for (<= 2). `cp -a + sync` is shown too:
commit makes its writes durable (two syncfs barriers), cp -a does not.

    sudo python3 benchmarks/commit_bench.py                 # everything, 3 repetitions
    sudo python3 benchmarks/commit_bench.py --only small --files 2000 --reps 1   # quick look

Results go to stdout and, as JSON, to benchmarks/results/commit-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


def sh(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(argv)}\n{done.stderr.strip()}")
    return done.stdout


def timed(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> float:
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    sh(*argv, cwd=cwd, env=env)
    return time.perf_counter() - start


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.store = workdir / "store"
        self.env = dict(os.environ, ISOLATED_AGENT_HOME=str(self.store),
                        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def agentctl(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "isolated_agent", *args]

    def fresh(self, name: str, pristine: Path) -> tuple[Path, Path]:
        """A project copied from `pristine`, and a reference copy for the cp -a baseline."""
        project, reference = self.workdir / name, self.workdir / f"{name}-cp"
        for path in (project, reference):
            shutil.rmtree(path, ignore_errors=True)
            sh("cp", "-a", str(pristine), str(path))
        return project, reference

    def upper(self, env_name: str) -> Path:
        data = json.loads(sh(*self.agentctl("env", "show", env_name, "--json"), env=self.env))
        return Path(data["roots"][0]["upper"])

    def run_scenario(
        self, name: str, pristine: Path, job: str, with_diff: bool
    ) -> dict[str, float]:
        project, reference = self.fresh(name, pristine)
        env_name = f"bench-{name}"
        shutil.rmtree(self.store, ignore_errors=True)  # a fresh env and an empty backup store
        sh(*self.agentctl("run", "-q", "--env", env_name, "--", "sh", "-c", job),
           cwd=project, env=self.env)
        changed = self.workdir / f"{name}-changed"
        shutil.rmtree(changed, ignore_errors=True)
        sh("cp", "-a", str(self.upper(env_name)), str(changed))
        result: dict[str, float] = {}
        if with_diff:
            result["diff_stat"] = timed(*self.agentctl("diff", "--stat", env_name),
                                        cwd=project, env=self.env)
            evict(project, self.upper(env_name))
            result["diff_stat_cold"] = timed(*self.agentctl("diff", "--stat", env_name),
                                             cwd=project, env=self.env)
        result["commit"] = timed(*self.agentctl("commit", env_name), cwd=project, env=self.env)
        result["cp_a"] = timed("cp", "-a", f"{changed}/.", f"{reference}/")
        start = time.perf_counter()
        subprocess.run(["sync"], check=True)
        result["cp_a_sync"] = result["cp_a"] + time.perf_counter() - start
        check = subprocess.run(["diff", "-r", "-q", str(project), str(reference)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"commit and cp -a disagree:\n{check.stdout[:2000]}")
        for path in (project, reference, changed):
            shutil.rmtree(path, ignore_errors=True)
        return result


def evict(*trees: Path) -> None:
    """Drop these trees' file data from the page cache (posix_fadvise DONTNEED): a cold read
    of them, without dropping every cache on the machine."""
    for tree in trees:
        for folder, _, names in os.walk(tree):
            for name in names:
                try:
                    fd = os.open(os.path.join(folder, name),
                                 os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def make_small(path: Path, files: int, size: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    per_dir = 100
    for index in range(files):
        folder = path / f"d{index // per_dir:04d}"
        if index % per_dir == 0:
            folder.mkdir(parents=True)
        line = b"file %08d, a line of text to fill it up\n" % index  # unique: no dedup
        body = (line * (size // len(line) + 1))[:size]
        (folder / f"f{index % per_dir:03d}.txt").write_bytes(body)


def make_large(path: Path, size: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    block = os.urandom(1 << 20)
    with open(path / "big.bin", "wb") as f:
        for index in range(size >> 20):
            f.write(block[:-8] + index.to_bytes(8, "little"))


def summarize(samples: list[dict[str, float]]) -> dict[str, Any]:
    keys = samples[0].keys()
    median = {k: statistics.median(s[k] for s in samples) for k in keys}
    return {
        "median_s": {k: round(v, 3) for k, v in median.items()},
        "samples_s": [{k: round(v, 3) for k, v in s.items()} for s in samples],
        "commit_over_cp_a": round(median["commit"] / median["cp_a"], 2),
        "commit_over_cp_a_sync": round(median["commit"] / median["cp_a_sync"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/var/tmp/isolated-agent-commit-bench",
                        help="work directory (its filesystem is the one measured)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--file-size", type=int, default=4096)
    parser.add_argument("--large-mib", type=int, default=1024)
    parser.add_argument("--only", choices=["small", "large"])
    args = parser.parse_args()

    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(workdir)
    report: dict[str, Any] = {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "filesystem": sh("stat", "-f", "-c", "%T", str(workdir)).strip()},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if args.only in (None, "small"):
        pristine = workdir / "pristine-small"
        make_small(pristine, args.files, args.file_size)
        job = "for f in */*.txt; do printf 'changed\\n' >> \"$f\"; done"
        samples = [bench.run_scenario("small", pristine, job, with_diff=True)
                   for _ in range(args.reps)]
        report["small"] = {"files": args.files, "file_size": args.file_size,
                           **summarize(samples)}
        shutil.rmtree(pristine)
    if args.only in (None, "large"):
        pristine = workdir / "pristine-large"
        make_large(pristine, args.large_mib << 20)
        samples = [bench.run_scenario("large", pristine, "printf x >> big.bin", with_diff=False)
                   for _ in range(args.reps)]
        report["large"] = {"size_mib": args.large_mib, **summarize(samples)}
        shutil.rmtree(pristine)
    shutil.rmtree(bench.store, ignore_errors=True)

    print(json.dumps(report, indent=2))
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"commit-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
