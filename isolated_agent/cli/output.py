"""Rendering shared by the commands: JSON, tables, notices on stderr."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import click


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def notice(message: str) -> None:
    click.echo(f"agentctl: {message}", err=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table on a terminal; tab-separated lines (with a header) when piped."""
    if not sys.stdout.isatty():
        click.echo("\t".join(headers))
        for row in rows:
            click.echo("\t".join(row))
        return
    from rich.console import Console  # imported here: rich costs ~40 ms at start-up
    from rich.table import Table

    view = Table(*headers, box=None, header_style="bold")
    for row in rows:
        view.add_row(*row)
    Console().print(view)


def when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
