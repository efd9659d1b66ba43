"""The benchmark harness: setups × workloads × cache states, measured the same way in each.

A *setup* is a way of presenting the tree to a program: the native directory, a kernel overlayfs
mounted by hand, an `agentctl run` job, ... A *workload* (workloads.py) is what the program does
to the tree. For every (workload, cache state, repetition) the harness

    1. resets each setup to the same starting state (fresh copy / empty upper / discard),
    2. syncs, and for the cold variant drops the page cache, dentries and inodes
       (`echo 3 > /proc/sys/vm/drop_caches`, so this runs as root),
    3. starts the *runner* (workloads.py run as a script) inside the setup; the runner times the
       workload itself and prints JSON, so a setup's own start-up cost is never counted.

Repetitions are interleaved (rep 1 of every setup, then rep 2, ... with the setup order rotated)
so a slow drift of the machine spreads over all setups instead of biasing one.

Adding a setup: subclass `Setup`, give it a `name`, and implement `tree()` (the path the runner
works on), `command(argv)` (how to run argv in the setup) and whichever of `start`, `reset`,
`stop` it needs. See `KernelOverlaySetup` for a twenty-line example.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workloads import GIT_ENV, Workload  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(BENCH_DIR, "workloads.py")
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
DEFAULT_CACHE_DIR = "/var/tmp/isolated-agent-bench"


class BenchError(Exception):
    pass


def run_script(main: Callable[[], int], name: str) -> NoReturn:
    """A benchmark script's `__main__`: SIGTERM unwinds like Ctrl-C, so every finally clause
    unmounts and removes what it made; a BenchError is one line on stderr and exit status 1."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


# -- system helpers -----------------------------------------------------------------------------


