"""Guard-mode benchmark: what backup-on-delete costs, and how fast backupd drains.

    1. rm -rf of a 10 000-file tree (100 dirs x 100 files of 1 KiB): natively, and under
       `agentctl guard` (default group durability, and --sync). Target: guard <= 5x native.
    2. backupd draining what that rm staged (10 000 small items) into the local bucket.
    3. upload throughput of big files into the local bucket (target >= 200 MB/s) and into an
       S3-compatible server (moto's, started here on 127.0.0.1).

Every timed step is preceded by `sync`; rm is timed end to end as a user runs it (process
start included); uploads are timed in process (Worker.run_once until nothing is due), so
Python's start-up is not counted. Repetitions are interleaved (native, guard, guard --sync).

Run it as root (guard mounts FUSE over a directory):

    sudo .venv/bin/python benchmarks/guard_bench.py            # 3 repetitions
    sudo .venv/bin/python benchmarks/guard_bench.py --reps 1 --no-s3

The JSON report goes to stdout (with --json) and to benchmarks/results/guard-<time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
# Not /var/tmp/ia-*: test sessions judge mounts there as their own leaks.
DEFAULT_DIR = "/var/tmp/isolated-agent-guard-bench"


def agentctl(home: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "isolated_agent", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ISOLATED_AGENT_HOME": home, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"agentctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def make_tree(root: str, dirs: int, files: int, size: int) -> None:
    block = os.urandom(size)
    for d in range(dirs):
        path = os.path.join(root, f"d{d:03d}")
        os.makedirs(path)
        for f in range(files):
            with open(os.path.join(path, f"f{f:03d}"), "wb") as out:
                out.write(block[f:] + block[:f])


def timed_rm(path: str) -> float:
    os.sync()
    start = time.perf_counter()
    subprocess.run(["rm", "-rf", path], check=True)
    return time.perf_counter() - start


@contextlib.contextmanager
def guarded(home: str, directory: str, *args: str) -> Iterator[None]:
    agentctl(home, "guard", "start", directory, "--no-backupd", *args)
    try:
        yield
    finally:
        agentctl(home, "guard", "stop", directory)


def drain(home: str, env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """Upload everything staged, in process; (seconds, items, bytes)."""
    saved = dict(os.environ)
    os.environ.update({"ISOLATED_AGENT_HOME": home, **(env or {})})
    try:
        from isolated_agent.backupd import Settings, Worker

        worker = Worker(home, Settings(batch=256))
        try:
            worker.reconcile()
            items = worker.catalog.items(state="staged")
            size = sum(e.size for e in worker.catalog.find() if e.id in
                       {i.event_id for i in items})
            os.sync()
            start = time.perf_counter()
            while worker.run_once():
                pass
            elapsed = time.perf_counter() - start
            left = worker.catalog.counts().get("staged", 0)
            if left:
                raise SystemExit(f"{left} items were not uploaded: {worker.catalog.items()[:3]}")
        finally:
            worker.close()
        return elapsed, len(items), size
    finally:
        os.environ.clear()
        os.environ.update(saved)


def rm_benchmark(work: str, reps: int, dirs: int, files: int, size: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {"native": [], "guard": [], "guard --sync": []}
    drains: list[tuple[float, int, int]] = []
    for rep in range(reps):
        order = list(times)
        order = order[rep % 3:] + order[:rep % 3]
        for setup in order:
            base = os.path.join(work, f"rm-{setup.replace(' ', '')}-{rep}")
            home = os.path.join(work, f"home-rm-{rep}-{setup.replace(' ', '')}")
            tree = os.path.join(base, "tree")
            make_tree(tree, dirs, files, size)
            if setup == "native":
                times[setup].append(timed_rm(tree))
            else:
                extra = ("--sync",) if setup.endswith("--sync") else ()
                with guarded(home, base, *extra):
                    times[setup].append(timed_rm(tree))
                if setup == "guard":
                    drains.append(drain(home))
            shutil.rmtree(base)
            shutil.rmtree(home, ignore_errors=True)
            print(f"  rep {rep + 1}: {setup:13} {times[setup][-1]:.2f} s", file=sys.stderr)
    native = statistics.median(times["native"])
    result: dict[str, Any] = {
        "files": dirs * files, "file_size": size,
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "samples": times,
        "ratio": {k: statistics.median(v) / native for k, v in times.items() if k != "native"},
    }
    seconds = statistics.median(d[0] for d in drains)
    result["drain_small_local"] = {"seconds": seconds, "items": drains[0][1],
                                   "items_per_s": drains[0][1] / seconds}
    return result


def stage_big(work: str, home: str, name: str, count: int, mib: int) -> None:
    base = os.path.join(work, name)
    os.makedirs(base)
    for i in range(count):
        with open(os.path.join(base, f"big{i}"), "wb") as out:
            for _ in range(mib):
                out.write(os.urandom(1 << 20))
    with guarded(home, base):
        subprocess.run(["rm", "-f", *[os.path.join(base, f"big{i}") for i in range(count)]],
                       check=True)


def throughput(work: str, name: str, count: int, mib: int,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    home = os.path.join(work, f"home-{name}")
    stage_big(work, home, name, count, mib)
    seconds, items, size = drain(home, env)
    shutil.rmtree(os.path.join(work, name))
    shutil.rmtree(home, ignore_errors=True)
    return {"files": items, "bytes": size, "seconds": seconds, "mb_per_s": size / seconds / 1e6}


@contextlib.contextmanager
def moto_server(log: str) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("moto server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=DEFAULT_DIR, help="work directory (its filesystem "
                        "is the one measured; the store goes there too)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dirs", type=int, default=100)
    parser.add_argument("--files", type=int, default=100, help="files per directory")
    parser.add_argument("--file-size", type=int, default=1024)
    parser.add_argument("--big-files", type=int, default=4)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--s3-mib", type=int, default=64, help="size of each of 4 S3 files")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the guard mounts FUSE over a directory")
    sys.path.insert(0, REPO)
    work = os.path.abspath(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    report: dict[str, Any] = {"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "kernel": os.uname().release, "cpus": os.cpu_count(),
                              "load_before": os.getloadavg()}
    try:
        print("rm -rf, native vs guard:", file=sys.stderr)
        report["rm_rf"] = rm_benchmark(work, args.reps, args.dirs, args.files, args.file_size)
        print("upload, local bucket:", file=sys.stderr)
        report["upload_local"] = throughput(work, "big-local", args.big_files, args.big_mib)
        if not args.no_s3:
            print("upload, moto S3 server:", file=sys.stderr)
            with moto_server(os.path.join(work, "moto.log")) as endpoint:
                from isolated_agent.backup.config import BucketConfig
                from isolated_agent.backup.s3 import S3BlobStore

                config = BucketConfig(type="s3", bucket="bench", endpoint=endpoint,
                                      access_key_id="x", secret_access_key="y")
                S3BlobStore(config, os.path.join(work, "spool")).ensure_bucket()
                env = {"ISOLATED_AGENT_S3_BUCKET": "bench", "ISOLATED_AGENT_S3_ENDPOINT":
                       endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                       "NO_PROXY": "127.0.0.1"}
                report["upload_s3_moto"] = throughput(work, "big-s3", 4, args.s3_mib, env)
        report["load_after"] = os.getloadavg()
    finally:
        with open("/proc/self/mountinfo") as mounts:
            leftovers = [line.split()[4] for line in mounts if work in line.split()[4]]
        for mount_point in leftovers:
            subprocess.run(["umount", "-l", mount_point], check=False)
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"guard-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    rm = report["rm_rf"]
    print(f"\nrm -rf of {rm['files']} files: native {rm['seconds']['native']:.2f} s, "
          f"guard {rm['seconds']['guard']:.2f} s ({rm['ratio']['guard']:.2f}x, bar <= 5x), "
          f"guard --sync {rm['seconds']['guard --sync']:.2f} s "
          f"({rm['ratio']['guard --sync']:.2f}x)", file=sys.stderr)
    small = rm["drain_small_local"]
    print(f"backupd, {small['items']} small staged files -> local bucket: "
          f"{small['seconds']:.2f} s ({small['items_per_s']:.0f} files/s)", file=sys.stderr)
    for key, label in (("upload_local", "local bucket"), ("upload_s3_moto", "moto S3")):
        if key in report:
            up = report[key]
            print(f"upload {up['bytes'] / 2**20:.0f} MiB in {up['files']} files -> {label}: "
                  f"{up['mb_per_s']:.0f} MB/s", file=sys.stderr)
    print(f"report: {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
