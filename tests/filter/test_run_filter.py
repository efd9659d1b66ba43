"""`agentctl run --engine filter`: a job without namespaces, its env served in place.

The store lives under /var/tmp here: without namespaces the job may write to /tmp (there is no
private one), and `run` refuses a store the job could write to.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isolated_agent.engines.fuse import mount as mounts
from tests.agentfs.conftest import wait_for
from tests.conftest import DISK_SCRATCH_PREFIX, snapshot
from tests.filter.conftest import stop_filter_daemons


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=DISK_SCRATCH_PREFIX + "filter-"))
    try:
        yield path / "store"
    finally:
        stop_filter_daemons(path / "store")
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tree(home: Path) -> Path:
    root = home.parent / "project"
    (root / "src").mkdir(parents=True)
    (root / "a.txt").write_text("host\n")
    (root / "src" / "main.py").write_text("print('hello')\n")
    return root


def agentctl(home: Path, *args: str, cwd: Path | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isolated_agent", *args], cwd=cwd, capture_output=True,
        text=True, timeout=timeout, env={**os.environ, "ISOLATED_AGENT_HOME": str(home)},
    )


def run_in_job(home: Path, root: Path, script: str, *extra: str,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return agentctl(home, "run", "--engine", "filter", *extra, "--", "sh", "-c", script,
                    cwd=root, timeout=timeout)


def filter_state(home: Path) -> list[dict[str, object]]:
    result = agentctl(home, "filter", "status", "--json")
    assert result.returncode == 0, result.stderr
    state: list[dict[str, object]] = json.loads(result.stdout)
    return state


def test_run_keeps_changes_in_the_env_and_the_host_untouched(home: Path, tree: Path) -> None:
    before = snapshot(tree)
    result = run_in_job(home, tree, "cat a.txt; echo env >> a.txt; echo new > b.txt; "
                                    "rm src/main.py; mkdir -p x/y; mv src x/y/; cat a.txt; ls")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "host\nhost\nenv\na.txt\nb.txt\nx\n"
    assert "filter engine" in result.stderr
    assert snapshot(tree) == before
    # The next run in the same env sees the env (the kernel's caches learn the env's changes).
    again = run_in_job(home, tree, "cat a.txt b.txt; ls x/y/src; test ! -e src && echo gone")
    assert again.returncode == 0, again.stderr
    assert again.stdout == "host\nenv\nnew\ngone\n"
    diff = agentctl(home, "diff", "--name-status", cwd=tree)
    assert diff.returncode == 0, diff.stderr
    assert "M\ta.txt" in diff.stdout and "A\tb.txt" in diff.stdout
    state = filter_state(home)
    assert len(state) == 1 and state[0]["root"] == str(tree) and state[0]["jobs"] == []
    assert snapshot(tree) == before


def test_two_runs_in_two_envs_share_one_filter(home: Path, tree: Path) -> None:
    """Each job sees its own env on the same paths at the same time; the host sees neither."""
    script = ("echo {name} > a.txt; echo ready; read go; cat a.txt; ls")
    jobs = {}
    for name in ("first", "second"):
        jobs[name] = subprocess.Popen(
            [sys.executable, "-m", "isolated_agent", "run", "-q", "--engine", "filter",
             "--env", name, "--", "sh", "-c", script.format(name=name)],
            cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "ISOLATED_AGENT_HOME": str(home)},
        )
    for job in jobs.values():
        assert job.stdout is not None and job.stderr is not None
        line = job.stdout.readline()
        assert line == "ready\n", line or job.stderr.read()
    assert (tree / "a.txt").read_text() == "host\n"
    assert len(filter_state(home)[0]["jobs"]) == 2  # type: ignore[arg-type]
    for name, job in jobs.items():
        out, err = job.communicate("go\n", timeout=30)
        assert job.returncode == 0, err
        assert out == f"{name}\na.txt\nsrc\n"
    assert (tree / "a.txt").read_text() == "host\n"


def test_the_job_cannot_undo_its_isolation(home: Path, tree: Path) -> None:
    outside = home.parent / "outside.txt"
    script = f"""
        umount {tree} 2>/dev/null && echo UNMOUNTED
        fusermount3 -u {tree} 2>/dev/null && echo FUSERMOUNTED
        echo x > {outside} 2>/dev/null && echo WROTE_OUTSIDE
        python3 - <<'EOF'
import glob, socket, struct
for path in glob.glob("{home}/run/filters/*.sock"):
    for code in (b"Q", b"j"):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            s.sendall(bytes([1]) + code + struct.pack(">I", 2) + b"{{}}")
            print("REPLY", s.recv(4096)[1:2])
        except OSError as e:
            print("REFUSED", e.errno)
