"""Frozen layers on disk: freezing an env's uppers into a new layer, finishing a freeze a crash
interrupted, and removing the layers no stack names any more (DESIGN §11).

A freeze is a rename per root, never a copy, in three steps that each leave a state a later
`finish_interrupted_freeze` completes or undoes — so a crash anywhere leaves the env as it was
before, or as it is after, and no layer lost or leaked:

    1. every root's upper is renamed into `layers/.freezing-<env>-<layer>/roots/<n>`, and an empty
       upper made in its place (a crash here: the uppers are moved back);
    2. one catalog transaction adds the layer and whatever the caller records with it (the env's
       new stack, the checkpoint) — the point of no return;
    3. the pending directory is renamed to `layers/<layer>` (a crash before it: it is finished).

The env is locked while it is frozen, and an interrupted freeze is finished whenever its lock is
next taken, before anything reads the env's layers.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from isolated_agent.env.catalog import Catalog
from isolated_agent.errors import StoreError
from isolated_agent.system.durable import fsync_dir
from isolated_agent.system.trees import remove_tree

Uppers = Sequence[tuple[int, str]]  # (root index, path of that root's upper)

FREEZING = ".freezing-"
SQUASHING = ".squashing-"  # a merged layer being built (squash.py)
_REMOVING = ".removing-"


def freeze(home: str, catalog: Catalog, env_id: str, uppers: Uppers,
           record: Callable[[sqlite3.Connection, str], None]) -> str:
    """Freeze the uppers into a new layer; `record(db, layer_id)` runs inside the transaction
    that makes it exist. Returns the layer's id."""
    layer_id = secrets.token_hex(6)
    pending = begin_freeze(home, env_id, layer_id)
    for index, upper in uppers:
        os.rename(upper, os.path.join(pending, "roots", str(index)))
        os.mkdir(upper, 0o755)
    # No fsync between the steps: a crash, or a power cut, leaves some prefix of them (one
    # filesystem journals its metadata in order), and each prefix is finished or undone. The
    # one fsync at the end makes the result durable before this returns.
    with catalog.transaction() as db:
        catalog.add_layer(db, layer_id, time.time())
        record(db, layer_id)
    finish_rename(pending, os.path.join(home, "layers", layer_id))
    return layer_id


def begin_freeze(home: str, env_id: str, layer_id: str) -> str:
    """The directory a freeze of env `env_id` into layer `layer_id` fills: `<it>/roots/<n>`."""
    pending = os.path.join(home, "layers", f"{FREEZING}{env_id}-{layer_id}")
    os.makedirs(os.path.join(pending, "roots"), mode=0o700)
    return pending


def finish_rename(pending: str, final: str) -> None:
    """The last step of making a layer: its directory takes its name."""
    os.rename(pending, final)
    fsync_dir(os.path.dirname(final))


@dataclass(frozen=True)
class Pending:
    """A layer directory that a freeze or a squash of an env left half made."""

    path: str
    layer_id: str
    freeze: bool  # a freeze (`.freezing-`), else a squash
    named: bool  # the catalog has the layer: it is to be finished, not undone


def has_pending_layers(home: str, env_id: str) -> bool:
    return bool(_pending_names(home, env_id))


def pending_layers(home: str, catalog: Catalog, env_id: str) -> list[Pending]:
    """The env's half-made layers: those the catalog does not name first, then those it names
    in stack order, bottom first — a live checkpoint's layer is named before it is frozen, and
    the lowest unfrozen one must take the upper's content (those above it, nothing), or older
    content would cover newer."""
    position = {layer: i for i, layer in enumerate(catalog.env_layers(env_id))}
    found = []
    for name in _pending_names(home, env_id):
        layer_id = name.rsplit("-", 1)[1]
        found.append(Pending(os.path.join(home, "layers", name), layer_id,
                             name.startswith(FREEZING), catalog.has_layer(layer_id)))
    return sorted(found, key=lambda pending: position.get(pending.layer_id, -1))


def _pending_names(home: str, env_id: str) -> list[str]:
    prefixes = (f"{FREEZING}{env_id}-", f"{SQUASHING}{env_id}-")
    try:
        return [n for n in os.listdir(os.path.join(home, "layers")) if n.startswith(prefixes)]
    except FileNotFoundError:
        return []


def finish_interrupted_freeze(home: str, catalog: Catalog, env_id: str, uppers: Uppers) -> None:
    """Complete or undo a freeze (or squash) of this env that a crash interrupted (see the
    module): a layer the catalog has takes its name; one it has not goes — after a freeze's
    uppers are moved back."""
    layers_dir = os.path.join(home, "layers")
    for pending in pending_layers(home, catalog, env_id):
        if pending.named:
            if pending.freeze:
                _complete(pending.path, uppers)
            finish_rename(pending.path, os.path.join(layers_dir, pending.layer_id))
            continue
        if pending.freeze:
            _move_back(pending.path, dict(uppers))
        remove_tree(pending.path)
        fsync_dir(layers_dir)


def _complete(pending: str, uppers: Uppers) -> None:
    """A live checkpoint (stack.py) is in the catalog before its daemons freeze the uppers; a
    root its daemon never froze (the job ended, the checkpoint command died) is frozen now,
    as it is: nothing the job wrote is lost, and the checkpoint holds it. Unfrozen pending
    layers are always the top of the stack (`stack._resume_live_freezes`), completed bottom
    first (`pending_layers`)."""
    for index, upper in uppers:
        target = os.path.join(pending, "roots", str(index))
        if not os.path.lexists(target):
            os.rename(upper, target)
            os.mkdir(upper, 0o755)


def _move_back(pending: str, uppers: dict[int, str]) -> None:
    roots = os.path.join(pending, "roots")
    try:
        moved = os.listdir(roots)
    except FileNotFoundError:
        return  # killed before anything was moved
    for part in moved:
        upper = uppers.get(int(part))
        if upper is None:
            continue
        try:
            os.rmdir(upper)  # the empty upper step 1 made; nothing used it since
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(
                f"an interrupted checkpoint left {os.path.join(roots, part)} and a non-empty "
                f"{upper}; move one of them aside by hand: {e.strerror}") from e
        os.rename(os.path.join(roots, part), upper)
        fsync_dir(os.path.dirname(upper))


def collect_layers(home: str, catalog: Catalog) -> list[str]:
    """Remove every layer no env's stack and no checkpoint names; returns their ids. The rows go
    first (in one transaction that also decides which are unreferenced, so a concurrent fork
    cannot pick one up half-way), then the directories; a directory left behind by a crash
    between the two has no row and is swept here too."""
    with catalog.transaction() as db:
        unreferenced = catalog.unreferenced_layers()
        catalog.remove_layers(db, unreferenced)
    layers_dir = os.path.join(home, "layers")
    try:
        names = os.listdir(layers_dir)
    except FileNotFoundError:
        return unreferenced
    for name in names:
        if name.startswith((FREEZING, SQUASHING)):
            continue  # its env's next lock finishes or undoes it
        if not name.startswith(_REMOVING):
            if catalog.has_layer(name):
                continue
            trash = os.path.join(layers_dir, f"{_REMOVING}{name}")
            os.rename(os.path.join(layers_dir, name), trash)
            name = os.path.basename(trash)
        remove_tree(os.path.join(layers_dir, name))
    return unreferenced
