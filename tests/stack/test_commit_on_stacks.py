"""Commit equivalence on stacks (DESIGN §11): the review suite's workloads, committed from a
stacked env (one layer per line of the workload, or 32 layers), a forked env and a rolled-back
env, leave the host exactly as running them directly does, with every replaced host file
restorable — and no frozen layer changed."""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.review.conftest import Workspace, link_groups, rmtree, tree_state
from tests.review.test_commit_equivalence import ONLY_ADDING, WORKLOADS, check_restorable


def ctl_ok(ws: Workspace, *args: str) -> str:
    result = ws.ctl(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def commit_and_compare(ws: Workspace, env: str, script: str, reference_script: str) -> int:
    before = tree_state(ws.project)
    reference = ws.direct(reference_script)
    layers = tree_state(ws.store_home / "layers")
    extra = ("--keep-setuid",) if "4755" in script else ()
    ctl_ok(ws, "commit", env, *extra)
    after = tree_state(ws.project)
    assert after == tree_state(reference)
    assert link_groups(ws.project) == link_groups(reference)
    assert ws.ctl("diff", env, "--name-status").stdout == ""
    assert tree_state(ws.store_home / "layers") == layers, "a commit changed a frozen layer"
    restored = check_restorable(ws, before, after, ws.tmp / "restored")
    rmtree(ws.tmp / "direct")
    rmtree(ws.tmp / "restored")
    return restored


def lines_of(script: str) -> list[str]:
    lines = [line for line in textwrap.dedent(script).splitlines() if line.strip()]
    return [line for line in lines if line.strip() != "set -e"]


# The workloads whose lines undo or build on each other's (a layer's whiteouts, opaque and
# retyped directories under the next one's); the others add nothing a stack could get wrong.
LAYERED = ["delete_tree", "dir_to_file_and_back", "kitchen_sink", "links_and_nodes",
           "non_utf8_names", "rename_dirs", "permissions"]


@pytest.mark.parametrize("name", LAYERED)
def test_one_layer_per_line(ws: Workspace, name: str) -> None:
    for line in lines_of(WORKLOADS[name]):
        ws.run(line)
        ctl_ok(ws, "checkpoint", "e1")
    restored = commit_and_compare(ws, "e1", WORKLOADS[name], WORKLOADS[name])
    assert (restored == 0) == (name in ONLY_ADDING)


@pytest.mark.parametrize("name", ["kitchen_sink", "dir_to_file_and_back"])
def test_thirty_two_layers(ws: Workspace, name: str) -> None:
    lines = lines_of(WORKLOADS[name])
    padding = [f"mkdir -p pad && echo {n} > pad/{n}" for n in range(32 - len(lines) - 1)]
    for line in [*padding, *lines, "rm -r pad"]:
        ws.run(line, engine="fuse")  # the kernel engine would squash past KERNEL_DEPTH
        ctl_ok(ws, "checkpoint", "e1")
    store_env = json.loads(ctl_ok(ws, "log", "e1", "--json"))["checkpoints"][0]
    assert store_env["layers"] == 32
    commit_and_compare(ws, "e1", WORKLOADS[name], WORKLOADS[name])


@pytest.mark.parametrize("name", ["kitchen_sink", "rename_dirs", "delete_tree", "symlinks"])
def test_forked_and_rolled_back(ws: Workspace, name: str) -> None:
    ws.run("echo parent >> README.md && echo p > parent.txt")
    base = json.loads(ctl_ok(ws, "checkpoint", "e1", "--json"))["id"]
    ctl_ok(ws, "fork", "e1", "f", "--at", base)
    ws.run(WORKLOADS[name], env="f")
    parent = "echo parent >> README.md && echo p > parent.txt\n"
    commit_and_compare(ws, "f", parent + WORKLOADS[name], parent + WORKLOADS[name])

    # e1 now: roll back past a junk change, then run the workload again from there.
    ws.run("echo junk > junk.txt && rm -rf docs")
    ctl_ok(ws, "checkpoint", "e1")
    ctl_ok(ws, "rollback", "e1", base)
    ws.run("echo again >> README.md")
    # The host has f's commit (the parent's change included); e1's README.md is the parent's
    # plus a line, which the host may have moved past: overwritten knowingly (conflicts on
    # forks: test_forks.py).
    ctl_ok(ws, "commit", "e1", "--force")
    assert (ws.project / "README.md").read_text().endswith("parent\nagain\n")
    assert not (ws.project / "junk.txt").exists()
