"""`agentctl config show`."""

from __future__ import annotations

from typing import Any

import click

from isolated_agent.cli import settings
from isolated_agent.cli.main import COMMANDS, LazyGroup, cli
from isolated_agent.cli.output import emit_json, table


@click.group("config")
def config_group() -> None:
    """The settings `run` and `guard start` take when a flag does not say otherwise."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON.")
def show_cmd(as_json: bool) -> None:
    """Print every setting's effective value and where it comes from: the config file
    ($XDG_CONFIG_HOME/isolated-agent/config.toml) or the built-in default."""
    config = settings.load()
    rows = []
    for setting in settings.SETTINGS:
        if setting.name in config.values:
            value, source = config.values[setting.name], config.path
        else:
            value, source = _built_in(setting), "default"
        rows.append((setting, value, source))
    if as_json:
        emit_json({"file": config.path,
                   "settings": {s.name: {"value": v, "source": src} for s, v, src in rows}})
        return
    table(["setting", "value", "from"], [(s.name, _shown(v), src) for s, v, src in rows])


def _built_in(setting: settings.Setting) -> Any:
    """The option's own default, read from the command itself (one source of truth)."""
    group: click.Group = cli
    command: click.Command | None = None
    for part in setting.command:
        command = (group.get_command(click.Context(group), part) if isinstance(group, LazyGroup)
                   else group.commands.get(part))
        if isinstance(command, click.Group):
            group = command
    assert command is not None and setting.command[0] in COMMANDS
    param = next(p for p in command.params if p.name == setting.option)
    default = param.get_default(click.Context(command), call=True)
    if not isinstance(default, str | int | float | list | tuple):
        default = None  # click's marker for an option without a default
    if param.multiple:
        return list(default) if isinstance(default, list | tuple) else []
    return (not default) if setting.inverted else default


def _shown(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return ", ".join(value) or "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
