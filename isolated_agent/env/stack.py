"""Checkpoints, rollback and forks: an env's history on its layer stack (DESIGN §11).

A checkpoint freezes the env's live upper into a new layer on top of its stack (a rename per
root, layers.py) and records the stack: O(1), whatever the env holds. An env whose upper is empty
gets a checkpoint of the stack as it is, with no new layer.

A rollback points the env's stack at a checkpoint's, under a new empty upper — O(1) too. What it
rolls away is checkpointed first (unless it is a checkpoint already), so a rollback is undone by
rolling back to that one.

A fork is a new env over the same roots whose stack is a checkpoint's: the frozen layers are
shared, never copied, and each env writes its own upper. Its first checkpoint records where it
started.

`gc` drops the checkpoints rollbacks kept once they are older than the retention the user gives,
then every layer nothing names any more.

Rollback, fork and squash hold the env's lock: the env must not be in use by a job. So does a
checkpoint, except of a job running on agentfs (`run --engine fuse`): that one is taken live,
each root's daemon freezing its upper between two of the job's requests (`_checkpoint_live`).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from isolated_agent.env.catalog import FORK, ROLLED_AWAY, CheckpointRecord
from isolated_agent.env.changeset import (
    ADDED,
    DELETED,
    MODIFIED,
    TYPE_CHANGED,
    Change,
    Changeset,
    Entry,
    data_xattrs,
    read_view_changes,
    same_content,
)
from isolated_agent.env.layers import (
    begin_freeze,
    collect_layers,
    finish_rename,
    freeze,
    pending_layers,
)
from isolated_agent.env.selection import Selection
from isolated_agent.env.squash import SQUASH_DEPTH, squash_locked
from isolated_agent.env.store import Env, Store, live_socket_path, show_host_root
from isolated_agent.errors import EnvBusy, StoreError, UsageError
from isolated_agent.protocol.client import ControlError, request
from isolated_agent.protocol.frames import Code, Frame


def checkpoint(store: Store, env: Env, message: str = "") -> CheckpointRecord:
    """Freeze the env's current state as a checkpoint; returns it. An env a job runs in on
    the fuse engine is checkpointed live (`_checkpoint_live`)."""
    try:
        with store.lock(env, purpose="checkpoint it"):
            return _checkpoint_locked(store, store.get(env.id), message, "user")
    except EnvBusy as busy:
        sockets = [live_socket_path(store.run_dir, env.id, r.index) for r in env.roots]
        if not all(_answers(path) for path in sockets):
            raise EnvBusy(f"{busy}; only a job run with --engine fuse can be checkpointed "
                          "while it runs") from None
        return _checkpoint_live(store, env, message, sockets)


def _answers(path: str) -> bool:
    try:
        return request(path, Frame(Code.HEARTBEAT), timeout=2.0).code is Code.ACK
    except ControlError:
        return False


def _checkpoint_live(store: Store, env: Env, message: str, sockets: list[str]
                     ) -> CheckpointRecord:
    """A checkpoint of an env a job runs in on the fuse engine: the catalog first (the layer,
    the stack, the checkpoint), then each root's agentfs daemon freezes its upper into the
    pending layer between two requests (engines/fuse/daemon.py), then the layer takes its
    name. A crash in between leaves a pending layer the catalog names, which the env's next
    lock completes with the uppers as they are then (layers.py): nothing is lost."""
    with _one_live_checkpoint_at_a_time(env):
        env = store.get(env.id)
        _resume_live_freezes(store, env, sockets)
        layer_id = secrets.token_hex(6)
        record = CheckpointRecord(secrets.token_hex(4), env.id, time.time(), message,
                                  (*env.layers, layer_id))
        pending = begin_freeze(store.home, env.id, layer_id)
        with store.catalog.transaction() as db:
            store.catalog.add_layer(db, layer_id, record.created)
            store.catalog.set_env_layers(db, env.id, record.layers)
            store.catalog.add_checkpoint(db, record)
        paused = _freeze_live(env, sockets, pending, record.id)
        finish_rename(pending, store.layer_dir(layer_id))
        return replace(record, paused_ms=tuple(paused))


def _freeze_live(env: Env, sockets: list[str], pending: str, checkpoint_id: str
                 ) -> list[float]:
    """Ask each root's daemon to freeze its upper into `pending`; how long each paused."""
    paused = []
    for root, path in zip(env.roots, sockets, strict=True):
        into = os.path.join(pending, "roots", str(root.index))
        if os.path.lexists(into):
            continue  # frozen by an earlier try
        try:
            reply = request(path, Frame(Code.FREEZE, {"into": into}))
        except ControlError as e:
            raise StoreError(
                f"checkpoint {checkpoint_id} of env {env.name} is recorded, but the agentfs "
                f"daemon of {root.path} did not freeze it ({e}); it is completed when the "
                "job ends") from e
        paused.append(float(reply.body["paused_ms"]))
    return paused


