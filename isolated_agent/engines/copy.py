"""The `copy` engine: for machines with neither namespaces nor FUSE (many containers, some CI
runners) — the seed's driverless block-clone mode.

Before the job, each root's view (the host's tree with the env's layers on it) is cloned into
the store (env/clone.py: reflinks where the filesystem shares extents). The job runs on the
host, in the clone instead of the project — the one engine that does not show the project at its
real path: the launcher says so, and starts it in the clone's matching directory with PWD set.
It runs as on the filter engine — no capabilities, the seccomp baseline, Landlock, and a keeper
doing its metadata calls and connects where it may — but may write only beneath the clones, its
--allow paths and a private tmp of its own (TMPDIR; the shared /tmp and /dev/shm are refused).
After the job, what it changed is recorded into the env's upper layer in the overlay format, so
diff, commit, backups and checkpoints work unchanged, and the clones go. A run killed before it
recorded is recorded by the next one, first.

Without Landlock nothing would keep the job from writing to the project itself by its real
path, so the engine refuses to run there (fail closed); as the filter, it runs no root job.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Protocol

from isolated_agent.env import clone
from isolated_agent.env.store import COPY_WORKSPACE, Env, Root, is_within
from isolated_agent.errors import IsolationError, StoreError
from isolated_agent.system import libc
from isolated_agent.system.trees import remove_tree


class Progress(Protocol):
    """How a long copy is shown (the CLI's progress bar on a terminal)."""

    def start(self, what: str, total: int) -> None: ...
    def advance(self, done: int) -> None: ...
    def finish(self) -> None: ...


class CopyEngine:
    name = "copy"
    namespaces = False

    def __init__(self, progress: Progress | None = None) -> None:
        self._clones: list[clone.Clone] = []
        self.progress = progress
        self._env: Env | None = None
        # Why `auto` fell back to this engine, if it did.
        self.fallback_from: IsolationError | None = None

    def check(self, rootless: bool) -> None:
        if not rootless:
            raise IsolationError(
                "copy engine", "it runs no job as root (without namespaces the job would be "
                "uid 0 on the host, owner of every root file)",
                "run agentctl as your user, or use --engine kernel or fuse")
        if libc.landlock_abi() <= 0:
            raise IsolationError(
                "copy engine", "Landlock is not available, and nothing else would keep the job "
                "from writing to your project by its real path",
                "Linux >= 5.13 with Landlock enabled (lsm=...,landlock)")

    def mount_root(self, root: Root, target: str, lower: str) -> None:
        raise AssertionError("the copy engine mounts nothing")

    # -- where the job works ---------------------------------------------------------------------

    @staticmethod
    def workspace(env: Env) -> str:
        return os.path.join(env.dir, COPY_WORKSPACE)

    @classmethod
    def clone_path(cls, env: Env, root: Root) -> str:
        return os.path.join(cls.workspace(env), f"root-{root.index}")

    @classmethod
    def private_tmp(cls, env: Env) -> str:
        return os.path.join(cls.workspace(env), "tmp")

    @classmethod
    def job_roots(cls, env: Env) -> tuple[Root, ...]:
        """The roots as the job sees them: at their clones."""
        return tuple(replace(root, path=cls.clone_path(env, root)) for root in env.roots)

    @classmethod
    def job_directory(cls, env: Env, cwd: str) -> str:
        """Where the caller's directory `cwd` is in the clones (the first root's clone when it
        is in none of the roots)."""
        for root in env.roots:
            if is_within(cwd, root.path):
                return os.path.normpath(os.path.join(cls.clone_path(env, root),
                                                     os.path.relpath(cwd, root.path)))
        return cls.clone_path(env, env.roots[0])

    # -- host side (engines.HostSide) ------------------------------------------------------------

    def start(self, env: Env, log_dir: str) -> None:
        self._env = env
        os.makedirs(self.workspace(env), mode=0o700, exist_ok=True)
        os.mkdir(self.private_tmp(env), 0o700)
        for root in env.roots:
            shown = self.progress
            if shown is not None:
                shown.start(f"copying {root.path}", clone.count_entries(root))
            try:
                made = clone.materialize(root, self.clone_path(env, root),
                                         shown.advance if shown else None)
            except OSError as e:
                raise IsolationError(f"copying {root.path} for the job",
                                     os.strerror(e.errno or 0), "agentctl doctor") from e
            finally:
                if shown is not None:
                    shown.finish()
            made.save(_manifest(env, root))
            self._clones.append(made)

    def job_started(self, pid: int, cgroup_dir: str | None) -> None:
        pass

    def problems(self) -> list[str]:
        return []

    def stop(self) -> None:
        """Record what the job changed, then drop the clones."""
        if self._env is not None:
            _record_and_remove(self._env, self._clones)
        self._clones.clear()


def _manifest(env: Env, root: Root) -> str:
    return os.path.join(CopyEngine.workspace(env), f"manifest-{root.index}.json")


def _record_and_remove(env: Env, clones: list[clone.Clone]) -> None:
    for made in clones:
        try:
            clone.record(made)
        except OSError as e:  # the clone and its manifest stay: the next run records them
            raise StoreError(
                f"could not record the job's changes to {made.root.path} in env {env.name}: "
                f"{os.strerror(e.errno or 0)}; they stay in {made.path}, and the next "
                f"`agentctl run --env {env.name}` records them (free space first if it is "
                "full)") from e
        os.unlink(_manifest(env, made.root))
        remove_tree(made.path)
    remove_tree(CopyEngine.workspace(env))


def recover(env: Env) -> bool:
    """Record the clones a killed copy-engine run left (their manifests say what they were);
    True when there were any."""
    workspace = CopyEngine.workspace(env)
    if not os.path.isdir(workspace):
        return False
    left = [made for root in env.roots if (made := clone.load(_manifest(env, root), root))]
    _record_and_remove(env, left)
    return bool(left)
