"""`agentctl guard start|stop|status` and `agentctl backupd`: backup on delete.

`guard start` warns, one line each and at most LISTED lines per kind, about what will bypass
the guard (processes holding descriptors or directories under DIR, files with hard links
outside it, other views of DIR) and about deletes that may have gone unguarded since the last
guard lost its mount; `guard status` reports a lost mount the same way. `--json` has it all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import click

from isolated_agent.cli.output import emit_json, notice, table, when
from isolated_agent.env.store import Store

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
LISTED = 10  # lines per kind of warning; past that, "and N more"


@click.command("backupd")
@click.option("--once", is_flag=True,
              help="Upload everything due now, then exit (instead of serving).")
@click.option("--rescan", "rescan", type=float, default=30.0, show_default=True,
              metavar="SECONDS", help="How often to look at the catalog without being woken.")
@click.option("--backoff-base", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="First retry delay; it doubles with each failed attempt.")
@click.option("--backoff-cap", type=float, default=600.0, show_default=True, metavar="SECONDS",
              help="Longest retry delay.")
@click.option("--exit-when-idle", "idle_exit", type=float, default=None, metavar="SECONDS",
              help="Exit after SECONDS with no guard running and nothing to upload (as when "
                   "`guard start` starts it), or at once if the store is removed.")
@click.option("-v", "--verbose", is_flag=True, help="Log every step.")
@click.option("--ready-fd", type=int, default=None, hidden=True,
              help="Report readiness (system/daemon.Report) on this descriptor.")
def backupd_cmd(once: bool, rescan: float, backoff_base: float, backoff_cap: float,
                idle_exit: float | None, verbose: bool, ready_fd: int | None) -> None:
    """The backup daemon: upload staged items, verify them, purge the staged copies.

    Runs in the foreground (systemd: packaging/systemd/agentctl-backupd.service); logs to
    stderr. `agentctl guard start` starts one on demand when none runs.
    """
    from isolated_agent.backupd import Daemon, Settings, setup_logging
    from isolated_agent.system.daemon import Reporter

    setup_logging(verbose)
    home = Store().home  # absolute: the daemon works from / (it must hold nothing elsewhere)
    os.chdir("/")
    settings = Settings(rescan_interval=max(rescan, 0.05), backoff_base=max(backoff_base, 0.01),
                        backoff_cap=max(backoff_cap, 0.01),
                        idle_exit=None if idle_exit is None else max(idle_exit, 0.0))
    reporter = Reporter(ready_fd)
    try:
        Daemon(home, settings).run(once=once, on_ready=reporter.ready)
    except Exception as e:
        reporter.failed(str(e))
        raise


@click.group("guard")
def guard_group() -> None:
    """Back up every file deleted or overwritten under a directory, by any process."""


@guard_group.command("start")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--exclude", "excludes", multiple=True, metavar="GLOB",
              help="Do not back up what matches GLOB (relative to DIR; a GLOB without / "
                   "matches any path component, e.g. build, '*.o'). Repeatable.")
@click.option("--max-size", metavar="SIZE",
              help="Do not back up files larger than SIZE (e.g. 500M, 2G).")
@click.option("--sync", "sync", is_flag=True,
              help="Flush every staged item to disk before the delete returns (survives "
                   "power loss at once; slower). Default: flushed in groups every second.")
@click.option("--no-backupd", is_flag=True,
              help="Do not start the backup daemon (run `agentctl backupd` yourself).")
@click.option("--debug", is_flag=True, help="Log every FUSE request to run/guard-<id>.log.")
@json_option
def start_cmd(directory: str, excludes: tuple[str, ...], max_size: str | None, sync: bool,
              no_backupd: bool, debug: bool, as_json: bool) -> None:
    """Guard DIR: before any file under it is deleted, replaced or truncated, its old
    content is kept and backed up (see `agentctl backup`)."""
    from isolated_agent.backupd import ensure_running
    from isolated_agent.guard.mount import GuardConfig, start
    from isolated_agent.guard.policy import Policy
    from isolated_agent.system.sizes import parse_size

    try:
        cap = None if max_size is None else parse_size(max_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-size") from None
    home = Store().home
    config = GuardConfig(directory, Policy(tuple(excludes), cap), sync)
    started = start(home, config, debug=debug)
    daemon = None if no_backupd else ensure_running(home)
    links = started.outside_links
    if as_json:
        emit_json({"dir": started.directory, "id": started.guard_id, "pid": started.pid,
                   "recovered": started.recovered, "backupd": daemon,
                   "holders": [h.as_json() for h in started.holders],
                   "outside_links": None if links is None else links.as_json(),
                   "other_views": list(started.other_views),
                   "unguarded": None if started.gap is None else started.gap.as_json()})
        return
    if started.gap is not None:
        warn(started.gap.describe(started.directory))
    if started.recovered:
        notice(f"replaced the dead guard mount at {started.directory}")
    notice(f"guarding {started.directory} (pid {started.pid})"
           + ("" if daemon is None else f"; backupd pid {daemon}"))
    if started.holders:
        warn(f"{len(started.holders)} process(es) hold directories or files under "
             f"{started.directory} from before the guard; what they delete or truncate "
             "through them is not backed up:")
        bounded([h.describe() for h in started.holders])
    if links is not None and links.files:
        examples = ", ".join(links.examples)
        warn(f"{links.files} file(s) under {started.directory} have hard links outside it "
             f"(e.g. {examples}); truncating or writing through those links is not backed up")
    if links is not None and not links.complete:
        warn(f"looked for hard links to outside in the first {links.scanned} entries of "
             f"{started.directory} only ({links.seconds:.1f} s)")
    warn_other_views(started.directory, started.other_views)


def warn_other_views(directory: str, views: Sequence[str]) -> None:
    for view in views[:LISTED]:
        warn(f"{directory} is also reachable at {view} (another mount of its filesystem); "
             "deletes there are not backed up")
    if len(views) > LISTED:
        notice(f"  and {len(views) - LISTED} more (`--json` lists them all)")


def warn(message: str) -> None:
    notice(f"warning: {message}")


def bounded(lines: list[str]) -> None:
    """Indented lines, at most LISTED of them."""
    for line in lines[:LISTED]:
        notice(f"  {line}")
    if len(lines) > LISTED:
        notice(f"  and {len(lines) - LISTED} more (`--json` lists them all)")


@guard_group.command("stop")
@click.argument("directory", type=click.Path(file_okay=False))
@json_option
def stop_cmd(directory: str, as_json: bool) -> None:
    """Stop guarding DIR (staged items are still uploaded by the backup daemon)."""
    from isolated_agent.guard.mount import stop

    stopped = stop(Store().home, directory)
    guard, gap = stopped.guard, stopped.gap
    if as_json:
        emit_json({"dir": os.fsdecode(guard.dir), "id": guard.id, "stopped": True,
                   "unguarded": None if gap is None else gap.as_json()})
        return
    if gap is not None:
        warn(f"the guard had lost its mount: {gap.describe(os.fsdecode(guard.dir))}")
    notice(f"stopped guarding {os.fsdecode(guard.dir)}")


def status_rows(home: str) -> list[dict[str, Any]]:
    from isolated_agent.backup import Backups
    from isolated_agent.guard.mount import guard_status

    backups = Backups.of_store(home)
    try:
        return [guard_status(home, backups.catalog, guard) for guard in backups.catalog.guards()]
    finally:
        backups.close()


@guard_group.command("status")
@json_option
def status_cmd(as_json: bool) -> None:
    """Show the guarded directories, their items by state, and the backup daemon."""
    from isolated_agent.backupd import running_pid
    from isolated_agent.guard.bypass import Gap

    home = Store().home
    rows = status_rows(home)
    daemon = running_pid(os.path.join(home, "run"))
    if as_json:
        emit_json({"guards": rows, "backupd": {"running": daemon is not None, "pid": daemon}})
        return
    table(
        ["DIR", "STATE", "PID", "WAITING", "BACKED UP", "FAILED", "SKIPPED", "SINCE"],
        [[r["dir"], r["state"], str(r["pid"] or ""),
          str(r["counts"].get("staged", 0) + r["counts"].get("uploading", 0)),
          str(r["counts"].get("purged", 0) + r["counts"].get("uploaded", 0)),
          str(r["counts"].get("failed", 0)), str(r["counts"].get("skipped", 0)),
          when(r["started"]) if r["started"] else ""] for r in rows],
    )
    for r in rows:
        if r["state"] == "moved":
            warn(f"{r['dir']} was moved to {r['moved_to']} with a renamed parent; its files are "
                 f"guarded there; `agentctl guard stop {r['dir']}` stops that guard")
        if r["unguarded"] is not None:
            gap = Gap.from_json(r["unguarded"])
            if gap is not None:
                warn(f"{gap.describe(r['dir'])}: its guard's mount is gone; "
                     f"`agentctl guard start {r['dir']}` guards it again")
        warn_other_views(r["dir"], r["other_views"])
    notice(f"backupd: {'running, pid ' + str(daemon) if daemon else 'not running'}")
