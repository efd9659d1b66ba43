"""`agentctl env create|list|show|rm` and `agentctl discard`."""

from __future__ import annotations

from typing import Any

import click

from isolated_agent.cli.completion import env_names
from isolated_agent.cli.output import emit_json, notice, table, when
from isolated_agent.env.store import Env, Store, count_changes

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def env_summary(store: Store, env: Env) -> dict[str, Any]:
    return {
        "id": env.id,
        "name": env.name,
        "created": when(env.created),
        "roots": [{"path": r.path, "upper": r.upper, "work": r.work} for r in env.roots],
        "changes": count_changes(env),
        "layers": len(env.layers),
        "checkpoints": len(store.catalog.checkpoints(env.id)),
        "in_use": store.in_use(env),
    }


@click.group("env")
def env_group() -> None:
    """Create, list, inspect and remove envs."""


@env_group.command("create")
@click.argument("name", required=False)
@click.option("--root", "roots", multiple=True, metavar="DIR",
              help="A managed root (repeatable). Default: the current directory.")
@json_option
def create_cmd(name: str | None, roots: tuple[str, ...], as_json: bool) -> None:
    """Create an env over one or more roots."""
    store = Store()
    env = store.create(name, store.resolve_roots(list(roots)))
    if as_json:
        emit_json(env_summary(store, env))
    else:
        click.echo(env.name)


@env_group.command("list")
@json_option
def list_cmd(as_json: bool) -> None:
    """List the envs."""
    store = Store()
    summaries = [env_summary(store, env) for env in store.list_envs()]
    if as_json:
        emit_json(summaries)
        return
    rows = [
        [
            s["name"],
            s["id"],
            ", ".join(r["path"] for r in s["roots"]),
            str(s["changes"]),
            "yes" if s["in_use"] else "",
            s["created"],
        ]
        for s in summaries
    ]
    table(["NAME", "ID", "ROOTS", "CHANGES", "IN USE", "CREATED"], rows)


@env_group.command("show")
@click.argument("name", shell_complete=env_names)
@json_option
def show_cmd(name: str, as_json: bool) -> None:
    """Show one env."""
    store = Store()
    summary = env_summary(store, store.get(name))
    if as_json:
        emit_json(summary)
        return
    click.echo(f"name:    {summary['name']}")
    click.echo(f"id:      {summary['id']}")
    click.echo(f"created: {summary['created']}")
    click.echo(f"changes: {summary['changes']} entries in its layers")
    click.echo(f"stack:   {summary['layers']} frozen layers, {summary['checkpoints']} checkpoints")
    click.echo(f"in use:  {'yes' if summary['in_use'] else 'no'}")
    for root in summary["roots"]:
        click.echo(f"root:    {root['path']}")
        click.echo(f"  upper: {root['upper']}")


@env_group.command("rm")
@click.argument("name", shell_complete=env_names)
@json_option
def rm_cmd(name: str, as_json: bool) -> None:
    """Remove an env and all its changes."""
    store = Store()
    env = store.get(name)
    store.remove(env)
    if as_json:
        emit_json({"removed": env.name, "id": env.id})
    else:
        notice(f"removed env {env.name}")


@click.command("discard")
@click.argument("name", shell_complete=env_names)
@json_option
def discard_cmd(name: str, as_json: bool) -> None:
    """Drop every change of an env; the env stays, empty."""
    store = Store()
    env = store.get(name)
    dropped = count_changes(env)
    store.discard(env)
    if as_json:
        emit_json({"discarded": env.name, "id": env.id, "entries": dropped})
    else:
        notice(f"discarded {dropped} entries from env {env.name}")
