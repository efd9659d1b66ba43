"""Engines produce an env's merged view of each managed root (DESIGN §4).

Every engine serves the same on-disk format (`isolated_agent.overlay.format`). An engine has two
halves: `check()` runs in the launcher, on the host, and says whether the engine can work here;
`mount_root()` runs inside the job's private mount namespace and puts the merged view of one root
at a given path.
"""

from __future__ import annotations

from typing import Protocol

from isolated_agent.env.store import Root
from isolated_agent.errors import IsolationError, UsageError


class Engine(Protocol):
    name: str

    def check(self, rootless: bool) -> None:
        """Raise IsolationError when this engine cannot work on this machine."""

    def mount_root(self, root: Root, target: str, lower: str) -> None:
        """Inside the job's mount namespace: mount the merged view of `root` at `target`,
        reading the host's files at `lower` (the same directory, seen from outside the view)."""


ENGINE_NAMES = ("auto", "kernel")


def select_engine(name: str, rootless: bool) -> Engine:
    from isolated_agent.engines.kernel import KernelEngine

    if name not in ENGINE_NAMES:
        raise UsageError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINE_NAMES)}")
    # `auto` has a single candidate until the fuse engine lands; its check() says why it fails.
    engine = KernelEngine()
    engine.check(rootless)
    return engine
