"""`agentctl diff` and `agentctl commit`: review an env's changes, and keep them."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from isolated_agent.cli.output import emit_json, notice, when
from isolated_agent.env import diff as render
from isolated_agent.env.changeset import Change, Changeset, env_layers, read_changeset
from isolated_agent.env.commit import (
    CommitResult,
    Privileged,
    Progress,
    commit,
    describe_recovery,
    find_privileged,
    recover_pending,
    resume,
)
from isolated_agent.env.journal import pending_env_ids
from isolated_agent.env.selection import Selection, select_paths, split_env_and_paths
from isolated_agent.env.stack import compare_states, find_checkpoint, layers_of
from isolated_agent.env.store import Env, Store, default_home
from isolated_agent.errors import AgentctlError, CommitConflict, CommitIncomplete, UsageError

BAR_THRESHOLD = 500  # operations; smaller commits finish before a bar is worth drawing
PRIVILEGE_LINES = 20  # paths named one by one; more are summed up in one line

env_option = click.option(
    "--env", "env_name", metavar="NAME",
    help="The env (default: the first argument if it names one, else the env managing the "
         "current directory).",
)
paths_argument = click.argument("args", nargs=-1, metavar="[ENV] [PATH]...",
                                type=click.Path(path_type=str))


def _target(env_name: str | None, args: tuple[str, ...]) -> tuple[Store, Env, Selection]:
    store = Store()
    cwd = os.getcwd()
    env, paths = split_env_and_paths(store, env_name, args, cwd)
    return store, env, select_paths(env, paths, cwd)


def _write_lines(lines: Iterable[bytes]) -> None:
    out = sys.stdout.buffer  # diff output is bytes: names and contents need not be UTF-8
    for line in lines:
        out.write(line + b"\n")
    out.flush()


@contextmanager
def progress_bar(label: str, enabled: bool | None = None) -> Iterator[Progress]:
    """A progress callback that draws a bar on a terminal (stderr) for long operations, and
    does nothing when stderr is not a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda phase, done, total: None
        return
    from rich.console import Console  # imported here: rich costs ~40 ms at start-up
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (TextColumn(f"{label} {{task.description}}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if total < BAR_THRESHOLD:
                return
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done)

        yield update


# -- diff ---------------------------------------------------------------------------------------


@click.command("diff")
@paths_argument
@env_option
@click.option("--stat", "show_stat", is_flag=True, help="Per-file counts, as git diff --stat.")
@click.option("--name-status", is_flag=True, help="One line per change: status and path.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto",
              show_default=True, help="Colour the output (auto: on a terminal).")
@click.option("--from", "from_checkpoint", metavar="CHECKPOINT",
              help="Compare from this checkpoint of the env instead of from the host.")
@click.option("--to", "to_checkpoint", metavar="CHECKPOINT",
              help="With --from: compare to this checkpoint instead of the env as it is now.")
def diff_cmd(
    args: tuple[str, ...], env_name: str | None, show_stat: bool, name_status: bool,
    as_json: bool, color: str, from_checkpoint: str | None, to_checkpoint: str | None,
) -> None:
    """Show what an env changed, as a unified diff against the host (or, with --from,
    between two of its checkpoints, or a checkpoint and now).

    Status letters: A added, M modified, T type changed, D deleted.
    """
    store, env, selection = _target(env_name, args)
    if from_checkpoint is not None:
        changeset = _between_checkpoints(store, env, selection, from_checkpoint, to_checkpoint)
    elif to_checkpoint is not None:
        raise UsageError("--to needs --from: give the checkpoint to compare from")
    else:
        changeset = read_changeset(env, selection)
        unknown = changeset.unknown_paths()
        if unknown:
            raise UsageError(f"{unknown[0]}: no such path in env {env.name} or on the host")
    colored = color == "always" or (color == "auto" and sys.stdout.isatty())
    if as_json:
        emit_json({"env": env.name, "changes": render.to_json(changeset)})
    elif name_status:
        _write_lines(render.name_status_lines(changeset))
    elif show_stat:
        width = shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else 80
        _write_lines(render.stat_lines(render.file_stats(changeset), width, colored))
    else:
        _write_lines(render.patch(changeset, colored))
    if not as_json and from_checkpoint is None:
        # After the output, so that it is the last thing a terminal shows.
        _privilege_lines([(os.fsdecode(render.display_path(changeset, item.change)), item)
                          for item in find_privileged(changeset.changes)], committed=False)


def _between_checkpoints(
    store: Store, env: Env, selection: Selection, older: str, newer: str | None
) -> Changeset:
    start = find_checkpoint(store, env, older)
    end = env_layers(env) if newer is None else layers_of(
        store, env, find_checkpoint(store, env, newer).layers)
    return compare_states(env, layers_of(store, env, start.layers), end, selection)


def _listed(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _privilege_lines(
    found: list[tuple[str, Privileged]], *, committed: bool, keep: bool = False
) -> None:
    """One line per entry (the first PRIVILEGE_LINES) that a commit would make privileged on
    the host: a warning before (diff, commit --dry-run), what it did after (`committed`)."""
    for path, item in found[:PRIVILEGE_LINES]:
        assert item.change.new is not None
        listed = _listed(item.privileges)
        pronoun = "it" if len(item.privileges) == 1 else "them"
        detail = f"{listed} in the env (mode {item.change.new.mode & 0o177777:06o})"
        if not committed:
            text = f"warning: {path}: {detail}"
            if item.host_had:
                text += f"; your file has {_listed(item.host_had)} too"
            text += (f"; commit keeps {pronoun} (--keep-setuid)" if keep
                     else f"; commit clears {pronoun} unless --keep-setuid")
        elif keep:
            text = f"kept {listed} on {path} ({detail}), as --keep-setuid asked"
        else:
            had = "; your file had it too" if item.host_had else ""
            text = f"cleared {listed} on {path} ({detail}{had}); --keep-setuid keeps {pronoun}"
        notice(text)
    more = len(found) - PRIVILEGE_LINES
    if more > 0:
        what = "warning" if not committed else "kept" if keep else "cleared"
        notice(f"{what}: setuid, setgid or capabilities on {more} more file(s) "
               "(`--json` lists them)")


def _host_path(env: Env, change: Change) -> str:
    return os.path.join(env.roots[change.root].path, os.fsdecode(change.rel))


# -- commit -------------------------------------------------------------------------------------


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _change_lines(changes: list[Change], env: Env) -> list[bytes]:
    lines = []
    for change in changes:
        path = os.fsencode(env.roots[change.root].path) + b"/" + change.rel
        lines.append(change.status.encode() + b"\t" + path)
    return lines


def _result_json(result: CommitResult, env: Env, remaining: int | None) -> dict[str, Any]:
    return {
        "env": result.env,
        "commit_id": result.commit_id,
        "dry_run": result.dry_run,
        "counts": result.counts(),
        "changes": [
            {"status": c.status, "path": os.path.join(env.roots[c.root].path, os.fsdecode(c.rel))}
            for c in result.changes
        ],
        "conflicts": [
            {
                "path": os.path.join(env.roots[c.change.root].path, os.fsdecode(c.change.rel)),
                "host_changed": when(c.host_changed_ns / 1e9),
                "env_changed": when(c.env_saw_ns / 1e9),
            }
            for c in result.conflicts
        ],
        "backed_up": result.backed_up,
        "backup_bytes": result.backup_bytes,
        "problems": result.problems,
        "remaining": remaining,
        "privileges": [_privileged_json(item, env, result.keep_privileges)
                       for item in result.privileged],
    }


def _privileged_json(item: Privileged, env: Env, keep: bool) -> dict[str, Any]:
    change = item.change
    return {
        "path": _host_path(env, change),
        "privileges": list(item.privileges),
        "host_had": list(item.host_had),
        "cleared": not keep,
    }


def _summary(result: CommitResult, remaining: int | None) -> str:
    counts = result.counts()
    parts = [f"{n} {word}" for word, n in (
        ("added", counts["A"]), ("modified", counts["M"]), ("retyped", counts["T"]),
        ("deleted", counts["D"])) if n]
    applied = len(result.changes) - len(result.problems)
    text = f"committed {applied} change{'s' if applied != 1 else ''} of env {result.env}"
    if parts:
        text += f" ({', '.join(parts)})"
    if result.backed_up:
        text += (f"; {result.backed_up} host entr{'ies' if result.backed_up != 1 else 'y'} "
                 f"backed up ({_size(result.backup_bytes)}) as commit {result.commit_id}")
    if remaining is not None:
        text += (f"; {remaining} change{'s' if remaining != 1 else ''} left in the env"
                 if remaining else "; nothing left in the env")
    return text


@click.command("commit")
@paths_argument
@env_option
@click.option("--dry-run", is_flag=True, help="Show what would be committed; change nothing.")
@click.option("--force", is_flag=True,
              help="Commit even paths the host changed after the env did (the host's version "
                   "is backed up first).")
@click.option("--resume", "resume_only", is_flag=True,
              help="Only finish an interrupted commit (of ENV, or of every env).")
@click.option("--keep-setuid", is_flag=True,
              help="Keep setuid/setgid bits and file capabilities (cleared by default: a job "
                   "could plant a setuid program).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def commit_cmd(
    args: tuple[str, ...], env_name: str | None, dry_run: bool, force: bool,
    resume_only: bool, keep_setuid: bool, as_json: bool,
) -> None:
    """Apply an env's changes (or those under PATHs) to the host.

    Every host file replaced or deleted is backed up first (`agentctl backup`). Refused while a
    job runs in the env, and when the host changed a path after the env did (see --force).
    Committed changes leave the env; the others stay. Files arrive without setuid, setgid
    and file capabilities unless --keep-setuid.
    """
    if resume_only:
        _resume_cmd(env_name, args, as_json)
        return
    store, env, selection = _target(env_name, args)
    with progress_bar("commit") as progress:
        try:
            result = commit(store, env, selection, force=force, dry_run=dry_run,
                            progress=progress, notify=notice, keep_privileges=keep_setuid)
        except CommitConflict as e:
            notice("the host changed these paths after the env changed them:")
            for path in e.conflicts:
                click.echo(f"  {path}", err=True)
            raise
    remaining = None
    if not dry_run and result.changes:
        remaining = len(read_changeset(env).changes)
    if as_json:
        emit_json(_result_json(result, env, remaining))
    elif dry_run:
        _write_lines(_change_lines(result.changes, env))
        text = f"dry run: would commit {len(result.changes)} change(s) of env {env.name}"
        if result.conflicts:
            text += (f"; {len(result.conflicts)} conflict(s) — the host changed them after the "
                     "env did, so commit would refuse them without --force:")
        notice(text)
        for conflict in result.conflicts:
            click.echo(f"  {os.fsdecode(conflict.change.old.path if conflict.change.old else b'')}",
                       err=True)
        _privilege_lines([(_host_path(env, p.change), p) for p in result.privileged],
                         committed=False, keep=keep_setuid)
    elif not result.changes:
        notice(f"nothing to commit in env {env.name}")
    else:
        _privilege_lines([(_host_path(env, p.change), p) for p in result.privileged],
                         committed=True, keep=result.keep_privileges)
        notice(_summary(result, remaining))
    if result.problems:
        for problem in result.problems:
            click.echo(f"  {problem}", err=True)
        raise CommitIncomplete(
            f"{len(result.problems)} change(s) could not be applied to the host (listed above); "
            f"they stay in env {env.name}", result.problems,
        )


def _resume_cmd(env_name: str | None, args: tuple[str, ...], as_json: bool) -> None:
    store = Store()
    name = env_name or (args[0] if args else None)
    if name is not None:
        env = store.get(name)
        result = resume(store, env)
        results = [] if result is None else [result]
    else:
        results = recover_pending(store, notify=lambda message: None)
    if as_json:
        emit_json([
            {"env": r.env, "commit_id": r.commit_id, "rolled_back": r.rolled_back,
             "problems": r.problems}
            for r in results
        ])
        return
    if not results:
        notice("no interrupted commit to finish")
    for result in results:
        notice(describe_recovery(result))


def finish_interrupted_commits() -> None:
    """Run before every command: a commit killed half-way is finished (or rolled back) at the
    first chance. Costs one directory listing when there is nothing to do."""
    if not pending_env_ids(default_home()):
        return
    try:
        recover_pending(Store(), notify=notice)
    except Exception as e:  # never let recovery stand in the way of the command asked for
        detail = str(e) if isinstance(e, AgentctlError) else repr(e)
        notice(f"could not finish an interrupted commit: {detail}; "
               "run `agentctl commit --resume`")
