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


class ProgressBar:
    """A progress bar on stderr while it is a terminal (engines.copy.Progress); nothing when
    piped or quiet."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._task: Any = None

    @classmethod
    def when_wanted(cls, quiet: bool) -> ProgressBar | None:
        return None if quiet or not sys.stderr.isatty() else cls()

    def start(self, what: str, total: int) -> None:
        from rich.console import Console  # imported here: rich costs ~40 ms at start-up
        from rich.progress import Progress

        self._bar = Progress(console=Console(stderr=True), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(what, total=total)

    def advance(self, done: int) -> None:
        self._bar.advance(self._task, done)

    def finish(self) -> None:
        self._bar.stop()
