"""SIGKILL at random points of checkpoint, rollback and squash: the env is in its before or its
after state, no layer is lost and none leaked (DESIGN §11, env/layers.py)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from isolated_agent.env.changeset import Change, read_changeset, read_view_changes
from isolated_agent.env.layers import collect_layers
from isolated_agent.env.stack import checkpoint, layers_of, rollback
from isolated_agent.env.store import Store

# The child: everything imported and opened, then "ready", then the operation.
CHILD = """
import sys
from isolated_agent.env.squash import squash
from isolated_agent.env.stack import checkpoint, find_checkpoint, rollback
from isolated_agent.env.store import Store
store = Store(sys.argv[1])
env = store.get("e1")
target = find_checkpoint(store, env, sys.argv[3]) if sys.argv[2] == "rollback" else None
print("ready", flush=True)
if sys.argv[2] == "squash":
    squash(store, env)
elif target is None:
    checkpoint(store, env, "killed")
else:
    rollback(store, env, target)
print("done", flush=True)
"""


View = list[tuple[bytes, str, str]]


def signature(changes: list[Change]) -> View:
    """What a view shows that differs from the host: path, status, content."""
    return [(c.rel, c.status, "" if c.new is None or c.new.is_dir else hashlib.sha256(
        Path(os.fsdecode(c.new.path)).read_bytes()).hexdigest()) for c in changes]


def view_of(store: Store) -> View:
    env = store.get("e1")
    with store.lock(env, purpose="check it"):  # finishes an interrupted freeze
        return signature(read_changeset(store.get("e1")).changes)


def view_at(store: Store, checkpoint_id: str) -> View:
    """The view the env would have at a checkpoint, read from its layers alone."""
    env = store.get("e1")
    [record] = store.catalog.find_checkpoint(env.id, checkpoint_id)
    if not record.layers:
        return []
    return signature(read_view_changes(env, layers_of(store, env, record.layers)).changes)


def check_layers(store: Store, home: Path) -> None:
    """Every layer a stack names is on disk; nothing half-made or unnamed is left."""
    layers_dir = home / "layers"
    names = set(os.listdir(layers_dir))
    assert not [n for n in names if n.startswith(".")], names
    referenced = set(store.get("e1").layers)
    for record in store.catalog.checkpoints(store.get("e1").id):
        referenced |= set(record.layers)
    assert referenced <= names
    collect_layers(str(home), store.catalog)
    assert set(os.listdir(layers_dir)) == referenced


def kill_during(home: Path, *args: str) -> bool:
    """Run one operation in a child and SIGKILL it after a random delay; whether it finished."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(home), *args],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline() == "ready\n"
    time.sleep(random.uniform(0, 0.004))
    child.send_signal(signal.SIGKILL)
    out = child.stdout.read()
    child.wait()
    return "done" in out


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_during_checkpoint_and_rollback(tmp_path: Path, seed: int) -> None:
    random.seed(seed)
    home = tmp_path / "store"
    project = tmp_path / "project"
    project.mkdir()
    (project / "kept.txt").write_text("host\n")
    store = Store(str(home))
    env = store.create("e1", [str(project)])
    checkpoints = [checkpoint(store, env, "empty").id]
    finished = 0
    for step in range(12):
        env = store.get("e1")
        upper = Path(env.roots[0].upper)
        (upper / f"file{step}").write_text(f"step {step}\n")
        (upper / "kept.txt").write_text(f"env {step}\n")
        before = view_of(store)
        if kill_during(home, "checkpoint"):
            finished += 1
        assert view_of(store) == before  # a checkpoint never changes the view
        check_layers(store, home)
        last = store.catalog.checkpoints(env.id)[0]
        if last.message == "killed":
            checkpoints.append(last.id)

        target = random.choice(checkpoints)
        after = view_at(store, target)
        if kill_during(home, "rollback", target):
            finished += 1
        assert view_of(store) in (before, after)
        check_layers(store, home)
        if view_of(store) != before:  # rolled back: what was rolled away is a checkpoint
            kept = next(cp for cp in store.catalog.checkpoints(env.id)
                        if view_at(store, cp.id) == before)
            rollback(store, store.get("e1"), kept)
        assert view_of(store) == before

        if kill_during(home, "squash"):
            finished += 1
        assert view_of(store) == before  # nor does a squash
        check_layers(store, home)
    store.close()
    assert 0 < finished < 36, "the kills should land both during and after the operations"
