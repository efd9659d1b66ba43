"""Checkpoints and rollback (DESIGN §11): a stack of frozen layers under the live upper gives
the same view through every engine as the same workloads run on a plain copy; rollback gives a
checkpoint's view back exactly and loses nothing; commit of a stacked env equals running the
workloads directly and never touches a frozen layer."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from isolated_agent.engines.filter.identity import start_time
from isolated_agent.env.store import Store
from isolated_agent.fusefs import mount as mounts
from isolated_agent.protocol.frames import Code
from tests.agentfs.conftest import wait_for
from tests.filter.conftest import FilterDaemon
from tests.review.conftest import Workspace, copy_tree, tree_state

# What a process sees of its working directory: every entry's path, type and permission bits,
# and its content (sha256) or target. Run by the system python3: inside a job, /tmp (where a
# test's venv may live) is private.
DUMP = textwrap.dedent("""
    import hashlib, json, os, stat
    out = []
    for d, ds, fs in os.walk("."):
        for n in ds + fs:
            p = os.path.join(d, n)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                x = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                x = hashlib.sha256(open(p, "rb").read()).hexdigest()
            else:
                x = None
            out.append([p, oct(st.st_mode), x])
    print(json.dumps(sorted(out)))
""")

ENGINES = ("kernel", "fuse", "filter")  # the filter runs no job as root: see `filter_job`

# Each step changes what the one before it froze: files edited again, a directory deleted in a
# lower layer and made again above it (a whiteout under a directory: opaque), a tree added in
# one layer and removed in the next, a directory renamed away.
STEPS = (
    """
    echo more >> README.md
    mkdir -p newdir/sub && echo n > newdir/sub/f
    rm docs/guide.txt
    rm -r src/pkg
    echo x > src/added.py
    chmod 700 run.sh
    """,
    """
    echo again >> README.md
    rm -r newdir
    mkdir src/pkg && echo re > src/pkg/new.py
    echo guide2 > docs/guide.txt
    rm src/added.py
    ln -s main.py src/link2
    """,
    """
    rm README.md
    mkdir newdir && echo z > newdir/z
    echo y >> src/pkg/new.py
    mv docs docs2
    """,
)
LAST = """
    echo live > live.txt
    rm src/link2
    """


@contextmanager
def filter_job(ws: Workspace) -> Iterator[None]:
    """The filter engine's view of env e1, given to this test process (and its children): a
    real filter daemon over the project, with the env's stack registered as `run` does. The
    engine itself refuses to run a job as root, and the tests run as root."""
    store = Store(str(ws.store_home))
    root = store.get("e1").roots[0]
    store.close()
    daemon = FilterDaemon(ws.project, ws.tmp / "filter")
    daemon.start()
    try:
        daemon.ask(Code.REGISTER_JOB, job="test", env="e1", upper=root.upper, work=root.work,
                   layers=list(root.layers), cgroup=None,
                   anchor=[os.getpid(), start_time(os.getpid())])
        wait_for(lambda: mounts.is_fuse_mount(mounts.mount_entry(str(ws.project))),
                 what="filter")
        yield
    finally:
        daemon.stop()


def job(ws: Workspace, engine: str, *command: str) -> str:
    if engine == "filter":
        with filter_job(ws):
            return subprocess.run(command, cwd=ws.project, capture_output=True, text=True,
                                  check=True).stdout
    result = ws.agentctl("run", "-q", "--env", "e1", "--engine", engine, "--", *command,
                         cwd=ws.project, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def view(ws: Workspace, engine: str) -> object:
    return json.loads(job(ws, engine, "python3", "-c", DUMP))


def native_view(path: Path) -> object:
    result = subprocess.run(["python3", "-c", DUMP], cwd=path, capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout)


def run_in(ws: Workspace, engine: str, script: str, reference: Path) -> None:
    script = textwrap.dedent(script)
    job(ws, engine, "sh", "-ec", script)
    subprocess.run(["sh", "-ec", script], cwd=reference, check=True)


def ctl_json(ws: Workspace, *args: str) -> dict[str, object]:
    result = ws.ctl(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_stacked_env_is_one_view_on_every_engine_and_rolls_back_exactly(ws: Workspace) -> None:
    ws.run("true")  # creates e1
    host_before = tree_state(ws.project)
    reference = ws.tmp / "reference"
    copy_tree(ws.project, reference)
    checkpoints, states = [], []
    for step, engine in zip(STEPS, ENGINES, strict=True):
        run_in(ws, engine, step, reference)
        checkpoints.append(ctl_json(ws, "checkpoint", "e1", "-m", f"after {engine}")["id"])
        states.append(native_view(reference))
    run_in(ws, "kernel", LAST, reference)
    final = native_view(reference)
    assert tree_state(ws.project) == host_before, "a run wrote to the host"

    store = Store(str(ws.store_home))
    env = store.get("e1")
    assert len(env.layers) == 3
    store.close()
    for engine in ENGINES:
        assert view(ws, engine) == final, engine

    kept = ctl_json(ws, "rollback", "e1", str(checkpoints[0]))["kept"]
    assert kept
    for engine in ENGINES:
        assert view(ws, engine) == states[0], engine
    assert ctl_json(ws, "rollback", "e1", str(checkpoints[1]))["kept"] is None  # a checkpoint
    assert view(ws, "fuse") == states[1]

    log = ctl_json(ws, "log", "e1")["checkpoints"]
    assert [e["id"] for e in log] == [kept, *reversed(checkpoints)]
    assert [e["head"] for e in log] == [False, False, True, False]
    # The oldest against the host: README.md and run.sh modified; newdir, newdir/sub,
    # newdir/sub/f and src/added.py added; docs/guide.txt, src/pkg and its two files deleted.
    assert log[-1]["changes"] == {"A": 4, "M": 2, "T": 0, "D": 4}
    assert log[0]["message"] == f"before rollback to {checkpoints[0]}"

    assert ctl_json(ws, "rollback", "e1", str(kept))["kept"] is None
    assert view(ws, "kernel") == final

    layers_dir = ws.store_home / "layers"
    frozen = tree_state(layers_dir)
    result = ws.ctl("commit")
    assert result.returncode == 0, result.stderr
    assert tree_state(ws.project) == tree_state(reference)
    assert tree_state(layers_dir) == frozen, "commit changed a frozen layer"
    assert ws.ctl("diff", "--name-status").stdout == ""
    assert view(ws, "filter") == final


def test_diff_of_a_stacked_env_shows_every_layer(ws: Workspace) -> None:
    reference = ws.tmp / "reference"
    copy_tree(ws.project, reference)
    run_in(ws, "kernel", STEPS[0], reference)
    ctl_json(ws, "checkpoint", "e1")
    run_in(ws, "fuse", STEPS[1], reference)
    names = ws.ctl("diff", "--name-status").stdout.splitlines()
    # newdir came and went; src/pkg went and came back (its old files deleted, a new one added)
    assert sorted(names) == sorted([
        "M\tREADME.md", "M\tdocs/guide.txt", "M\trun.sh", "A\tsrc/link2",
        "D\tsrc/pkg/__init__.py", "D\tsrc/pkg/mod.py", "A\tsrc/pkg/new.py",
    ])


def test_discard_keeps_checkpoints_and_rm_removes_unused_layers(ws: Workspace) -> None:
    reference = ws.tmp / "reference"
    copy_tree(ws.project, reference)
    run_in(ws, "kernel", STEPS[0], reference)
    first = ctl_json(ws, "checkpoint", "e1")["id"]
    assert ctl_json(ws, "discard", "e1")["entries"] > 0
    assert ws.ctl("diff", "--name-status").stdout == ""
    ctl_json(ws, "rollback", "e1", str(first))
    assert view(ws, "kernel") == native_view(reference)
    assert len(os.listdir(ws.store_home / "layers")) == 1
    assert ws.ctl("env", "rm", "e1").returncode == 0
    assert os.listdir(ws.store_home / "layers") == []


def test_empty_checkpoint_adds_no_layer_and_errors_are_one_line(ws: Workspace) -> None:
    ws.run("true")
    first = ctl_json(ws, "checkpoint", "e1")
    second = ctl_json(ws, "checkpoint", "e1")
    assert first["layers"] == second["layers"] == 0
    result = ws.ctl("rollback", "e1", "nosuch")
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "no checkpoint 'nosuch'" in result.stderr
    assert "Traceback" not in result.stderr


def test_diff_between_checkpoints(ws: Workspace) -> None:
    reference = ws.tmp / "reference"
    copy_tree(ws.project, reference)
    ids = []
    for step in STEPS[:2]:
        run_in(ws, "kernel", step, reference)
        ids.append(str(ctl_json(ws, "checkpoint", "e1")["id"]))
    run_in(ws, "kernel", LAST, reference)
    between = ws.ctl("diff", "e1", "--from", ids[0], "--to", ids[1], "--name-status")
    assert between.stdout.splitlines() == [
        "M\tREADME.md", "A\tdocs/guide.txt", "D\tnewdir/", "D\tnewdir/sub/", "D\tnewdir/sub/f",
        "D\tsrc/added.py", "A\tsrc/link2", "A\tsrc/pkg/", "A\tsrc/pkg/new.py",
    ]
    since = ws.ctl("diff", "e1", "--from", ids[1], "--name-status")
    assert since.stdout.splitlines() == ["A\tlive.txt", "D\tsrc/link2"]
    patch = ws.ctl("diff", "e1", "--from", ids[0], "--to", ids[1], "README.md").stdout
    assert "+again" in patch and "-more" not in patch
    assert ws.ctl("diff", "e1", "--to", ids[0]).returncode != 0
