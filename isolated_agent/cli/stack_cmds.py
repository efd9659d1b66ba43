"""`agentctl checkpoint`, `log`, `rollback`, `fork`, `squash` and `gc`: an env's history
(DESIGN §11)."""

from __future__ import annotations

import functools
import os
from typing import Any

import click

from isolated_agent.cli.completion import checkpoint_ids, env_names, env_then_checkpoint
from isolated_agent.cli.output import emit_json, notice, table, when
from isolated_agent.env.catalog import CheckpointRecord
from isolated_agent.env.changeset import Change
from isolated_agent.env.selection import env_for_directory
from isolated_agent.env.stack import (
    changes_between,
    checkpoint,
    count_statuses,
    find_checkpoint,
    fork,
    gc,
    layers_of,
    rollback,
    state_changes,
)
from isolated_agent.env.store import Env, Store
from isolated_agent.errors import UsageError

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _env(store: Store, name: str | None) -> Env:
    return store.get(name) if name else env_for_directory(store, os.getcwd())


def _summary(record: CheckpointRecord, env: Env) -> dict[str, Any]:
    return {"id": record.id, "env": env.name, "created": when(record.created),
            "message": record.message, "kind": record.kind, "layers": len(record.layers)}


@click.command("checkpoint")
@click.argument("env_name", metavar="[ENV]", required=False, shell_complete=env_names)
@click.option("-m", "--message", default="", help="What this checkpoint is (shown by log).")
@json_option
def checkpoint_cmd(env_name: str | None, message: str, as_json: bool) -> None:
    """Keep the env's current state as a checkpoint, to roll back to or fork from later.

    O(1): the env's changes are frozen in place (renamed, not copied). A job running in the env
    on the fuse engine goes on while it is taken (it waits a fraction of a millisecond). ENV
    defaults to the env managing the current directory. Prints the checkpoint's id."""
    store = Store()
    env = _env(store, env_name)
    record = checkpoint(store, env, message)
    if as_json:
        emit_json({**_summary(record, env), "paused_ms": list(record.paused_ms)})
        return
    click.echo(record.id)
    if record.paused_ms:
        notice(f"checkpointed the running job (it waited {max(record.paused_ms):.1f} ms)")


@click.command("log")
@click.argument("env_name", metavar="[ENV]", required=False, shell_complete=env_names)
@json_option
def log_cmd(env_name: str | None, as_json: bool) -> None:
    """List the env's checkpoints, newest first, with what each changed since the one before
    (A added, M modified, T type changed, D deleted) and the envs that share it."""
    store = Store()
    env = _env(store, env_name)
    records = store.catalog.checkpoints(env.id)

    @functools.cache
    def changes_of(stack: tuple[str, ...]) -> list[Change]:  # each state read once
        return state_changes(env, layers_of(store, env, stack))

    entries = []
    for newer, older in zip(records, [*records[1:], None], strict=True):
        step = changes_between(env, changes_of(older.layers if older else ()),
                               changes_of(newer.layers))
        entry = _summary(newer, env)
        entry["changes"] = count_statuses(step.changes)
        entry["shared_by"] = store.catalog.envs_using(newer.layers) if newer.layers else []
        entry["head"] = newer.layers == env.layers  # the env's changes since sit on it
        entries.append(entry)
    if as_json:
        emit_json({"env": env.name, "checkpoints": entries})
        return
    if not entries:
        notice(f"env {env.name} has no checkpoints; `agentctl checkpoint {env.name}` makes one")
        return
    rows = [[e["id"] + (" *" if e["head"] else ""), e["created"],
             " ".join(f"{n}{s}" for s, n in e["changes"].items() if n) or "-",
             ", ".join(e["shared_by"]), e["message"]] for e in entries]
    table(["CHECKPOINT", "CREATED", "CHANGES", "SHARED BY", "MESSAGE"], rows)


@click.command("rollback")
@click.argument("args", nargs=-1, metavar="[ENV] CHECKPOINT", shell_complete=env_then_checkpoint)
@json_option
def rollback_cmd(args: tuple[str, ...], as_json: bool) -> None:
    """Make the env's view exactly that of one of its checkpoints.

    Nothing is lost: the state rolled away is kept as a checkpoint (printed), so a rollback is
    undone by rolling back to it. CHECKPOINT may be a prefix of the id."""
    if len(args) not in (1, 2):
        raise UsageError("give the checkpoint to roll back to (and the env before it)")
    store = Store()
    env = _env(store, args[0] if len(args) == 2 else None)
    target = find_checkpoint(store, env, args[-1])
    kept = rollback(store, env, target)
    if as_json:
        emit_json({"env": env.name, "checkpoint": target.id,
                   "kept": kept.id if kept is not None else None})
        return
    if kept is not None:
        notice(f"env {env.name} is at checkpoint {target.id}; what it was is kept as "
               f"checkpoint {kept.id} (`agentctl rollback {env.name} {kept.id}` undoes this)")
    else:
        notice(f"env {env.name} is at checkpoint {target.id}")


@click.command("fork")
@click.argument("env_name", metavar="ENV", shell_complete=env_names)
@click.argument("new_name", metavar="NEW")
@click.option("--at", "at", metavar="CHECKPOINT", shell_complete=checkpoint_ids,
              help="Start from this checkpoint of ENV (default: ENV as it is now).")
@json_option
def fork_cmd(env_name: str, new_name: str, at: str | None, as_json: bool) -> None:
    """Make a new env NEW that starts from ENV's state, sharing its frozen layers (O(1), no
    copy). Each runs, commits and discards on its own."""
    store = Store()
    env = store.get(env_name)
    new, start = fork(store, env, new_name, find_checkpoint(store, env, at) if at else None)
    if as_json:
        emit_json({"env": new.name, "id": new.id, "from": env.name,
                   "checkpoint": start.id, "layers": len(start.layers)})
    else:
        notice(f"env {new.name} starts from env {env.name} ({start.message})")
        click.echo(new.name)


@click.command("squash")
@click.argument("env_name", metavar="[ENV]", required=False, shell_complete=env_names)
@json_option
def squash_cmd(env_name: str | None, as_json: bool) -> None:
    """Merge the env's own frozen layers into one (those it shares with forks stay as they
    are). Its view does not change; its checkpoints keep their layers until gc."""
    from isolated_agent.env.squash import squash

    store = Store()
    env = _env(store, env_name)
    done = squash(store, env)
    if as_json:
        emit_json({"env": env.name, "merged": list(done.merged) if done else [],
                   "layer": done.layer if done else None})
    elif done is None:
        notice(f"env {env.name} has fewer than two layers of its own: nothing to squash")
    else:
        notice(f"merged {len(done.merged)} layers of env {env.name} into one")


@click.command("gc")
@click.option("--older-than", default="7d", show_default=True, metavar="AGE",
              help="Drop the checkpoints rollbacks kept that are older than this (30m, 2h, 3d, "
                   "1w, or a date).")
@json_option
def gc_cmd(older_than: str, as_json: bool) -> None:
    """Drop old checkpoints kept by rollbacks, and every layer no env or checkpoint uses.
    Checkpoints you made are never dropped by gc."""
    from isolated_agent.backup.restore import parse_time

    store = Store()
    dropped, layers = gc(store, parse_time(older_than))
    if as_json:
        emit_json({"checkpoints": dropped, "layers": layers})
    else:
        notice(f"dropped {dropped} rolled-away checkpoints and {len(layers)} unused layers")
