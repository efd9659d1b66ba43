"""Live checkpoints (DESIGN §11, issue 14 point 3): `agentctl checkpoint` of an env whose job runs
on agentfs freezes the upper between two requests. A job writing continuously through one open
file loses no write, the checkpoint holds a prefix of what it wrote, and a rollback gives back
exactly the checkpointed bytes. On the kernel engine it is refused in one line."""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from isolated_agent.env.catalog import CheckpointRecord
from isolated_agent.env.layers import begin_freeze
from isolated_agent.env.store import Store
from tests.review.conftest import Workspace

LINES = 1500


def job_script(lines: int) -> str:
    return textwrap.dedent(f"""
    import os, time
    os.makedirs("made", exist_ok=True)
    with open("log.txt", "a", buffering=1) as log:  # one open file, a write(2) per line
        for n in range({lines}):
            log.write(f"{{n}}\\n")
            if n % 20 == 0:
                with open(f"made/{{n}}", "w") as f:
                    f.write(str(n))
                if n >= 100:
                    os.unlink(f"made/{{n - 100}}")
            time.sleep(0.001)
    """)


JOB = job_script(LINES)


@contextmanager
def fuse_job(ws: Workspace, script: str, environ: dict[str, str] | None = None
             ) -> Iterator[subprocess.Popen[str]]:
    """`python3 -c SCRIPT` run in env e1 on the fuse engine; it must end well after the
    block."""
    job = subprocess.Popen(
        [sys.executable, "-m", "isolated_agent", "run", "-q", "--env", "e1", "--engine", "fuse",
         "--", "python3", "-c", script], cwd=ws.project, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "ISOLATED_AGENT_HOME": str(ws.store_home), **(environ or {})})
    try:
        yield job
        _, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def upper_of(ws: Workspace) -> Path:
    store = Store(str(ws.store_home))
    try:
        return Path(store.get("e1").roots[0].upper)
    finally:
        store.close()


def wait_until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("handles", [False, True], ids=["handle-free", "handles"])
def test_live_checkpoint_of_a_writing_job(ws: Workspace, handles: bool) -> None:
    ws.run("true")
    with fuse_job(ws, JOB, {"AGENTFS_HANDLES": "1"} if handles else {}):
        upper = upper_of(ws)
        wait_until(lambda: lines_in(upper / "log.txt") >= 200)
        result = ws.ctl("checkpoint", "e1", "--json", "-m", "live")
        assert result.returncode == 0, result.stderr
        live = json.loads(result.stdout)
        assert len(live["paused_ms"]) == 1

    store = Store(str(ws.store_home))
    env = store.get("e1")
    frozen = Path(store.layer_dir(env.layers[-1], 0))
    store.close()
    at_checkpoint = (frozen / "log.txt").read_bytes()
    final = (upper_of(ws) / "log.txt").read_bytes()  # copied up at the first write after
    everything = "".join(f"{n}\n" for n in range(LINES)).encode()
    assert final == everything, "a write was lost or doubled"
    assert everything.startswith(at_checkpoint) and at_checkpoint.count(b"\n") >= 200

    kept = json.loads(ws.ctl("rollback", "e1", live["id"], "--json").stdout)["kept"]
    assert kept
    seen = ws.agentctl("run", "-q", "--env", "e1", "--", "cat", "log.txt", cwd=ws.project)
    assert seen.stdout.encode() == at_checkpoint
    made = ws.agentctl("run", "-q", "--env", "e1", "--engine", "fuse", "--", "ls", "made",
                       cwd=ws.project).stdout.split()
    # The job makes made/N after line N and removes made/N-100 after that: at the checkpoint,
    # those of the last 80 lines are there, none older than 100 lines, nothing newer.
    last = at_checkpoint.count(b"\n") - 1
    kept_files = {int(name) for name in made}
    assert {n for n in range(0, last + 1, 20) if last - 80 <= n <= last - 20} <= kept_files
    assert kept_files <= {n for n in range(0, last + 1, 20) if n >= last - 100}


