"""Which env and which paths a review command (diff, commit) means.

`agentctl diff [ENV] [PATH...]`: ENV is optional. When it is left out, the env is the one whose
managed roots contain the current directory — if exactly one env does; otherwise the user must
name it. PATHs select subtrees: a path selects itself and everything under it; no path selects
everything. Paths are host paths (absolute, or relative to the current directory) and must lie in
one of the env's roots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from isolated_agent.env.store import Env, Store, is_within
from isolated_agent.errors import EnvNotFound, RootMissing, UsageError


def env_for_directory(store: Store, cwd: str) -> Env:
    """The one env whose managed roots contain `cwd`; an error naming the choices otherwise."""
    cwd = os.path.realpath(cwd)
    matches = [e for e in store.list_envs() if any(is_within(cwd, r.path) for r in e.roots)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(
            f"no env manages {cwd}; name one (`agentctl env list` shows them) or cd into a "
            "managed root"
        )
    names = ", ".join(e.name for e in matches)
    raise UsageError(f"several envs manage {cwd} ({names}); name the one you mean")


def split_env_and_paths(
    store: Store, env_name: str | None, args: tuple[str, ...], cwd: str
) -> tuple[Env, list[str]]:
    """Read `[ENV] [PATH...]`: the first argument is the env when it names one (to give a path
    spelled like an env name, write ./NAME); otherwise every argument is a path and the env is
    found from the current directory."""
    if env_name is not None:
        return store.get(env_name), list(args)
    if args and "/" not in args[0] and store.catalog.find_env(args[0]) is not None:
        return store.get(args[0]), list(args[1:])
    try:
        return env_for_directory(store, cwd), list(args)
    except UsageError:
        if args and "/" not in args[0] and not os.path.lexists(os.path.join(cwd, args[0])):
            raise EnvNotFound(args[0]) from None  # most likely a mistyped env name
        raise


@dataclass(frozen=True)
class Selection:
    """Subtrees of an env's roots, as (root index, path relative to the root) prefixes.
    `prefixes is None` selects everything; a prefix b"" selects a whole root."""

    prefixes: tuple[tuple[int, bytes], ...] | None = None

    @property
    def everything(self) -> bool:
        return self.prefixes is None

    def matches(self, root: int, rel: bytes) -> bool:
        """Is `rel` selected: equal to, or under, a selected prefix?"""
        if self.prefixes is None:
            return True
        for index, prefix in self.prefixes:
            if index == root and (
                not prefix or rel == prefix or rel.startswith(prefix + b"/")
            ):
                return True
        return False

    def relevant(self, root: int, rel: bytes) -> bool:
        """Is `rel` selected, or a directory on the way to something selected?"""
        if self.prefixes is None:
            return True
        for index, prefix in self.prefixes:
            if index != root:
                continue
            if not prefix or rel == prefix or rel.startswith(prefix + b"/"):
                return True
            if prefix.startswith(rel + b"/"):
                return True
        return False

    def roots(self) -> set[int] | None:
        return None if self.prefixes is None else {index for index, _ in self.prefixes}


def select_paths(env: Env, paths: list[str], cwd: str) -> Selection:
    """Map user-given host paths to a Selection of the env; a path outside every root is an
    error, as is a root that no longer exists."""
    for root in env.roots:
        if not os.path.isdir(root.path):
            raise RootMissing(env.name, root.path)
    if not paths:
        return Selection(None)
    prefixes: list[tuple[int, bytes]] = []
    for given in paths:
        located = _locate(env, given, cwd)
        if located is None:
            managed = ", ".join(r.path for r in env.roots)
            raise UsageError(f"{given} is outside the roots of env {env.name} ({managed})")
        if located not in prefixes:
            prefixes.append(located)
    return Selection(tuple(prefixes))


def _locate(env: Env, given: str, cwd: str) -> tuple[int, bytes] | None:
    absolute = os.path.normpath(os.path.join(cwd, os.path.expanduser(given)))
    # The path may exist only in the env, so it cannot always be resolved; resolve its parent
    # when that exists (a symlinked prefix outside the root, e.g. /home -> /data/home).
    parent, name = os.path.split(absolute)
    candidates = [absolute]
    if os.path.isdir(parent):
        candidates.append(os.path.join(os.path.realpath(parent), name) if name else parent)
    for candidate in candidates:
        for root in env.roots:
            if is_within(candidate, root.path):
                rel = os.path.relpath(candidate, root.path)
                return root.index, b"" if rel == "." else os.fsencode(rel)
    return None