def sh(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, fail loudly with its stderr."""
    done = subprocess.run(list(argv), text=True, capture_output=True, **kwargs)
    if done.returncode != 0:
        raise BenchError(
            f"command failed ({done.returncode}): {' '.join(argv)}\n{done.stderr.strip()}"
        )
    return done


EXT4_IOC_CHECKPOINT = 0x4004662B  # _IOW('f', 43, __u32), Linux 5.13


def drop_caches(what: int = 3, checkpoint: str | None = None) -> None:
    """1: the page cache (file data, directory and inode-table blocks); 3: that plus the
    dentry and inode caches.

    `checkpoint`: a path on an ext4 filesystem whose journal is checkpointed first. Metadata
    blocks written in the last moments (a tree copied just before a run) stay pinned by the
    journal until they are checkpointed, and drop_caches cannot drop them: without this, a
    "cold" run on a fresh copy finds its directories and inodes still cached."""
    os.sync()
    if checkpoint is not None:
        with contextlib.suppress(OSError):  # not ext4, or no journal: nothing is pinned
            fd = os.open(checkpoint, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.ioctl(fd, EXT4_IOC_CHECKPOINT, struct.pack("I", 0))
            finally:
                os.close(fd)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write(f"{what}\n")


def remove(path: str) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path)


def copy_tree(source: str, dest: str) -> None:
    remove(dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    sh(["cp", "-a", "--reflink=auto", source, dest])


class Trash:
    """Where resets put what they replace, deleted only at the end of the run.

    Deleting thousands of files between repetitions would change what is measured next: ext4
    without a journal (this project's benchmark machine) skips inodes deleted in the last
    60 s (300 s while their inode-table block is dirty) when it allocates new ones, and scans
    past every one of them for each allocation, so creating files right after a big delete is
    many times slower, by an amount that depends on the history. A rename costs nothing."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.count = 0

    def discard(self, path: str) -> None:
        if os.path.lexists(path):
            os.makedirs(self.path, exist_ok=True)
            self.count += 1
            os.rename(path, os.path.join(self.path, f"{self.count}-{os.path.basename(path)}"))

    def empty(self) -> None:
        remove(self.path)


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait


def cpu_busy(window: float = 0.2) -> float:
    """The fraction of all CPUs' time spent busy during `window` seconds (we sleep meanwhile,
    so this is everybody else)."""
    total0, idle0 = _cpu_times()
    time.sleep(window)
    total1, idle1 = _cpu_times()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


@dataclass
class QuietGate:
    """Before each measurement, wait (up to `timeout` s) until other processes use at most
    `threshold` of the CPUs: on a shared machine a test suite running beside the benchmark
    otherwise decides the numbers. Counts the runs that started busy anyway."""

    threshold: float = 0.25
    timeout: float = 15.0
    waited: float = 0.0
    busy_starts: int = 0
    starts: int = 0

    def wait(self) -> bool:
        self.starts += 1
        if self.threshold >= 1:
            return True
        deadline = time.monotonic() + self.timeout
        start = time.monotonic()
        while cpu_busy() > self.threshold:
            if time.monotonic() > deadline:
                self.busy_starts += 1
                self.waited += time.monotonic() - start
                return False
        self.waited += time.monotonic() - start
        return True

    def summary(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "timeout": self.timeout, "starts": self.starts,
                "busy_starts": self.busy_starts, "waited_seconds": round(self.waited, 1)}


def git(tree: str, *args: str) -> str:
    return sh(["git", "-C", tree, *args], env={**os.environ, **GIT_ENV}).stdout


def make_git_repo(tree: str) -> None:
    """Give a tree one commit with everything in it, objects packed (so that a later commit
    does not trigger an automatic gc), unless it already is a repository."""
    if not os.path.isdir(os.path.join(tree, ".git")):
        git(tree, "init", "-q", "-b", "main")
        git(tree, "add", "-A")
        git(tree, "commit", "-q", "-m", "the tree as extracted")
    git(tree, "gc", "-q", "--prune=now")


def refresh_git_index(tree: str) -> None:
    """Make the index's stat data match the files of this copy (cp gives new inodes and
    ctimes), so `git add -A` does not rehash every file in one setup and not in another."""
    if os.path.isdir(os.path.join(tree, ".git")):
        sh(["git", "-C", tree, "update-index", "-q", "--refresh"], env={**os.environ, **GIT_ENV})


def runner_python() -> str:
    """An interpreter visible inside every setup (an agentctl job's /tmp is private, so not a
    virtualenv under /tmp), used for the runner everywhere."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
        real = os.path.realpath(candidate)
        if os.path.exists(real) and not real.startswith(("/tmp/", "/dev/shm/")):
            return candidate
    raise BenchError("no python3 outside /tmp to run the workloads with")


def machine_info() -> dict[str, Any]:
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    info: dict[str, Any] = {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
    }
    # What sets the price of a FUSE request on this machine (fuse_floor_bench.py).
    for name, parameter in (("fuse.wake_here", "/sys/module/fuse/parameters/wake_here"),
                            ("haltpoll.guest_halt_poll_ns",
                             "/sys/module/haltpoll/parameters/guest_halt_poll_ns")):
        with contextlib.suppress(OSError), open(parameter) as f:
            info[name] = f.read().strip()
    return info


def source_state(repo: str = os.path.dirname(BENCH_DIR)) -> dict[str, Any]:
    """The commit of the code being measured, and which of its files differ from it."""
    def out(*args: str) -> str:
        done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)
        return done.stdout.strip()

    return {"commit": out("rev-parse", "HEAD"),
            "changed": out("status", "--porcelain", "--", "isolated_agent").splitlines()}


def filesystem_of(path: str) -> str:
    done = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", path], capture_output=True, text=True
    )
    return done.stdout.strip()


PRIVATE_NAMESPACE_MARK = "ISOLATED_AGENT_BENCH_PRIVATE_MOUNTS"


def reexec_in_private_mount_namespace() -> None:
    """Run the rest of this benchmark in a mount namespace of its own (private propagation),
    so whatever it mounts never appears in the host's mount table and vanishes when it exits,
    however it exits. (It also keeps the mounts out of reach of anything that sweeps "new"
    host mounts, like the test suite's leak check does while a test runs.)"""
    if os.environ.get(PRIVATE_NAMESPACE_MARK):
        return
    os.environ[PRIVATE_NAMESPACE_MARK] = "1"
    argv = ["unshare", "--mount", "--propagation", "private", "--",
            sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]]
    os.execvp(argv[0], argv)


def detach_loops_of(image: str) -> None:
    """Loop devices still attached to `image` (left by a run that was killed)."""
    done = subprocess.run(["losetup", "-j", image], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        device = line.split(":", 1)[0]
        subprocess.run(["losetup", "-d", device], capture_output=True)


@contextlib.contextmanager
def scratch_filesystem(image: str, mount_point: str, size: str = "4G",
                       mkfs: Sequence[str] = ("mkfs.ext4", "-q", "-F")) -> Iterator[str]:
    """A new, empty filesystem (ext4 with its default journal) in a sparse image file, loop-
    mounted with direct I/O (so the loop device adds no second page cache) at `mount_point`;
    unmounted, detached and deleted on the way out, also after a failure.

    Every run starts from the same empty filesystem, so runs are comparable, and nothing
    depends on what the host filesystem went through before: this machine's root filesystem
    is ext4 *without* a journal, where creating files soon after deleting many is many times
    slower than usual (see Trash), which no ordinary ext4 does."""
    os.makedirs(os.path.dirname(image), exist_ok=True)
    detach_loops_of(image)
    with open(image, "wb") as f:
        f.truncate(parse_size(size))
    loop = ""
    mounted = False
    try:
        sh([*mkfs, image])
        loop = sh(["losetup", "--find", "--show", "--direct-io=on", image]).stdout.strip()
        os.makedirs(mount_point, exist_ok=True)
        sh(["mount", loop, mount_point])
        mounted = True
        yield mount_point
    finally:
        if mounted and subprocess.run(["umount", mount_point], capture_output=True).returncode:
            subprocess.run(["umount", "-l", mount_point], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)
        with contextlib.suppress(OSError):
            os.rmdir(mount_point)


@contextlib.contextmanager
def work_directory(scratch_dir: str | None, name: str, cache_dir: str, prefix: str, size: str,
                   mkfs: Sequence[str] = ("mkfs.ext4", "-q", "-F")) -> Iterator[str]:
    """Where a benchmark works: `<scratch_dir>/<name>` when the user named a directory
    (removed afterwards), else `work/` in a fresh `scratch_filesystem` whose image and mount
    point live in `cache_dir`, their names starting with `prefix`."""
    if scratch_dir:
        workdir = os.path.join(os.path.realpath(scratch_dir), name)
        try:
            yield workdir
        finally:
            remove(workdir)
        return
    with scratch_filesystem(os.path.join(cache_dir, f"{prefix}scratch.img"),
                            os.path.join(cache_dir, f"{prefix}mnt"), size, mkfs) as mounted:
        yield os.path.join(mounted, "work")


def parse_size(size: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    if size[-1:].upper() in units:
        return int(float(size[:-1]) * units[size[-1].upper()])
    return int(size)


# -- setups -------------------------------------------------------------------------------------


@dataclass
class BenchContext:
    """What every setup shares: a scratch directory and the tree, prepared once."""

    workdir: str  # scratch space for this run, on the filesystem being measured
    source: str  # the reference tree (read-only for the harness)
    lower: str = ""  # a prepared copy (git repo, index fresh); the overlays' lower layer
    python: str = field(default_factory=runner_python)
    gate: QuietGate = field(default_factory=QuietGate)
    trash: Trash = field(init=False)

    def __post_init__(self) -> None:
        self.trash = Trash(os.path.join(self.workdir, "trash"))

    def prepare(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        self.lower = os.path.join(self.workdir, "lower", os.path.basename(self.source.rstrip("/")))
        copy_tree(self.source, self.lower)
        # Owned by whoever runs the benchmark, as a project is: an agentctl job has no
        # capabilities, so even root could not change files owned by someone else in it.
        sh(["chown", "-R", f"{os.getuid()}:{os.getgid()}", self.lower])
        make_git_repo(self.lower)
        refresh_git_index(self.lower)


class Setup:
    """A way to run the runner against the tree. Override what you need."""

    name = "setup"
    description = ""

    def start(self, ctx: BenchContext) -> None:
        """Once, before any measurement."""
        self.ctx = ctx

    def reset(self, workload: Workload) -> None:
        """Before every repetition: back to the starting state."""

    def tree(self) -> str:
        """The path the workload runs against, as the runner sees it."""
        raise NotImplementedError

    def command(self, argv: list[str]) -> list[str]:
        """The command that runs argv inside this setup."""
        return argv

    def environ(self) -> dict[str, str]:
        return dict(os.environ)

    def stop(self) -> None:
        """Once at the end, also after a failure: unmount, remove, kill what start made."""


class NativeSetup(Setup):
    name = "native"
    description = "the tree on the host filesystem (a fresh copy for workloads that change it)"

    def start(self, ctx: BenchContext) -> None:
        super().start(ctx)
        self.path = os.path.join(ctx.workdir, self.name, os.path.basename(ctx.lower))
        self._fresh = False

    def reset(self, workload: Workload) -> None:
        if workload.mutates or not self._fresh:
            self.ctx.trash.discard(self.path)
            copy_tree(self.ctx.lower, self.path)
            refresh_git_index(self.path)
            self._fresh = not workload.mutates

    def tree(self) -> str:
        return self.path

    def stop(self) -> None:
        remove(os.path.dirname(self.path))


def overlay_options(lower: str, upper: str, work: str, extra: Iterable[str] = ()) -> str:
    def escape(path: str) -> str:
        return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")

    return ",".join(
        [f"lowerdir={escape(lower)}", f"upperdir={escape(upper)}", f"workdir={escape(work)}",
         *extra]
    )


class KernelOverlaySetup(Setup):
    """Kernel overlayfs mounted by hand over the tree at its own path, in a private mount
    namespace of `unshare -m` (so the mount never exists on the host and vanishes with the
    runner), with the options the kernel engine uses: userxattr, nosuid, nodev."""

    name = "overlay"
    description = "kernel overlayfs (userxattr) mounted by hand with unshare -m, empty upper"

    def start(self, ctx: BenchContext) -> None:
        super().start(ctx)
        self.base = os.path.join(ctx.workdir, "overlay")
        self.upper = os.path.join(self.base, "upper")
        self.work = os.path.join(self.base, "work")

    def reset(self, workload: Workload) -> None:
        for part in (self.upper, self.work):
            self.ctx.trash.discard(part)
            os.makedirs(part)

    def tree(self) -> str:
        return self.ctx.lower

    def command(self, argv: list[str]) -> list[str]:
        options = overlay_options(self.ctx.lower, self.upper, self.work,
                                  ["userxattr", "nosuid", "nodev"])
        script = 'mount -t overlay overlay -o "$1" "$2" && shift 2 && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "--",
                "/bin/sh", "-c", script, "sh", options, self.ctx.lower, *argv]

    def stop(self) -> None:
        remove(self.base)


class AgentctlSetup(Setup):
    """`agentctl run` with the kernel engine, an env over the tree in a store of its own;
    `agentctl discard` between repetitions."""

    name = "agentctl"
    description = "agentctl run --engine kernel, a fresh store; agentctl discard before each run"

    def __init__(self, agentctl: str | None = None, engine: str = "kernel",
                 extra_args: Sequence[str] = (), name: str | None = None) -> None:
        self.agentctl = agentctl or default_agentctl()
        self.engine = engine
        self.extra_args = list(extra_args)
        if name is not None:
            self.name = name
            self.description = f"agentctl run --engine {engine} {' '.join(extra_args)}".strip()
        self.env_name = f"bench-{self.name}"

    def start(self, ctx: BenchContext) -> None:
        super().start(ctx)
        self.home = os.path.join(ctx.workdir, f"{self.name}-home")
        remove(self.home)
        self._agentctl("env", "create", self.env_name, "--root", ctx.lower)

    def _agentctl(self, *args: str) -> str:
        return sh([self.agentctl, *args], env=self.environ()).stdout

    def environ(self) -> dict[str, str]:
        return {**os.environ, "ISOLATED_AGENT_HOME": self.home}

    def reset(self, workload: Workload) -> None:
        self._agentctl("discard", self.env_name)

    def tree(self) -> str:
        return self.ctx.lower

    def command(self, argv: list[str]) -> list[str]:
        return [self.agentctl, "run", "--env", self.env_name, "--engine", self.engine, "-q",
                "--no-default-allows", *self.extra_args, "--", *argv]

    def stop(self) -> None:
        if os.path.isdir(self.home):
            subprocess.run([self.agentctl, "env", "rm", self.env_name], env=self.environ(),
                           capture_output=True)
            remove(self.home)


def default_agentctl() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "agentctl")
    found = beside if os.path.exists(beside) else shutil.which("agentctl")
    if not found:
        raise BenchError("agentctl not found; run with the repo's venv python or put it on PATH")
    return found


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class Measurement:
    workload: str
    setup: str
    cache: str  # "warm" or "cold"
    seconds: list[float] = field(default_factory=list)  # wall time of each timed run
    cpu: list[float] = field(default_factory=list)  # CPU time (user + system) of each
    blocks: list[list[int]] = field(default_factory=list)  # [read, written] 512-byte blocks
    checks: list[Any] = field(default_factory=list)
    # The counted daemon's requests in each timed run ({request: [count, handler seconds]}),
    # where the setup counts them (workloads.daemon_requests).
    requests: list[dict[str, list[float]]] = field(default_factory=list)

    def cpu_view(self) -> Measurement:
        """The same measurement with CPU time in place of wall time (for the tables)."""
        return Measurement(self.workload, self.setup, self.cache, list(self.cpu))

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def minimum(self) -> float:
        return min(self.seconds)

    @property
    def spread(self) -> float:
        """Largest distance of a sample from the median, relative to the median."""
        med = self.median
        return max(abs(s - med) for s in self.seconds) / med if med else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "median": self.median, "min": self.minimum,
                "spread": self.spread}


def run_once(setup: Setup, ctx: BenchContext, workload: Workload, cold: bool,
             repeat: int = 1) -> dict[str, Any]:
    """One start of the runner in `setup`: reset the setup, start the runner, and once it is
    up inside the setup (and has done the workload's untimed `prepare`), drop the caches and
    let it go on.

    The caches are dropped only then, because starting a setup reads files too (`unshare`
    and `mount` load libpcre2 and libz, which git also uses; agentctl loads Python): dropped
    before, a setup would hand the workload a cache warmed by its own start-up. Cold: no
    cached data or metadata at all. Warm: the page cache is emptied and refilled by the
    runner's warm-up pass in the mount under test (dentries and inodes stay), so no setup
    inherits cached blocks from what ran before it either."""
    setup.reset(workload)

    def go(pid: int) -> None:
        ctx.gate.wait()
        drop_caches(3 if cold else 1, checkpoint=ctx.workdir)

    return run_runner(setup, ctx, workload, go, warm=not cold, repeat=repeat)


def run_runner(setup: Setup, ctx: BenchContext, workload: Workload,
               when_ready: Callable[[int], None], *, warm: bool | int, repeat: int = 1,
               environ: dict[str, str] | None = None, label: str | None = None,
               ) -> dict[str, Any]:
    """Start the runner in `setup` (already reset), wait until it is up and has done the
    workload's untimed `prepare` ("ready"), call `when_ready(its pid)` — drop caches, wait for
    a quiet machine, register it somewhere — then let it go, and return the JSON it printed.
    Every benchmark measures through this one handshake."""
    spec = {"tree": setup.tree(), "warm": warm, "repeat": repeat, "handshake": True,
            "workload": workload.spec()}
    argv = setup.command([ctx.python, "-B", RUNNER, json.dumps(spec)])
    what = f"{label or workload.name} in {setup.name}"
    with tempfile.TemporaryFile("w+") as errors:
        runner = subprocess.Popen(argv, env={**setup.environ(), **(environ or {})},
                                  cwd=ctx.workdir, text=True, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=errors)
        assert runner.stdin is not None and runner.stdout is not None
        try:
            ready = runner.stdout.readline().strip()
            if ready == "ready":
                when_ready(runner.pid)
                runner.stdin.write("go\n")
                runner.stdin.flush()
            output, _ = runner.communicate()
        finally:
            if runner.poll() is None:
                runner.kill()
                runner.wait()
        if runner.returncode != 0 or ready != "ready":
            errors.seek(0)
            raise BenchError(f"{what} exited with "
                             f"{runner.returncode}:\n{errors.read().strip()[-2000:]}")
    lines = output.strip().splitlines()
    if not lines:
        raise BenchError(f"{what} printed nothing")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


CACHE_STATES = ("warm", "cold")


def run_matrix(
    ctx: BenchContext,
    setups: Sequence[Setup],
    workloads: Sequence[Workload],
    reps: dict[str, int],
    warm_repeat: int = 1,
    progress: Callable[[str], None] = lambda message: None,
) -> list[Measurement]:
    """Every workload in every setup, `reps[cache]` runner starts per cache state. Warm runs of
    workloads that do not change the tree time the workload `warm_repeat` times per start
    (more samples for the short, noisy ones at little cost). Starts and stops the setups (stop
    also on failure)."""
    results: list[Measurement] = []
    started: list[Setup] = []
    try:
        for setup in setups:
            setup.start(ctx)
            started.append(setup)
        for workload in workloads:
            for cache in CACHE_STATES:
                count = reps.get(cache, 0)
                if not count:
                    continue
                cells = {s.name: Measurement(workload.name, s.name, cache) for s in setups}
                for rep in range(count):
                    order = list(setups[rep % len(setups):]) + list(setups[:rep % len(setups)])
                    for setup in order:
                        progress(f"{workload.name} {cache} {rep + 1}/{count} {setup.name}")
                        repeat = warm_repeat if cache == "warm" and not workload.mutates else 1
                        result = run_once(setup, ctx, workload, cache == "cold", repeat)
                        cells[setup.name].seconds.extend(result["seconds"])
                        cells[setup.name].cpu.extend(result["cpu"])
                        cells[setup.name].blocks.extend(result["blocks"])
                        cells[setup.name].checks.append([result["check"], result["verify"]])
                results.extend(cells.values())
    finally:
        for setup in reversed(started):
            setup.stop()
        ctx.trash.empty()
    return results


def inconsistent_checks(results: Iterable[Measurement]) -> list[str]:
    """Workloads whose check values differ between repetitions or setups: one setup did
    different work (a bug in the setup, or in the thing measured)."""
    seen: dict[tuple[str, str], set[str]] = {}
    for m in results:
        for check in m.checks:
            seen.setdefault((m.workload, m.cache), set()).add(json.dumps(check))
    return [f"{w} ({c}): {sorted(v)}" for (w, c), v in seen.items() if len(v) > 1]


def timed(action: Callable[[], Any]) -> float:
    """Wall-clock seconds `action()` took (in this process)."""
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def time_command(argv: Sequence[str], runs: int, env: dict[str, str] | None = None,
                 cwd: str | None = None, warmup: int = 3,
                 gate: QuietGate | None = None) -> list[float]:
    """Wall time of a whole command, `runs` times after `warmup` unmeasured runs."""
    samples = []
    for i in range(warmup + runs):
        if gate is not None and i >= warmup:
            gate.wait()
        start = time.perf_counter()
        done = subprocess.run(list(argv), env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise BenchError(f"{' '.join(argv)} exited with {done.returncode}: "
                             f"{done.stderr.decode(errors='replace').strip()}")
        if i >= warmup:
            samples.append(elapsed)
    return samples


# -- reporting ----------------------------------------------------------------------------------


def format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def results_table(
    results: Sequence[Measurement],
    setups: Sequence[str],
    comparisons: Sequence[tuple[str, str]],
) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per (workload, cache), the median ± spread of each setup,
    then one column per (numerator, denominator) ratio of medians."""
    cell = {(m.workload, m.cache, m.setup): m for m in results}
    keys = list(dict.fromkeys((m.workload, m.cache) for m in results))
    header = ["workload", "cache", *setups, *(f"{a} / {b}" for a, b in comparisons)]
    rows = []
    for workload, cache in keys:
        row = [workload, cache]
        for s in setups:
            m = cell.get((workload, cache, s))
            row.append(f"{format_seconds(m.median)} ±{m.spread * 100:.0f}%" if m else "")
        for a, b in comparisons:
            ma, mb = cell.get((workload, cache, a)), cell.get((workload, cache, b))
            row.append(f"{ma.median / mb.median:.2f}×" if ma and mb and mb.median else "")
        rows.append(row)
    return header, rows


def print_table(title: str, header: list[str], rows: list[list[str]],
                highlight: Callable[[int, str], str | None] = lambda col, text: None,
                left: int = 2) -> None:
    """A rich table on a terminal; a Markdown table (paste-able into the README) otherwise.
    The first `left` columns are text, the others numbers (right-aligned).
    `highlight(column, text)` may return a rich style for a cell."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i < left else "right")
        for row in rows:
            styled = []
            for i, text in enumerate(row):
                style = highlight(i, text)
                styled.append(f"[{style}]{text}[/]" if style else text)
            table.add_row(*styled)
        Console().print(table)
        return
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def write_json(name: str, payload: dict[str, Any], path: str | None = None) -> str:
    if path is None:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = os.path.join(RESULTS_DIR, f"{name}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    return path
