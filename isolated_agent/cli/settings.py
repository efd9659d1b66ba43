"""The user's config file: defaults for `run` and `guard start`, which flags override.

    $XDG_CONFIG_HOME/isolated-agent/config.toml   (default ~/.config/isolated-agent/config.toml)

    [run]
    engine = "fuse"              # auto, kernel, fuse, filter, copy
    allow = ["~/.m2"]            # --allow, each run
    default_allows = true        # false: --no-default-allows
    allow_socket = ["/run/user/1000/gnupg/S.gpg-agent"]
    network = "none"             # host, none
    memory = "8G"                # --memory, --pids, --cpus
    pids = 4096
    cpus = 2

    [guard]
    exclude = ["node_modules", "*.o"]
    max_size = "500M"

A flag given on the command line replaces the setting (a list too: `--allow X` means only X).

Only this file is read. Nothing inside a project configures its own sandbox — there is no
per-repository file, since a repository is exactly what is not trusted — and the file must be
the user's own (or root's) and writable by nobody else, in a directory writable by nobody else,
or it is refused: whoever could write it could widen what every later job may do.
"""

from __future__ import annotations

import os
import stat
import tomllib
from dataclasses import dataclass
from typing import Any

from isolated_agent.engines import ENGINE_NAMES
from isolated_agent.errors import UsageError
from isolated_agent.system.sizes import parse_size


@dataclass(frozen=True)
class Setting:
    section: str  # the [table] in the file
    key: str
    command: tuple[str, ...]  # the command whose option it sets, e.g. ("guard", "start")
    option: str  # that option's parameter name
    kind: type  # str, bool, int, float or list (of str)
    choices: tuple[str, ...] = ()
    inverted: bool = False  # the option is the negation of the setting (a --no-... flag)

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


SETTINGS = (
    Setting("run", "engine", ("run",), "engine", str, ENGINE_NAMES),
    Setting("run", "allow", ("run",), "allow", list),
    Setting("run", "default_allows", ("run",), "no_default_allows", bool, inverted=True),
    Setting("run", "allow_socket", ("run",), "allow_sockets", list),
    Setting("run", "network", ("run",), "network", str, ("host", "none")),
    Setting("run", "memory", ("run",), "memory", str),
    Setting("run", "pids", ("run",), "pids", int),
    Setting("run", "cpus", ("run",), "cpus", float),
    Setting("guard", "exclude", ("guard", "start"), "excludes", list),
    Setting("guard", "max_size", ("guard", "start"), "max_size", str),
)


def config_path() -> str:
    base = os.environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: a relative value is ignored
        base = os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "isolated-agent", "config.toml")


@dataclass
class Config:
    path: str
    values: dict[str, Any]  # Setting.name -> the value the file gives (checked)

    def default_map(self) -> dict[str, Any]:
        """The file as click's default_map: command path -> option -> value."""
        tree: dict[str, Any] = {}
        for setting in SETTINGS:
            if setting.name not in self.values:
                continue
            node = tree
            for part in setting.command:
                node = node.setdefault(part, {})
            value = self.values[setting.name]
            node[setting.option] = (not value) if setting.inverted else value
        return tree


def load() -> Config:
    """The user's config file, checked; empty when there is none. Raises UsageError."""
    path = config_path()
    try:
        with open(path, "rb") as f:
            _check_trusted(path, os.fstat(f.fileno()))
            data = tomllib.load(f)
    except FileNotFoundError:
        return Config(path, {})
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: {e}; fix the file") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    return Config(path, _checked(path, data))


def _check_trusted(path: str, st: os.stat_result) -> None:
    for where, info in ((path, st), (os.path.dirname(path), os.stat(os.path.dirname(path)))):
        if info.st_uid not in (os.geteuid(), 0):
            raise UsageError(f"{where} belongs to uid {info.st_uid}, not to you: a config file "
                             "only you can change is read; chown it or remove it")
        if stat.S_IMODE(info.st_mode) & (stat.S_IWGRP | stat.S_IWOTH):
            raise UsageError(f"{where} is writable by others (mode "
                             f"{stat.S_IMODE(info.st_mode):04o}), who could widen what jobs "
                             f"may do; chmod go-w {where}")


def _checked(path: str, data: dict[str, Any]) -> dict[str, Any]:
    known = {s.name: s for s in SETTINGS}
    values: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise UsageError(f"{path}: {section} must be a table ([{section}])")
        for key, value in table.items():
            setting = known.get(f"{section}.{key}")
            if setting is None:
                names = ", ".join(sorted(known))
                raise UsageError(f"{path}: unknown setting {section}.{key}; known: {names}")
            values[setting.name] = _value(path, setting, value)
    return values


def _value(path: str, setting: Setting, value: Any) -> Any:
    def wrong(expected: str) -> UsageError:
        return UsageError(f"{path}: {setting.name} must be {expected}, not {value!r}")

    if setting.kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings")
        return value
    if setting.kind is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if setting.kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise wrong("a whole number of at least 1")
        return value
    if setting.kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise wrong("a number above 0")
        return float(value)
    if not isinstance(value, str):
        raise wrong("a string")
    if setting.choices and value not in setting.choices:
        raise wrong("one of " + ", ".join(setting.choices))
    if setting.key in ("memory", "max_size"):
        try:
            parse_size(value)
        except ValueError:
            raise wrong("a size such as 500M or 8G") from None
    return value