def _resume_live_freezes(store: Store, env: Env, sockets: list[str]) -> None:
    """Finish the live checkpoints a killed `agentctl checkpoint` left named but not frozen,
    bottom first, before a new layer goes on top of them: the lowest takes what the job wrote
    since, the others nothing — never newer content under older."""
    for pending in pending_layers(store.home, store.catalog, env.id):
        if pending.freeze and pending.named:
            _freeze_live(env, sockets, pending.path, pending.layer_id)
            finish_rename(pending.path, store.layer_dir(pending.layer_id))


@contextmanager
def _one_live_checkpoint_at_a_time(env: Env) -> Iterator[None]:
    fd = os.open(os.path.join(env.dir, "live.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fork(store: Store, env: Env, name: str, at: CheckpointRecord | None = None
         ) -> tuple[Env, CheckpointRecord]:
    """A new env named `name` that starts from checkpoint `at` of `env` (default: `env` as it
    is now, checkpointed first). Returns it and its first checkpoint."""
    if at is None:
        at = checkpoint(store, env, f"fork point of {name}")
    start = CheckpointRecord(secrets.token_hex(4), "", time.time(),
                             f"forked from {env.name} at {at.id}", at.layers, FORK)

    def record_in(db: sqlite3.Connection, new_id: str) -> None:
        store.catalog.set_env_layers(db, new_id, at.layers)
        store.catalog.add_checkpoint(db, replace(start, env_id=new_id))

    new = store.create(name, [root.path for root in env.roots], record_in)
    return new, replace(start, env_id=new.id)


def gc(store: Store, rolled_away_before: float) -> tuple[int, list[str]]:
    """Drop the checkpoints rollbacks kept that were made before `rolled_away_before`, then the
    layers nothing names; returns how many checkpoints and which layers went."""
    with store.catalog.transaction() as db:
        dropped = store.catalog.remove_checkpoints(db, ROLLED_AWAY, rolled_away_before)
    return dropped, collect_layers(store.home, store.catalog)


def rollback(store: Store, env: Env, target: CheckpointRecord) -> CheckpointRecord | None:
    """Make the env's view exactly `target`'s. Returns the checkpoint that keeps what was rolled
    away (None when that state was a checkpoint already)."""
    with store.lock(env, purpose="roll it back"):
        env = store.get(env.id)
        kept = None
        if not _upper_empty(env) or env.layers not in {
                cp.layers for cp in store.catalog.checkpoints(env.id)}:
            kept = _checkpoint_locked(store, env, f"before rollback to {target.id}",
                                      ROLLED_AWAY)
        with store.catalog.transaction() as db:
            store.catalog.set_env_layers(db, env.id, target.layers)
        return kept


def find_checkpoint(store: Store, env: Env, given: str) -> CheckpointRecord:
    """The env's checkpoint whose id is, or starts with, `given`."""
    found = store.catalog.find_checkpoint(env.id, given) if given else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(
            f"env {env.name} has no checkpoint {given!r}; `agentctl log {env.name}` lists them")
    raise UsageError(f"{given!r} names several checkpoints of env {env.name}; give more of it")


def _checkpoint_locked(store: Store, env: Env, message: str, kind: str) -> CheckpointRecord:
    checkpoint_id = secrets.token_hex(4)
    created = time.time()
    if _upper_empty(env):
        record = CheckpointRecord(checkpoint_id, env.id, created, message, env.layers, kind)
        with store.catalog.transaction() as db:
            store.catalog.add_checkpoint(db, record)
        return record

    def with_layer(layer_id: str) -> CheckpointRecord:
        return CheckpointRecord(checkpoint_id, env.id, created, message,
                                (*env.layers, layer_id), kind)

    def record_in(db: sqlite3.Connection, layer_id: str) -> None:
        store.catalog.set_env_layers(db, env.id, with_layer(layer_id).layers)
        store.catalog.add_checkpoint(db, with_layer(layer_id))

    layer_id = freeze(store.home, store.catalog, env.id,
                      [(r.index, r.upper) for r in env.roots], record_in)
    for root in env.roots:
        show_host_root(root)  # the new upper's root shows the host root's bits, as before
    if len(env.layers) + 1 > SQUASH_DEPTH:
        squash_locked(store, store.get(env.id))
    return with_layer(layer_id)


def _upper_empty(env: Env) -> bool:
    for root in env.roots:
        with os.scandir(root.upper) as entries:
            if next(entries, None) is not None:
                return False
    return True


# -- what changed between two states ---------------------------------------------------------


def layers_of(store: Store, env: Env, stack: tuple[str, ...]) -> dict[int, list[str]]:
    """The layer directories of `stack` (bottom first) per root, top first."""
    return {root.index: [store.layer_dir(layer, root.index) for layer in reversed(stack)]
            for root in env.roots}


def compare_states(
    env: Env, older: dict[int, list[str]], newer: dict[int, list[str]],
    selection: Selection | None = None,
) -> Changeset:
    """How the view `newer` (layers per root, top first) differs from the view `older`, as a
    changeset whose old sides are `older`'s entries and new sides `newer`'s."""
    selection = selection or Selection(None)
    return changes_between(env, state_changes(env, older, selection),
                           state_changes(env, newer, selection), selection)


def state_changes(env: Env, layers: dict[int, list[str]],
                  selection: Selection | None = None) -> list[Change]:
    """How the view `layers` (per root, top first) differs from the host as it is."""
    if not any(layers.values()):
        return []
    return read_view_changes(env, layers, selection).changes


def changes_between(env: Env, older: list[Change], newer: list[Change],
                    selection: Selection | None = None) -> Changeset:
    """The changeset from one view to another, given each one's changes against the host (as
    `state_changes` reads them): a path neither changed is the host's in both."""
    before = {(c.root, c.rel): c for c in older}
    after = {(c.root, c.rel): c for c in newer}
    result = Changeset(env, selection or Selection(None))
    for root, rel in sorted(before.keys() | after.keys()):
        b, a = before.get((root, rel)), after.get((root, rel))
        old = b.new if b is not None else a.old if a is not None else None
        new = a.new if a is not None else b.old if b is not None else None
        change = _step(root, rel, old, new)
        if change is not None:
            result.changes.append(change)
    return result


def count_statuses(changes: list[Change]) -> dict[str, int]:
    counts = {ADDED: 0, MODIFIED: 0, TYPE_CHANGED: 0, DELETED: 0}
    for change in changes:
        counts[change.status] += 1
    return counts


def _step(root: int, rel: bytes, old: Entry | None, new: Entry | None) -> Change | None:
    """The change from `old` to `new` at one path, if they differ."""
    if old is None and new is None:
        return None
    if old is None or new is None:
        return Change(root, rel, ADDED if old is None else DELETED, old, new, b"", True)
    if stat.S_IFMT(old.mode) != stat.S_IFMT(new.mode):
        return Change(root, rel, TYPE_CHANGED, old, new, b"", True)
    if old.path == new.path:
        return None  # the same entry of the same layer
    content_changed = not old.is_dir and not same_content(old, new)
    xattrs_changed = data_xattrs(old.path) != data_xattrs(new.path)
    if content_changed or xattrs_changed or (old.perms, old.owner) != (new.perms, new.owner):
        return Change(root, rel, MODIFIED, old, new, b"", content_changed, xattrs_changed)
    return None
