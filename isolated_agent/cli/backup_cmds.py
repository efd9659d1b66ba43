"""`agentctl backup list|show|restore|verify`: the host entries saved before commits (and, later,
the guard) replaced or deleted them."""

from __future__ import annotations

import os
import stat
from typing import Any

import click

from isolated_agent.backup import Backups
from isolated_agent.backup.catalog import BackupEvent, GuardItem
from isolated_agent.backup.restore import (
    Restored,
    events_for_path,
    find_event,
    parse_time,
    restore,
    verify_all,
)
from isolated_agent.cli.output import emit_json, notice, table, when
from isolated_agent.cli.review_cmds import progress_bar
from isolated_agent.env.store import Store
from isolated_agent.errors import BackupError, BlobCorrupt

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _backups() -> Backups:
    return Backups.of_store(Store().home)


def _host_path(given: str) -> bytes:
    return os.fsencode(os.path.abspath(os.path.expanduser(given)))


def event_json(
    event: BackupEvent, present: bool | None = None, item: GuardItem | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": event.id,
        "path": os.fsdecode(event.path),
        "reason": event.reason,
        "time": when(event.time),
        "timestamp": event.time,
        "kind": event.kind,
        "size": event.size,
        "mode": f"{event.mode & 0o177777:06o}",
        "uid": event.uid,
        "gid": event.gid,
        "mtime": when(event.mtime_ns / 1e9),
        "sha256": event.sha256,
        "env": event.env_name,
        "env_id": event.env_id,
        "commit": event.commit_id,
    }
    if present is not None:
        data["blob_present"] = present
    if item is not None:  # a guard event: where the daemon is with it
        data.update({
            "cause": item.cause, "state": item.state, "attempts": item.attempts,
            "last_error": item.last_error, "staged_name": item.staged_name,
            "uploaded": None if item.uploaded_at is None else when(item.uploaded_at),
        })
    return data


def _reason(event: BackupEvent, item: GuardItem | None) -> str:
    if item is None:
        return event.reason
    text = f"{event.reason}:{item.cause}"
    return text if item.state in ("purged", "recorded") else f"{text} ({item.state})"


@click.group("backup")
def backup_group() -> None:
    """List, inspect, restore and verify backups of host files."""


@backup_group.command("list")
@click.option("--path", "path", metavar="P", help="Only backups of P and of paths under it.")
@click.option("--since", metavar="T",
              help="Only backups since T: a date/time (2026-03-01 14:30), an age (2h, 3d) or "
                   "seconds since the epoch.")
@json_option
def list_cmd(path: str | None, since: str | None, as_json: bool) -> None:
    """List backup events, oldest first."""
    backups = _backups()
    events = backups.catalog.find(
        path=None if path is None else _host_path(path),
        since=None if since is None else parse_time(since),
    )
    items = {i.event_id: i for i in backups.catalog.items()}
    if as_json:
        emit_json([event_json(e, item=items.get(e.id)) for e in events])
        return
    table(
        ["ID", "TIME", "REASON", "KIND", "SIZE", "ENV", "PATH"],
        [
            [str(e.id), when(e.time), _reason(e, items.get(e.id)), e.kind, str(e.size),
             e.env_name or "", os.fsdecode(e.path)]
            for e in events
        ],
    )


@backup_group.command("show")
@click.argument("event_id", type=int, metavar="ID")
@json_option
def show_cmd(event_id: int, as_json: bool) -> None:
    """Show one backup event."""
    backups = _backups()
    event = find_event(backups, event_id)
    present = event.sha256 is None or backups.blobs.exists(event.sha256)
    data = event_json(event, present, backups.catalog.item(event.id))
    if as_json:
        emit_json(data)
        return
    for key in ("id", "path", "reason", "cause", "state", "time", "kind", "size", "mode", "uid",
                "gid", "mtime", "sha256", "env", "commit", "attempts", "last_error", "uploaded"):
        if data.get(key) is not None:
            click.echo(f"{key + ':':8} {data[key]}")
    if not present:
        click.echo("blob:    MISSING from the backup store")


@backup_group.command("restore")
@click.argument("target", metavar="(ID | PATH)")
@click.option("--at", metavar="TIME",
              help="With PATH: the version backed up last at or before TIME.")
@click.option("--to", "to", metavar="DIR", type=click.Path(file_okay=False),
              help="Restore into DIR instead of the original place.")
