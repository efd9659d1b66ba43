"""`agentctl run --engine filter`: a job without namespaces, its env served in place.

The filter runs no root job, so the jobs here are the unprivileged user's, over a project and
a store that user owns. The store lives under /var/tmp: without namespaces the job may write to
/tmp (there is no private one), and `run` refuses a store the job could write to. Root (the
test) cannot enter the user's filter mount: it sees the host's bytes beneath it through a
descriptor of the project taken before the mount (`User.beneath`), and asks the user's own
host processes what they see through it (`User.sh`).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from isolated_agent.fusefs import mount as mounts
from tests.agentfs.conftest import wait_for
from tests.conftest import DISK_SCRATCH_PREFIX, as_user, snapshot, user_agentctl
from tests.filter.conftest import stop_filter_daemons


@dataclass
class User:
    """The unprivileged user's agentctl and shell, its store `home` and project `tree`."""

    package: Path
    home: Path
    tree: Path
    beneath: Path  # the project's host files, beneath any mount on it

    def argv(self, *args: str, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> list[str]:
        return user_agentctl(self.package, self.home, cwd or self.tree, *args, env=env)

    def agentctl(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args, cwd=cwd, env=env), capture_output=True,
                              text=True, timeout=timeout)

    def run_in_job(self, script: str, *extra: str,
                   timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.agentctl("run", "--engine", "filter", *extra, "--", "sh", "-c", script,
                             timeout=timeout)

    def sh(self, script: str) -> str:
        """What a host process of the user (no job) prints, in the project."""
        done = subprocess.run(as_user(self.tree, "sh", "-c", script), capture_output=True,
                              text=True, timeout=30)
        return done.stdout + done.stderr

    def filter_state(self) -> list[dict[str, object]]:
        result = self.agentctl("filter", "status", "--json")
        assert result.returncode == 0, result.stderr
        state: list[dict[str, object]] = json.loads(result.stdout)
        return state


@pytest.fixture
def user(unprivileged_user: pwd.struct_passwd, package_copy: Path,
         fuse_open_to_users: None) -> Iterator[User]:
    base = Path(tempfile.mkdtemp(prefix=DISK_SCRATCH_PREFIX + "filter-"))
    tree = base / "project"
    (tree / "src").mkdir(parents=True)
    (tree / "a.txt").write_text("host\n")
    (tree / "src" / "main.py").write_text("print('hello')\n")
    subprocess.run(["chown", "-R", f"{unprivileged_user.pw_uid}:{unprivileged_user.pw_gid}",
                    str(base)], check=True)
    beneath = os.open(tree, os.O_PATH | os.O_DIRECTORY)
    try:
        yield User(package_copy, base / "store", tree, Path(f"/proc/self/fd/{beneath}"))
    finally:
        stop_filter_daemons(base / "store")
        os.close(beneath)
        shutil.rmtree(base, ignore_errors=True)


def test_a_root_job_is_refused_with_the_reason(user: User) -> None:
    """Without namespaces a root job would be uid 0 on the host: owner of /tmp and of every
    root file whose mode or times Landlock does not judge."""
    done = subprocess.run(
        [sys.executable, "-m", "isolated_agent", "run", "--engine", "filter", "--", "touch",
         "ran"], cwd=user.tree, capture_output=True, text=True, timeout=60,
        env={**os.environ, "ISOLATED_AGENT_HOME": str(user.home.parent / "root-store")})
    assert done.returncode == 125, done.stderr
    assert "filter engine: it runs no job as root" in done.stderr, done.stderr
    assert "run agentctl as your user, or use --engine kernel or fuse" in done.stderr
    assert not (user.tree / "ran").exists()
    assert not (user.home.parent / "root-store" / "run" / "filters").exists()


def test_run_keeps_changes_in_the_env_and_the_host_untouched(user: User) -> None:
    before = snapshot(user.tree)
    result = user.run_in_job("cat a.txt; echo env >> a.txt; echo new > b.txt; "
                             "rm src/main.py; mkdir -p x/y; mv src x/y/; cat a.txt; ls")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "host\nhost\nenv\na.txt\nb.txt\nx\n"
    assert "filter engine" in result.stderr
    assert snapshot(user.beneath) == before
    assert user.sh("cat a.txt; ls") == "host\na.txt\nsrc\n"  # the user's shell: the host
    # The next run in the same env sees the env (the kernel's caches learn the env's changes).
    again = user.run_in_job("cat a.txt b.txt; ls x/y/src; test ! -e src && echo gone")
    assert again.returncode == 0, again.stderr
    assert again.stdout == "host\nenv\nnew\ngone\n"
    diff = user.agentctl("diff", "--name-status")
    assert diff.returncode == 0, diff.stderr
    assert "M\ta.txt" in diff.stdout and "A\tb.txt" in diff.stdout
    state = user.filter_state()
    assert len(state) == 1 and state[0]["root"] == str(user.tree) and state[0]["jobs"] == []
    assert snapshot(user.beneath) == before


def test_two_runs_in_two_envs_share_one_filter(user: User) -> None:
    """Each job sees its own env on the same paths at the same time; the host sees neither."""
    script = ("echo {name} > a.txt; echo ready; read go; cat a.txt; ls")
    jobs = {}
    for name in ("first", "second"):
        jobs[name] = subprocess.Popen(
            user.argv("run", "-q", "--engine", "filter", "--env", name, "--", "sh", "-c",
                      script.format(name=name)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for job in jobs.values():
        assert job.stdout is not None and job.stderr is not None
        line = job.stdout.readline()
        assert line == "ready\n", line or job.stderr.read()
    assert user.sh("cat a.txt") == "host\n"
    assert len(user.filter_state()[0]["jobs"]) == 2  # type: ignore[arg-type]
    for name, job in jobs.items():
        out, err = job.communicate("go\n", timeout=30)
        assert job.returncode == 0, err
        assert out == f"{name}\na.txt\nsrc\n"
    assert user.sh("cat a.txt") == "host\n"


def test_the_job_cannot_undo_its_isolation(user: User) -> None:
    outside = user.home.parent / "outside.txt"  # the user's own dir: only Landlock refuses it
    script = f"""
        umount {user.tree} 2>/dev/null && echo UNMOUNTED
        fusermount3 -u {user.tree} 2>/dev/null && echo FUSERMOUNTED
        echo x > {outside} 2>/dev/null && echo WROTE_OUTSIDE
        python3 - <<'EOF'
import glob, socket, struct
for path in glob.glob("{user.home}/run/filters/*.sock"):
    for code in (b"Q", b"j"):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            s.sendall(bytes([1]) + code + struct.pack(">I", 2) + b"{{}}")
            print("REPLY", s.recv(4096)[1:2])
        except OSError as e:
            print("REFUSED", e.errno)
EOF
        for record in {user.home}/run/filters/*.json; do
            pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' $record)
            kill -9 $pid 2>/dev/null && echo KILLED
        done
        cat a.txt
    """
    result = user.run_in_job(script)
    assert result.returncode == 0, result.stderr
    for escape in ("UNMOUNTED", "FUSERMOUNTED", "WROTE_OUTSIDE", "KILLED"):
        assert escape not in result.stdout, result.stdout
    # The daemon answers a job only with an error frame (code "!"), whatever it asked.
    assert "REPLY b'A'" not in result.stdout
    assert "REPLY b'!'" in result.stdout or "REFUSED" in result.stdout
    assert result.stdout.rstrip().endswith("host")
    assert not outside.exists()
    assert user.filter_state()[0]["alive"]


def test_descendants_stay_in_the_env_even_when_the_launcher_is_killed(user: User) -> None:
    """A double-forked setsid daemon and threads of the job read the file the job changed:
    every read shows the env (or fails) — never the host — until the keeper kills them all."""
    marker = f"ia-marker-{os.getpid()}-{time.monotonic_ns()}"
    script = f"""
        echo env > a.txt
        ( setsid sh -c 'while :; do cat a.txt >> seen 2>&1; sleep 0.02; done' {marker} & )
        python3 -c '
import threading
def read():
    for _ in range(50):
        with open("a.txt") as f, open("threads", "a") as out:
            out.write(f.read())
threads = [threading.Thread(target=read) for _ in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
'
        echo started; sleep 60
    """
    launcher = subprocess.Popen(user.argv("run", "--engine", "filter", "--", "sh", "-c", script),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout is not None
        assert launcher.stdout.readline() == "started\n"
        time.sleep(0.5)  # the daemon keeps reading
        launcher.kill()
        launcher.wait()
        # The filter daemon was forked by the launcher (its command line too has the marker).
        daemon = int(user.filter_state()[0]["pid"])  # type: ignore[call-overload]
        wait_for(lambda: not set(_processes_with(marker)) - {daemon},
                 what="the job's processes to be killed")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert user.sh("cat a.txt") == "host\n"
    upper = _env_upper(user.home)
    seen = (upper / "seen").read_text().splitlines()
    assert seen and set(seen) == {"env"}, seen[:5]
    assert set((upper / "threads").read_text().splitlines()) == {"env"}


def test_killing_the_filter_daemon_fails_closed_and_start_recovers(user: User) -> None:
    before = snapshot(user.tree)
    launcher = subprocess.Popen(
        user.argv("run", "--engine", "filter", "--", "sh", "-c",
                  "echo env > a.txt; echo started; sleep 1; cat a.txt; echo status=$?"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    assert launcher.stdout.readline() == "started\n"
    pid = int(user.filter_state()[0]["pid"])  # type: ignore[call-overload]
    os.kill(pid, signal.SIGKILL)
    out, err = launcher.communicate(timeout=30)
    assert "Transport endpoint is not connected" in err
    assert out.strip().endswith("status=1")
    # ENOTCONN: never the host files, for anyone who may enter the mount
    assert "Transport endpoint is not connected" in user.sh(f"cat {user.tree}/a.txt")
    started = user.agentctl("filter", "start", str(user.tree), cwd=user.home.parent)
    assert started.returncode == 0, started.stderr
    assert user.sh("cat a.txt") == "host\n"
    assert snapshot(user.beneath) == before
    stopped = user.agentctl("filter", "stop", str(user.tree), cwd=user.home.parent)
    assert stopped.returncode == 0, stopped.stderr
    assert not mounts.is_fuse_mount(mounts.mount_entry(str(user.tree)))


def test_an_on_demand_filter_stops_when_idle(user: User) -> None:
    result = user.agentctl("run", "--engine", "filter", "--", "true",
                           env={"ISOLATED_AGENT_FILTER_IDLE": "1"})
    assert result.returncode == 0, result.stderr
    pid = int(user.filter_state()[0]["pid"])  # type: ignore[call-overload]
    assert mounts.wait_exited(pid, timeout=15)
    assert mounts.mount_entry(str(user.tree)) is None
    assert user.filter_state() == []


def test_store_the_job_could_write_is_refused(user: User) -> None:
    """No private /tmp without namespaces: a store there is the job's to rewrite."""
    base = Path(tempfile.mkdtemp(prefix="ia-filter-store-", dir="/tmp"))
    try:
        os.chown(base, user.tree.stat().st_uid, user.tree.stat().st_gid)
        exposed = User(user.package, base / "store", user.tree, user.beneath)
        result = exposed.run_in_job("true")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert result.returncode == 125
    assert "may write to" in result.stderr and "Traceback" not in result.stderr


def _processes_with(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(name))
            except OSError:
                continue
    return found


def _env_upper(home: Path) -> Path:
    uppers = list((home / "envs").glob("*/roots/0/upper"))
    assert len(uppers) == 1, uppers
    return uppers[0]


def test_filter_commands_say_what_is_wrong(user: User) -> None:
    tree, home = user.tree, user.home
    cases = [
        (("filter", "start", "/"), 2, "/ cannot be a managed root"),
        (("filter", "start", str(tree / "a.txt")), 2, "is a file"),
        (("filter", "start", str(home.parent / "missing")), 2, "does not exist"),
        (("filter", "stop", str(tree)), 1, "no filter runs on"),
    ]
    for args, code, message in cases:
        result = user.agentctl(*args)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert user.agentctl("filter", "status").stderr.strip() == "agentctl: no filter runs"
    started = user.agentctl("filter", "start", "--json", str(tree))
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["root"] == str(tree)
    again = user.agentctl("filter", "start", str(tree))  # the running one: nothing to do
    assert again.returncode == 0 and user.filter_state()[0]["pid"] == json.loads(
        started.stdout)["pid"]
    stopped = user.agentctl("filter", "stop", "--json", str(tree))
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["stopped"] is True
    assert mounts.mount_entry(str(tree)) is None
