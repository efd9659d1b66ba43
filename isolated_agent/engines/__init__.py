"""Engines produce an env's merged view of each managed root (DESIGN §4).

Every engine serves the same on-disk format (`isolated_agent.overlay.format`). An engine has two
halves: `check()` runs in the launcher, on the host, and says whether the engine can work here;
`mount_root()` runs inside the job's private mount namespace and puts the merged view of one root
at a given path. An engine that needs processes on the host side while the job runs (the fuse
engine's daemons) also has `start()` / `stop()` (`HostSide`), which `serving()` calls around the
job.

`auto` picks the kernel engine whenever its check passes (native speed), else the fuse engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

from isolated_agent.env.store import Root
from isolated_agent.errors import IsolationError, UsageError


class Engine(Protocol):
    name: str

    def check(self, rootless: bool) -> None:
        """Raise IsolationError when this engine cannot work on this machine."""

    def mount_root(self, root: Root, target: str, lower: str) -> None:
        """Inside the job's mount namespace: mount the merged view of `root` at `target`,
        reading the host's files at `lower` (the same directory, seen from outside the view)."""


@runtime_checkable
class HostSide(Protocol):
    def start(self, roots: Sequence[Root], log_dir: str) -> None:
        """On the host, before the job starts: start what serves the roots."""

    def stop(self) -> None:
        """On the host, after the job ended (or failed to start): stop it all."""


ENGINE_NAMES = ("auto", "kernel", "fuse")


def select_engine(name: str, rootless: bool) -> Engine:
    from isolated_agent.engines.fuse.engine import FuseEngine
    from isolated_agent.engines.kernel import KernelEngine

    if name not in ENGINE_NAMES:
        raise UsageError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINE_NAMES)}")
    if name == "fuse":
        fuse = FuseEngine()
        fuse.check(rootless)
        return fuse
    kernel = KernelEngine()
    if name == "kernel":
        kernel.check(rootless)
        return kernel
    try:
        kernel.check(rootless)
        return kernel
    except IsolationError as kernel_problem:
        fuse = FuseEngine()
        try:
            fuse.check(rootless)
        except IsolationError:
            raise kernel_problem from None  # neither works: the kernel's reason is the usual one
        return fuse


@contextmanager
def serving(engine: Engine, roots: Sequence[Root], log_dir: str) -> Iterator[None]:
    """Run the engine's host side (if it has one) around a job."""
    if not isinstance(engine, HostSide):
        yield
        return
    try:
        engine.start(roots, log_dir)
        yield
    finally:
        engine.stop()
