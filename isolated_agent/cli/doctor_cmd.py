"""`agentctl doctor`."""

from __future__ import annotations

import click

from isolated_agent.cli.output import emit_json
from isolated_agent.jobs.doctor import FAIL, OK, WARN, diagnose

_MARK = {OK: ("ok", "green"), WARN: ("warn", "yellow"), FAIL: ("FAIL", "red")}


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def doctor_cmd(as_json: bool) -> int:
    """Check what this machine lets each engine do, why an engine cannot run here, and the
    command or setting that fixes it.

    Exit status: 0 when `--engine auto` can run a job here, 1 when nothing can.
    """
    diagnosis = diagnose()
    if as_json:
        emit_json(diagnosis.to_json())
        return 0 if diagnosis.auto else 1
    who = "root" if not diagnosis.rootless else f"{diagnosis.user} (without root)"
    click.echo(f"as {who}:\n")
    click.echo("engines")
    for verdict in diagnosis.engines:
        if verdict.ok:
            click.echo(f"  {verdict.name:<7} " + click.style("ok", fg="green"))
            continue
        click.echo(f"  {verdict.name:<7} " + click.style("cannot run", fg="red")
                   + f": {verdict.reason}")
        if verdict.fix:
            click.echo(f"  {'':<7} fix: {verdict.fix}")
    chosen = click.style(diagnosis.auto or "nothing", bold=True)
    click.echo(f"  {'auto':<7} picks {chosen}: {diagnosis.auto_why}\n")
    click.echo("checks")
    width = max(len(check.name) for check in diagnosis.checks)
    for check in diagnosis.checks:
        word, colour = _MARK[check.status]
        click.echo(f"  {click.style(f'{word:<4}', fg=colour)}  {check.name:<{width}}  "
                   f"{check.detail}")
        if check.fix and check.status != OK:
            click.echo(f"  {'':<4}  {'':<{width}}  fix: {check.fix}")
    return 0 if diagnosis.auto else 1
