"""Shell completion of the names a command takes: envs, and an env's checkpoints.

The shells' scripts are click's (`_AGENTCTL_COMPLETE=bash_source agentctl`, see README); these
callbacks give them the values. A completion never creates a store, never fails: without one,
or on any error, it offers nothing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import click
from click.shell_completion import CompletionItem

from isolated_agent.env.store import Store, default_home


@contextlib.contextmanager
def _store() -> Iterator[Store | None]:
    if not os.path.isdir(default_home()):
        yield None
        return
    store = Store()
    try:
        yield store
    finally:
        store.close()


def env_names(ctx: click.Context, param: click.Parameter, incomplete: str
              ) -> list[CompletionItem]:
    with contextlib.suppress(Exception), _store() as store:
        if store is not None:
            return [CompletionItem(env.name) for env in store.list_envs()
                    if env.name.startswith(incomplete)]
    return []


def env_then_checkpoint(ctx: click.Context, param: click.Parameter, incomplete: str
                        ) -> list[CompletionItem]:
    """For `[ENV] CHECKPOINT`: env names first, then the checkpoints of the env given."""
    given: Any = ctx.params.get(param.name or "") or ()
    if not given:
        return env_names(ctx, param, incomplete)
    return checkpoints_of(str(given[0]), incomplete)


def checkpoint_ids(ctx: click.Context, param: click.Parameter, incomplete: str
                   ) -> list[CompletionItem]:
    """The checkpoints of the env named by the command's ENV argument (while an option's value
    is completed, click leaves the arguments before it unparsed, in `ctx.args`)."""
    env = ctx.params.get("env_name") or (ctx.args[0] if ctx.args else None)
    return checkpoints_of(str(env), incomplete) if env else []


def checkpoints_of(env_name: str, incomplete: str) -> list[CompletionItem]:
    with contextlib.suppress(Exception), _store() as store:
        if store is not None:
            env = store.get(env_name)
            return [CompletionItem(cp.id, help=cp.message or None)
                    for cp in store.catalog.checkpoints(env.id) if cp.id.startswith(incomplete)]
    return []
