"""Benchmark workloads, and the runner that times one of them from inside a setup.

This file is standard library only and is run as a script by whatever interpreter the harness
picks, in every setup the same way: natively, inside a hand-made mount namespace, and inside an
`agentctl run` job (where the host is read-only and /tmp is private, so the runner must not live
under /tmp). The harness never times a workload from outside: it starts this runner in the setup,
the runner times the workload with `time.perf_counter()` and prints one JSON object. Process
start-up of the setup (an `agentctl run`, an `unshare`) is therefore never part of a workload's
time.

A workload is a timed step, plus optional untimed `prepare` (before) and `verify` (after) steps.
A step is either a shell command (run with `/bin/sh -c`, cwd = the tree, stdout captured) or a
module-level Python function `f(tree: str) -> object` (any JSON value: it is reported as the
step's *check*, which the harness compares across setups to catch a setup that did less work).

Adding a workload is a function (or a shell command) and one `register(Workload(...))` line,
here or in any other module the harness imports; see the README.

Runner protocol (what the harness passes as the single argument, JSON):

    {"tree": "/abs/path", "warm": true, "repeat": 1, "handshake": true,
     "workload": {"name": ..., "run": STEP, "prepare": STEP|null, "verify": STEP|null,
                  "tools": [...]}}

with STEP = {"shell": "cmd"} or {"python": ["/abs/file.py", "function_name"]}. Order inside the
runner: prepare; with a handshake, print "ready" and wait for "go" on stdin (meanwhile the
harness drops the caches, so whatever the setup's own start-up read is not cached any more);
warm-up pass (warm only); sync; the timed run `repeat` times (each timed on its own; only for
workloads that leave the tree as they found it); verify. The warm-up pass walks the
whole tree (.git included), lstat()s every entry and reads every regular file, so the page cache,
dentries and inodes of this very mount are hot, and starts each of the workload's `tools` once.
The runner prints `{"seconds": [...], "cpu": [...], "blocks": [[read, written], ...],
"check": value, "verify": value}`: per timed run, the wall time, the CPU time (user + system,
of the runner and every process the workload started) and the blocks read and written.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

StepFunction = Callable[[str], Any]
Step = str | StepFunction  # a shell command, or a module-level function of the tree's path


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    run: Step
    prepare: Step | None = None
    verify: Step | None = None
    mutates: bool = False  # leaves the tree changed: native needs a fresh copy before each run
    tools: tuple[str, ...] = ()  # programs it runs, started once (--version) by the warm-up

    def spec(self) -> dict[str, Any]:
        """The JSON form the runner understands."""
        return {
            "name": self.name,
            "tools": list(self.tools),
            "run": _step_spec(self.run),
            "prepare": _step_spec(self.prepare),
            "verify": _step_spec(self.verify),
        }


WORKLOADS: dict[str, Workload] = {}


def register(workload: Workload) -> Workload:
    if workload.name in WORKLOADS:
        raise ValueError(f"workload {workload.name!r} is already registered")
    WORKLOADS[workload.name] = workload
    return workload


def _step_spec(step: Step | None) -> dict[str, Any] | None:
    if step is None:
        return None
    if isinstance(step, str):
        return {"shell": step}
    source = inspect.getsourcefile(step)
    if source is None or step.__qualname__ != step.__name__:
        raise ValueError(f"{step!r}: a Python step must be a module-level function")
    return {"python": [os.path.abspath(source), step.__name__]}


# -- the workloads of the core benchmark --------------------------------------------------------

SKIP_DIRS = frozenset({".git"})  # the project's files, not git's internals (the git workload
# covers those); the warm-up pass does include .git


def walk(tree: str, skip: frozenset[str] = SKIP_DIRS) -> Iterator[os.DirEntry[str]]:
    """Every entry under `tree`, depth first, without following symlinks."""
    stack = [tree]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and entry.name not in skip:
                    stack.append(entry.path)
                yield entry


def walk_stat(tree: str) -> int:
    """os.scandir the whole tree and lstat() every entry (what `find`, an IDE indexer or a
    build tool's up-to-date check does)."""
    count = 0
    for entry in walk(tree):
        os.lstat(entry.path)
        count += 1
    return count


def read_all(tree: str) -> int:
    """Open and read every regular file; returns the number of bytes read."""
    total = 0
    for entry in walk(tree):
        if entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
    return total


CREATE_COUNT = 2000
CREATE_DIR = "bench-create.tmp"


def create_delete(tree: str) -> int:
    """Create 2 000 files of 1 KiB in a new directory at the top of the tree, then delete them
    and the directory."""
    top = os.path.join(tree, CREATE_DIR)
    os.mkdir(top)
    payload = b"x" * 1024
    names = [os.path.join(top, f"f{i:05d}.txt") for i in range(CREATE_COUNT)]
    for name in names:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
    for name in names:
        os.unlink(name)
    os.rmdir(top)
    return len(names)


GIT_MODIFIED, GIT_ADDED, GIT_DELETED = 20, 10, 5


def git_change(tree: str) -> int:
    """Untimed set-up of the git workload: a change an agent might make. Modifies 20 tracked
    files (appends a line), adds 10 files, deletes 5, chosen deterministically."""
    files = sorted(
        e.path for e in walk(tree) if e.is_file(follow_symlinks=False) and e.name.endswith(".py")
    )
    stride = max(1, len(files) // (GIT_MODIFIED + GIT_DELETED))
    picked = files[::stride][: GIT_MODIFIED + GIT_DELETED]
    for path in picked[:GIT_MODIFIED]:
        with open(path, "a") as f:
            f.write("# touched by the benchmark\n")
    for path in picked[GIT_MODIFIED:]:
        os.unlink(path)
    new_dir = os.path.join(tree, "bench-new")
    os.makedirs(new_dir, exist_ok=True)
    for i in range(GIT_ADDED):
        with open(os.path.join(new_dir, f"new_{i}.py"), "w") as f:
            f.write(f"VALUE = {i}\n" * 50)
    return len(picked) + GIT_ADDED


register(Workload(
    "walk+stat",
    "scandir the whole tree (.git excluded) and lstat() every entry",
    walk_stat,
))
register(Workload(
    "grep -r",
    "grep -rn for an identifier over the tree (.git excluded), matches counted with wc -l",
    "grep -rn --exclude-dir=.git -e get_response . | wc -l",
    tools=("grep", "wc"),
))
register(Workload(
    "read all",
    "open and read every regular file (.git excluded)",
    read_all,
))
register(Workload(
    "create+delete 2000",
    "create 2 000 files of 1 KiB in a new directory, then delete them and the directory",
    create_delete,
    mutates=True,
))
register(Workload(
    "git add+commit",
    "`git add -A && git commit` after an untimed change of 20 modified, 10 new, 5 deleted files",
    "git add -A && git commit -q -m 'benchmark commit'",
    prepare=git_change,
    verify="git show --name-only --format= HEAD | wc -l",
    mutates=True,
    tools=("git", "wc"),
))


# -- the runner ---------------------------------------------------------------------------------

# Every git the runner starts: no user or system configuration, a fixed identity, and no
# automatic gc/maintenance (which would make one repetition pack the whole repository).
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
    "GIT_CONFIG_COUNT": "2",
    "GIT_CONFIG_KEY_0": "gc.auto",
    "GIT_CONFIG_VALUE_0": "0",
    "GIT_CONFIG_KEY_1": "maintenance.auto",
    "GIT_CONFIG_VALUE_1": "false",
}


def warm_up(tree: str, tools: list[str]) -> int:
    """lstat every entry and read every regular file, .git included; start /bin/sh and each
    of the workload's programs once, so their binaries and libraries are cached too."""
    for tool in ["/bin/sh", *tools]:
        subprocess.run([tool, "--version"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = 0
    for entry in walk(tree, skip=frozenset()):
        st = os.lstat(entry.path)
        if stat.S_ISREG(st.st_mode):
            with open(entry.path, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
    return total


def _load_step(spec: dict[str, Any] | None) -> Callable[[str], Any] | None:
    if spec is None:
        return None
    if "shell" in spec:
        command = spec["shell"]

        def shell(tree: str) -> str:
            done = subprocess.run(
                ["/bin/sh", "-c", command], cwd=tree, stdout=subprocess.PIPE, check=True
            )
            return done.stdout.decode(errors="replace").strip()

        return shell
    path, name = spec["python"]
    module_name = "bench_steps_" + os.path.splitext(os.path.basename(path))[0]
    module = sys.modules.get(module_name)
    if module is None:
        loaded = importlib.util.spec_from_file_location(module_name, path)
        if loaded is None or loaded.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(loaded)
        sys.modules[module_name] = module
        loaded.loader.exec_module(module)
    function: Callable[[str], Any] = getattr(module, name)
    return function


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    tree = spec["tree"]
    workload = spec["workload"]
    os.environ.update(GIT_ENV)
    os.chdir(tree)
    prepare = _load_step(workload.get("prepare"))
    timed = _load_step(workload["run"])
    verify = _load_step(workload.get("verify"))
    assert timed is not None
    if prepare is not None:
        prepare(tree)
    if spec.get("handshake"):  # the harness drops the caches now, then says go
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("runner: the harness did not say go")
    for _ in range(int(spec.get("warm", 0))):  # warm-up passes (True: one)
        warm_up(tree, workload.get("tools", []))
    # After the warm-up: it may dirty inodes (relatime updates atime on the first read of a
    # freshly copied file), whose writeback must not land in the timed part.
    os.sync()
    seconds: list[float] = []
    cpu: list[float] = []
    blocks: list[list[int]] = []
    requests: list[dict[str, list[float]]] = []
    checks = []
    for _ in range(spec.get("repeat", 1)):
        answered = daemon_requests()
        before = _usage()
        start = time.perf_counter()
        checks.append(timed(tree))
        seconds.append(time.perf_counter() - start)
        after = _usage()
        cpu.append(after[0] - before[0])
        blocks.append([int(after[1] - before[1]), int(after[2] - before[2])])
        if answered is not None:
            requests.append(requests_between(answered, daemon_requests() or {}))
    verified = verify(tree) if verify is not None else None
    check = checks[0] if all(c == checks[0] for c in checks) else checks
    result = {"seconds": seconds, "cpu": cpu, "blocks": blocks, "check": check,
              "verify": verified}
    if requests:
        result["requests"] = requests
    return result


# The daemon whose requests a setup counts (isolated_agent/fusefs/accounting.py): its pid and
# the file it writes its totals to when sent SIGUSR2.
DAEMON_PID_ENV = "BENCH_DAEMON_PID"
REQUESTS_ENV = "AGENTFS_REQUESTS"


def daemon_requests() -> dict[str, list[float]] | None:
    """The totals of the counted daemon so far ({request: [count, handler seconds]}), or
    None where the setup counts none. Asks for them with SIGUSR2 and waits for the new file
    (each is a new inode: written beside and renamed over)."""
    pid, path = os.environ.get(DAEMON_PID_ENV), os.environ.get(REQUESTS_ENV)
    if not pid or not path:
        return None
    try:
        old = os.stat(path).st_ino
    except FileNotFoundError:
        old = None
    os.kill(int(pid), signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.stat(path).st_ino != old:
                with open(path) as f:
                    totals: dict[str, list[float]] = json.load(f)
                return totals
        except FileNotFoundError:
            pass
        time.sleep(0.001)
    raise SystemExit(f"runner: the daemon (pid {pid}) wrote no request counts to {path}")


def requests_between(before: dict[str, list[float]],
                     after: dict[str, list[float]]) -> dict[str, list[float]]:
    spent = {}
    for name, (count, seconds) in after.items():
        old_count, old_seconds = before.get(name, (0, 0.0))
        if count > old_count:
            spent[name] = [count - old_count, round(seconds - old_seconds, 6)]
    return spent


def _usage() -> tuple[float, int, int]:
    """CPU seconds (user + system) and blocks read and written (512-byte units) by this
    process and every child it has waited for (their children included)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
            own.ru_inblock + children.ru_inblock, own.ru_oublock + children.ru_oublock)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} SPEC_JSON", file=sys.stderr)
        return 2
    result = run_spec(json.loads(argv[1]))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
