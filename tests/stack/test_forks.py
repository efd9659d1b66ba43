"""Forks (DESIGN §11): several envs over one project's frozen layers, running at the same time,
each committing or discarding its own change; a commit by one makes the host's newer files
conflicts for another that changed the same paths; shared layers never change. And gc."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.review.conftest import Workspace, tree_state


def ctl_json(ws: Workspace, *args: str) -> dict[str, object]:
    result = ws.ctl(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_four_forks_run_at_once_and_commit_on_their_own(ws: Workspace) -> None:
    ws.run("echo base >> README.md")
    base = ctl_json(ws, "checkpoint", "e1", "-m", "base")["id"]
    for i in range(1, 5):
        forked = ctl_json(ws, "fork", "e1", f"f{i}", "--at", str(base))
        assert forked["layers"] == 1
    host_before = tree_state(ws.project)

    jobs = []
    for i in range(1, 5):
        engine = "kernel" if i % 2 else "fuse"
        script = f"echo f{i} > own{i}.txt; sleep 1; [ {i} -gt 2 ] || echo f{i} >> README.md"
        jobs.append(subprocess.Popen(
            [sys.executable, "-m", "isolated_agent", "run", "-q", "--env", f"f{i}",
             "--engine", engine, "--", "sh", "-ec", script],
            cwd=ws.project, env={**os.environ, "ISOLATED_AGENT_HOME": str(ws.store_home)},
            stderr=subprocess.PIPE, text=True))
    for job in jobs:
        _, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
    assert tree_state(ws.project) == host_before

    for i in range(1, 5):
        names = ws.ctl("diff", f"f{i}", "--name-status").stdout.splitlines()
        assert sorted(names) == [f"A\town{i}.txt", "M\tREADME.md"]
    layers = tree_state(ws.store_home / "layers")
    log = ctl_json(ws, "log", "f1")["checkpoints"]
    assert log[0]["kind"] == "fork" and set(log[0]["shared_by"]) == {"e1", "f1", "f2", "f3", "f4"}

    assert ws.ctl("commit", "f1").returncode == 0
    readme = (ws.project / "README.md").read_text()
    assert readme.endswith("base\nf1\n") and (ws.project / "own1.txt").read_text() == "f1\n"

    conflicted = ws.ctl("commit", "f2")
    assert conflicted.returncode != 0 and "README.md" in conflicted.stderr
    assert (ws.project / "README.md").read_text() == readme
    assert not (ws.project / "own2.txt").exists()

    assert ctl_json(ws, "discard", "f3")["entries"] > 0
    assert ws.ctl("diff", "f3", "--name-status").stdout == ""

    # f4 did not touch README.md itself, but its view of it is e1's, which the host moved past.
    assert ws.ctl("commit", "f4").returncode != 0
    assert ws.ctl("commit", "f4", "own4.txt").returncode == 0
    assert (ws.project / "own4.txt").read_text() == "f4\n"
    assert (ws.project / "README.md").read_text() == readme
    assert tree_state(ws.store_home / "layers") == layers, "a commit changed a shared layer"


def test_fork_of_the_current_state_and_gc(ws: Workspace) -> None:
    ws.run("echo one > one.txt")
    forked = ctl_json(ws, "fork", "e1", "child")
    assert ws.ctl("diff", "child", "--name-status").stdout == "A\tone.txt\n"
    parent_log = ctl_json(ws, "log", "e1")["checkpoints"]
    assert parent_log[0]["message"] == "fork point of child"
    assert parent_log[0]["id"] in json.dumps(ctl_json(ws, "log", "child"))
    assert forked["layers"] == 1

    ws.run("echo two > two.txt", env="child")
    first = ctl_json(ws, "log", "child")["checkpoints"][-1]["id"]
    kept = ctl_json(ws, "rollback", "child", str(first))["kept"]
    assert len(os.listdir(ws.store_home / "layers")) == 2
    assert ctl_json(ws, "gc", "--older-than", "1h") == {"checkpoints": 0, "layers": []}
    collected = ctl_json(ws, "gc", "--older-than", "0s")
    assert collected["checkpoints"] == 1 and len(collected["layers"]) == 1  # two.txt's layer
    assert kept not in json.dumps(ctl_json(ws, "log", "child"))
    assert ws.ctl("diff", "child", "--name-status").stdout == "A\tone.txt\n"
    assert ws.ctl("env", "rm", "child").returncode == 0
    assert len(os.listdir(ws.store_home / "layers")) == 1  # e1's checkpoint still names it