EOF
        for record in {home}/run/filters/*.json; do
            pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' $record)
            kill -9 $pid 2>/dev/null && echo KILLED
        done
        cat a.txt
    """
    result = run_in_job(home, tree, script)
    assert result.returncode == 0, result.stderr
    for escape in ("UNMOUNTED", "FUSERMOUNTED", "WROTE_OUTSIDE", "KILLED"):
        assert escape not in result.stdout, result.stdout
    # The daemon answers a job only with an error frame (code "!"), whatever it asked.
    assert "REPLY b'A'" not in result.stdout
    assert "REPLY b'!'" in result.stdout or "REFUSED" in result.stdout
    assert result.stdout.rstrip().endswith("host")
    assert not outside.exists()
    assert filter_state(home)[0]["alive"]


def test_descendants_stay_in_the_env_even_when_the_launcher_is_killed(
    home: Path, tree: Path
) -> None:
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
    launcher = subprocess.Popen(
        [sys.executable, "-m", "isolated_agent", "run", "--engine", "filter", "--", "sh", "-c",
         script], cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "ISOLATED_AGENT_HOME": str(home)},
    )
    try:
        assert launcher.stdout is not None
        assert launcher.stdout.readline() == "started\n"
        time.sleep(0.5)  # the daemon keeps reading
        launcher.kill()
        launcher.wait()
        # The filter daemon was forked by the launcher (its command line too has the marker).
        daemon = int(filter_state(home)[0]["pid"])  # type: ignore[call-overload]
        wait_for(lambda: not set(_processes_with(marker)) - {daemon},
                 what="the job's processes to be killed")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert (tree / "a.txt").read_text() == "host\n"
    upper = _env_upper(home)
    seen = (upper / "seen").read_text().splitlines()
    assert seen and set(seen) == {"env"}, seen[:5]
    assert set((upper / "threads").read_text().splitlines()) == {"env"}


def test_killing_the_filter_daemon_fails_closed_and_start_recovers(
    home: Path, tree: Path
) -> None:
    before = snapshot(tree)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "isolated_agent", "run", "--engine", "filter", "--", "sh", "-c",
         "echo env > a.txt; echo started; sleep 1; cat a.txt; echo status=$?"],
        cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "ISOLATED_AGENT_HOME": str(home)},
    )
    assert launcher.stdout is not None
    assert launcher.stdout.readline() == "started\n"
    pid = int(filter_state(home)[0]["pid"])  # type: ignore[call-overload]
    os.kill(pid, signal.SIGKILL)
    out, err = launcher.communicate(timeout=30)
    assert "Transport endpoint is not connected" in err
    assert out.strip().endswith("status=1")
    with pytest.raises(OSError) as dead:
        os.stat(tree / "a.txt")
    assert dead.value.errno == 107  # ENOTCONN: never the host files, for anyone
    started = agentctl(home, "filter", "start", str(tree))
    assert started.returncode == 0, started.stderr
    assert (tree / "a.txt").read_text() == "host\n"
    assert snapshot(tree) == before
    stopped = agentctl(home, "filter", "stop", str(tree))
    assert stopped.returncode == 0, stopped.stderr
    assert not mounts.is_fuse_mount(mounts.mount_entry(str(tree)))


def test_an_on_demand_filter_stops_when_idle(home: Path, tree: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "isolated_agent", "run", "--engine", "filter", "--", "true"],
        cwd=tree, capture_output=True, text=True, timeout=60,
        env={**os.environ, "ISOLATED_AGENT_HOME": str(home), "ISOLATED_AGENT_FILTER_IDLE": "1"},
    )
    assert result.returncode == 0, result.stderr
    pid = int(filter_state(home)[0]["pid"])  # type: ignore[call-overload]
    assert mounts.wait_exited(pid, timeout=15)
    assert mounts.mount_entry(str(tree)) is None
    assert filter_state(home) == []


def test_store_the_job_could_write_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    result = run_in_job(tmp_path / "store", root, "true")
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


def test_filter_commands_say_what_is_wrong(home: Path, tree: Path) -> None:
    cases = [
        (("filter", "start", "/"), 2, "/ cannot be a managed root"),
        (("filter", "start", str(tree / "a.txt")), 2, "is a file"),
        (("filter", "start", str(home.parent / "missing")), 2, "does not exist"),
        (("filter", "stop", str(tree)), 1, "no filter runs on"),
    ]
    for args, code, message in cases:
        result = agentctl(home, *args)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert agentctl(home, "filter", "status").stderr.strip() == "agentctl: no filter runs"
    started = agentctl(home, "filter", "start", "--json", str(tree))
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["root"] == str(tree)
    again = agentctl(home, "filter", "start", str(tree))  # the running one: nothing to do
    assert again.returncode == 0 and filter_state(home)[0]["pid"] == json.loads(
        started.stdout)["pid"]
    stopped = agentctl(home, "filter", "stop", "--json", str(tree))
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["stopped"] is True
    assert mounts.mount_entry(str(tree)) is None