@click.option("--force", is_flag=True, help="Overwrite what is in the way.")
@json_option
def restore_cmd(target: str, at: str | None, to: str | None, force: bool, as_json: bool) -> None:
    """Bring back a backed-up entry: by ID, or by PATH (with everything backed up under it).

    Never overwrites without --force: an entry whose place is taken is written beside it as
    NAME.restored-<id>. Never writes through a symlink: an entry under a directory that is now
    a symlink is refused (exit 1; use --to DIR). Every blob is verified first; a corrupt one is
    refused.
    """
    backups = _backups()
    if target.isdigit():
        if at is not None:
            raise click.UsageError("--at goes with a PATH, not with an ID")
        event = find_event(backups, int(target))
        events, base = [event], event.path
    else:
        base = _host_path(target)
        events = events_for_path(backups, base, None if at is None else parse_time(at))
    try:
        results = restore(backups, events, base, to, force)
    except BlobCorrupt as e:
        raise BlobCorrupt(f"{e}; nothing was restored") from e
    if as_json:
        emit_json([
            {"id": r.event.id, "path": os.fsdecode(r.event.path),
             "restored_to": None if r.status == "blocked" else os.fsdecode(r.target),
             "status": r.status, **({"blocked_by": os.fsdecode(r.target), "reason": r.detail}
                                    if r.status == "blocked" else {})}
            for r in results
        ])
        _refuse_blocked(results)
        return
    for r in results:
        if r.status == "beside":
            notice(f"{os.fsdecode(r.event.path)} exists: backup {r.event.id} restored as "
                   f"{os.fsdecode(r.target)}")
        elif r.status == "skipped":
            notice(f"skipped {os.fsdecode(r.event.path)}: a {_kind(r.event.mode)} is not restored")
        elif r.status == "not backed up":
            item = backups.catalog.item(r.event.id)
            why = f": {item.last_error}" if item is not None and item.last_error else ""
            notice(f"skipped {os.fsdecode(r.event.path)}: it was not backed up{why}")
    restored = sum(r.status in ("restored", "beside") for r in results)
    same = sum(r.status == "identical" for r in results)
    text = f"restored {restored} entr{'ies' if restored != 1 else 'y'}"
    if same:
        text += f"; {same} already identical"
    if restored or same or not any(r.status == "blocked" for r in results):
        notice(text)
    _refuse_blocked(results)


def _refuse_blocked(results: list[Restored]) -> None:
    """Entries under a directory that is now a symlink (or a file) were not restored: one line
    per such directory (the last one is the error), exit status 1."""
    blocked: dict[bytes, list[Restored]] = {}
    for r in results:
        if r.status == "blocked":
            blocked.setdefault(r.target, []).append(r)
    lines = []
    for where, group in blocked.items():
        what = (os.fsdecode(group[0].event.path) if len(group) == 1
                else f"{len(group)} entries under {os.fsdecode(where)}")
        lines.append(
            f"did not restore {what}: {os.fsdecode(where)} is {group[0].detail}, not a "
            "directory, and restore never writes through it; restore elsewhere with --to DIR, "
            f"or move {os.fsdecode(where)} away and run the restore again"
        )
    for line in lines[:-1]:
        notice(line)
    if lines:
        raise BackupError(lines[-1])


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


@backup_group.command("verify")
@json_option
def verify_cmd(as_json: bool) -> int:
    """Re-hash every blob; exit 1 when one is corrupt or missing."""
    backups = _backups()
    total = len(set(backups.catalog.digests()) | set(backups.blobs.list()))
    done = 0
    with progress_bar("backup verify") as progress:
        def advance(count: int) -> None:
            nonlocal done
            done += count
            progress("verifying", done, total)

        report = verify_all(backups, advance)
    if as_json:
        emit_json({
            "checked": report.checked,
            "corrupt": [{"sha256": d, "events": ids} for d, ids in report.corrupt.items()],
            "missing": [{"sha256": d, "events": ids} for d, ids in report.missing.items()],
            "ok": report.ok,
        })
    else:
        for digest, ids in report.corrupt.items():
            click.echo(f"corrupt  {digest}  events {', '.join(map(str, ids)) or '-'}")
        for digest, ids in report.missing.items():
            click.echo(f"missing  {digest}  events {', '.join(map(str, ids)) or '-'}")
        if report.ok:
            notice(f"verified {report.checked} blob(s): all intact")
    if not report.ok:
        bad = len(report.corrupt) + len(report.missing)
        raise BlobCorrupt(
            f"{bad} of {report.checked} blob(s) are corrupt or missing (listed above); the "
            "backups that need them cannot be restored"
        )
    return 0