def test_no_live_checkpoint_on_the_kernel_engine(ws: Workspace) -> None:
    ws.run("true")
    environ = {**os.environ, "ISOLATED_AGENT_HOME": str(ws.store_home)}
    job = subprocess.Popen(
        [sys.executable, "-m", "isolated_agent", "run", "-q", "--env", "e1", "--engine",
         "kernel", "--", "sh", "-c", "touch started; sleep 5"], cwd=ws.project, env=environ)
    try:
        wait_until(lambda: (upper_of(ws) / "started").exists())
        result = ws.ctl("checkpoint", "e1")
        assert result.returncode != 0
        assert result.stderr.count("\n") == 1 and "--engine fuse" in result.stderr
    finally:
        job.kill()
        job.wait()


KILLED_CHECKPOINT = """
import sys
from isolated_agent.env.stack import checkpoint
from isolated_agent.env.catalog import CheckpointRecord
from isolated_agent.env.layers import begin_freeze
from isolated_agent.env.store import Store
store = Store(sys.argv[1])
env = store.get("e1")
print("ready", flush=True)
checkpoint(store, env, "killed")
"""


def name_a_layer_without_freezing_it(ws: Workspace) -> None:
    """What `stack._checkpoint_live` does before it asks the daemons: the pending layer, and
    the catalog naming it on top of the env's stack."""
    store = Store(str(ws.store_home))
    env = store.get("e1")
    layer_id = secrets.token_hex(6)
    begin_freeze(store.home, env.id, layer_id)
    record = CheckpointRecord(secrets.token_hex(4), env.id, time.time(), "half done",
                              (*env.layers, layer_id))
    with store.catalog.transaction() as db:
        store.catalog.add_layer(db, layer_id, record.created)
        store.catalog.set_env_layers(db, env.id, record.layers)
        store.catalog.add_checkpoint(db, record)
    store.close()


def test_sigkill_during_live_checkpoints_loses_nothing(ws: Workspace) -> None:
    """Killed checkpoints leave layers the catalog names but no daemon froze; the next one
    (and, after the job, the env's next use) completes them bottom first, so newer writes are
    never covered by older ones."""
    ws.run("true")
    lines = 6000  # long enough to outlive the kills and the last checkpoint
    rng = random.Random(7)
    with fuse_job(ws, job_script(lines)) as job:
        upper = upper_of(ws)
        wait_until(lambda: lines_in(upper / "log.txt") >= 50)
        for _ in range(8):
            child = subprocess.Popen([sys.executable, "-c", KILLED_CHECKPOINT,
                                      str(ws.store_home)], stdout=subprocess.PIPE, text=True)
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0, 0.03))
            child.kill()
            child.wait()
        assert job.poll() is None, "the job ended too early for the test"
        name_a_layer_without_freezing_it(ws)  # as a kill right after the catalog would
        last = ws.ctl("checkpoint", "e1", "--json")
        assert last.returncode == 0 and json.loads(last.stdout)["paused_ms"], last.stderr

    store = Store(str(ws.store_home))
    env = store.get("e1")  # completes what a killed checkpoint left half done
    names = set(os.listdir(ws.store_home / "layers"))
    assert not [n for n in names if n.startswith(".")], names
    named = set(env.layers)
    for record in store.catalog.checkpoints(env.id):
        named |= set(record.layers)
    assert named <= names
    store.close()
    seen = ws.agentctl("run", "-q", "--env", "e1", "--", "cat", "log.txt", cwd=ws.project)
    assert seen.stdout == "".join(f"{n}\n" for n in range(lines)), "a write was lost"


def test_live_checkpoint_of_a_mounted_env(ws: Workspace, tmp_path: Path) -> None:
    """`agentctl mount` serves the env with agentfs too: it is checkpointed live as well, and
    what is written through the mount afterwards lands in the new upper."""
    ws.run("echo before > notes.txt")
    mountpoint = tmp_path / "view"
    mountpoint.mkdir()
    assert ws.ctl("mount", "e1", str(mountpoint)).returncode == 0
    try:
        with open(mountpoint / "notes.txt", "a") as notes:  # open across the checkpoint
            notes.write("during\n")
            notes.flush()
            live = json.loads(ws.ctl("checkpoint", "e1", "--json").stdout)
            assert len(live["paused_ms"]) == 1
            notes.write("after\n")
    finally:
        assert ws.ctl("umount", str(mountpoint)).returncode == 0
    store = Store(str(ws.store_home))
    env = store.get("e1")
    frozen = Path(store.layer_dir(env.layers[-1], 0))
    store.close()
    assert (frozen / "notes.txt").read_text() == "before\nduring\n"
    assert (upper_of(ws) / "notes.txt").read_text() == "before\nduring\nafter\n"
