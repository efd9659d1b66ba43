"""Squash (DESIGN §11): the env's private layers become one, its view is unchanged on every
engine, shared layers and checkpoints keep theirs, conflict detection still knows when the env
took each path over; a stack never grows past SQUASH_DEPTH."""

from __future__ import annotations

import json
import os
from pathlib import Path

from isolated_agent.env.changeset import read_changeset
from isolated_agent.env.squash import KERNEL_DEPTH, SQUASH_DEPTH
from isolated_agent.env.stack import checkpoint
from isolated_agent.env.store import Store
from tests.review.conftest import Workspace, copy_tree, tree_state
from tests.stack.test_checkpoints import (
    LAST,
    STEPS,
    ctl_json,
    native_view,
    run_in,
    view,
)


def test_squash_keeps_the_view_and_the_shared_layers(ws: Workspace) -> None:
    reference = ws.tmp / "reference"
    copy_tree(ws.project, reference)
    run_in(ws, "kernel", STEPS[0], reference)
    ctl_json(ws, "checkpoint", "e1")
    ctl_json(ws, "fork", "e1", "sibling")  # shares e1's first layer from here on
    states = []
    for step in STEPS[1:]:
        run_in(ws, "fuse", step, reference)
        states.append(ctl_json(ws, "checkpoint", "e1")["id"])
    run_in(ws, "kernel", LAST, reference)
    expected = native_view(reference)
    before_layers = set(os.listdir(ws.store_home / "layers"))
    frozen = tree_state(ws.store_home / "layers")

    squashed = ctl_json(ws, "squash", "e1")
    assert len(squashed["merged"]) == 2  # the two private layers; the shared one stays
    store = Store(str(ws.store_home))
    assert len(store.get("e1").layers) == 2
    store.close()
    for engine in ("kernel", "fuse", "filter"):
        assert view(ws, engine) == expected, engine
    after = tree_state(ws.store_home / "layers")
    assert {k: v for k, v in after.items() if k.split(b"/")[0] in {
        os.fsencode(n) for n in before_layers}} == frozen, "squash changed a layer"
    assert ctl_json(ws, "squash", "e1")["merged"] == []  # one private layer left

    ctl_json(ws, "rollback", "e1", str(states[0]))  # the old layers serve the checkpoints
    assert ws.ctl("diff", "e1", "--from", str(states[0]), "--to", str(states[1]),
                  "--name-status").stdout.splitlines() == [
        "D\tREADME.md", "D\tdocs/", "D\tdocs/guide.txt", "A\tdocs2/", "A\tdocs2/guide.txt",
        "A\tnewdir/", "A\tnewdir/z", "M\tsrc/pkg/new.py"]


def test_conflicts_still_seen_after_squash(ws: Workspace) -> None:
    ws.run("rm -r docs && mkdir docs && echo new > docs/new.txt")
    ctl_json(ws, "checkpoint", "e1")
    (ws.project / "docs" / "guide.txt").write_text("changed on the host after the env\n")
    ws.run("echo more >> README.md")
    ctl_json(ws, "checkpoint", "e1")
    assert len(ctl_json(ws, "squash", "e1")["merged"]) == 2
    result = ws.ctl("commit", "e1")
    assert result.returncode != 0 and "docs/guide.txt" in result.stderr
    assert (ws.project / "docs" / "guide.txt").read_text().startswith("changed on the host")


def test_a_stack_never_grows_past_the_squash_depth(ws: Workspace) -> None:
    ws.run("true")
    store = Store(str(ws.store_home))
    for number in range(SQUASH_DEPTH + 1):
        env = store.get("e1")
        upper = Path(env.roots[0].upper)
        (upper / f"f{number}").write_text(f"{number}\n")
        if number == 1:
            os.mknod(upper / "README.md", 0o20000, 0)  # a whiteout: README.md deleted
        if number == 5:
            (upper / "README.md").write_text("back\n")
        checkpoint(store, env)
        depth = number + 1 if number < SQUASH_DEPTH else 1  # the 33rd merges all 33
        assert len(store.get("e1").layers) == depth
    changes = read_changeset(store.get("e1")).changes
    store.close()
    assert [(c.rel, c.status) for c in changes] == [
        (b"README.md", "M"), *sorted((b"f%d" % n, "A") for n in range(SQUASH_DEPTH + 1))]
    listing = json.loads(ws.agentctl(
        "run", "-q", "--env", "e1", "--engine", "kernel", "--", "python3", "-c",
        "import json, os; print(json.dumps(sorted(os.listdir('.'))))",
        cwd=ws.project).stdout)
    assert "f32" in listing and "README.md" in listing
    assert (ws.project / "README.md").read_text() == "# demo\n"


def test_the_kernel_engine_squashes_a_stack_deeper_than_it_reads_fast(ws: Workspace) -> None:
    """Past KERNEL_DEPTH layers a kernel-engine run merges the env's own layers first (the
    overlay rebuilds merged listings from every layer); agentfs reads deep stacks at speed and
    leaves them."""
    ws.run("true")
    store = Store(str(ws.store_home))
    for number in range(KERNEL_DEPTH + 1):
        env = store.get("e1")
        (Path(env.roots[0].upper) / f"f{number}").write_text(f"{number}\n")
        checkpoint(store, env)
    listing = "import json, os; print(json.dumps(sorted(os.listdir('.'))))"
    on_fuse = ws.agentctl("run", "--env", "e1", "--engine", "fuse", "--", "python3", "-c",
                          listing, cwd=ws.project)
    assert on_fuse.returncode == 0, on_fuse.stderr
    assert "squashed" not in on_fuse.stderr
    assert len(store.get("e1").layers) == KERNEL_DEPTH + 1
    on_kernel = ws.agentctl("run", "--env", "e1", "--engine", "kernel", "--", "python3", "-c",
                            listing, cwd=ws.project)
    assert on_kernel.returncode == 0, on_kernel.stderr
    assert f"squashed the {KERNEL_DEPTH + 1} layers of env e1 into one" in on_kernel.stderr
    assert len(store.get("e1").layers) == 1
    assert json.loads(on_kernel.stdout) == json.loads(on_fuse.stdout)
    assert len(store.catalog.checkpoints(store.get("e1").id)) == KERNEL_DEPTH + 1  # all kept
    store.close()
