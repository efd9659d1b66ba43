"""`agentctl filter start|stop|status`: agentfs mounted in place over a managed root."""

from __future__ import annotations

import click

from isolated_agent.cli.output import emit_json, notice, table
from isolated_agent.env.store import Store

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group("filter")
def filter_group() -> None:
    """The filter engine's daemons: agentfs over a project, in place, a view per process.

    Processes of a job registered to an env see the env; every other process sees the
    project as it is. `agentctl run --engine filter` starts one on demand (stopped when
    idle); start one yourself to keep it up (systemd: packaging/systemd/).
    """


@filter_group.command("start")
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--foreground", is_flag=True,
              help="Serve in this process (for systemd) until stopped or Ctrl-C.")
@json_option
def start_cmd(root: str, foreground: bool, as_json: bool) -> None:
    """Mount the filter over ROOT (until `agentctl filter stop ROOT`)."""
    from isolated_agent.engines.filter.control import serve_foreground, start

    if foreground:
        serve_foreground(Store(), root)
        return
    record = start(Store(), root, on_demand=False)
    if as_json:
        emit_json({"root": record.root, "pid": record.pid, "log": record.log})
    else:
        notice(f"filter on {record.root} (pid {record.pid})")


@filter_group.command("stop")
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Stop even while jobs use it (they lose their view).")
@json_option
def stop_cmd(root: str, force: bool, as_json: bool) -> None:
    """Unmount the filter over ROOT and stop its daemon."""
    from isolated_agent.engines.filter.control import stop

    record = stop(Store(), root, force=force)
    if as_json:
        emit_json({"root": record.root, "pid": record.pid, "stopped": True})
    else:
        notice(f"filter on {record.root} stopped")


@filter_group.command("status")
@json_option
def status_cmd(as_json: bool) -> None:
    """The filter daemons, the envs they serve and their jobs."""
    from isolated_agent.engines.filter.control import status

    daemons = status(Store())
    if as_json:
        emit_json(daemons)
        return
    if not daemons:
        notice("no filter runs")
        return
    table(("ROOT", "PID", "STATE", "ENVS", "JOBS"), [
        (d["root"], str(d["pid"]), "serving" if d["alive"] else "dead",
         ", ".join(d["envs"]) or "-", str(len(d["jobs"])))
        for d in daemons
    ])
