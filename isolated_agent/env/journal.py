"""The commit journal: what makes a commit killed at any point recoverable.

Format — one file per env, `envs/<env-id>/commit.journal`, present only while a commit is under
way. Line 1 is the plan (one JSON object: commit id, env, selection, and the list of operations
with everything needed to redo them). Each further line is a phase marker, JSON too:

    {"phase": "backed-up", "stash": {"4": sha}}  every host entry the plan replaces or deletes
                                                is in the backup store (blobs and events
                                                durable) — or, for the ops listed in "stash",
                                                hashed and recorded, the file itself to be moved
                                                into the store by that op
    {"phase": "applied", "failed": [3, 17]}     every operation ran (the listed ones failed);
                                                the host's data is flushed

Paths in the plan are whole paths, as surrogate-escaped text, of any length: a tree deeper than
PATH_MAX is named like any other (apply.py reaches such paths through directory fds).

Write ordering (must): the plan is written to a temp file, fsynced, renamed into place and the
directory fsynced before any backup is taken; a marker is appended and fsynced only after its
phase is durable; the journal is removed (and the directory fsynced) only after the env's layers
are pruned. A marker line torn by a crash does not parse and counts as absent, so its phase is
redone — every phase is idempotent.

Recovery: no marker → nothing on the host was touched yet: roll back (forget the plan and its
backup events). `backed-up` → roll forward: redo the operations (each checks the state it finds),
then prune. `applied` → prune. So after recovery every path is in its pre- or post-commit state.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from isolated_agent.errors import StoreError
from isolated_agent.system.durable import fsync_dir, write_all

JOURNAL_NAME = "commit.journal"
PLANNED, BACKED_UP, APPLIED = "planned", "backed-up", "applied"
_PHASES = (PLANNED, BACKED_UP, APPLIED)


def journal_path(env_dir: str) -> str:
    return os.path.join(env_dir, JOURNAL_NAME)


def pending_env_ids(home: str) -> list[str]:
    """Ids of the envs with an interrupted commit; cheap, and creates nothing."""
    envs = os.path.join(home, "envs")
    try:
        names = os.listdir(envs)
    except OSError:
        return []
    return sorted(n for n in names if os.path.exists(os.path.join(envs, n, JOURNAL_NAME)))


@dataclass
class Journal:
    path: str
    plan: dict[str, Any]
    phase: str = PLANNED
    failed: list[int] = field(default_factory=list)
    stash: dict[int, str] = field(default_factory=dict)  # op index -> sha256 to adopt

    @classmethod
    def create(cls, path: str, plan: dict[str, Any]) -> Journal:
        temp = path + ".tmp"
        data = json.dumps(plan, separators=(",", ":")).encode() + b"\n"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, path)
        fsync_dir(os.path.dirname(path))
        return cls(path, plan)

    @classmethod
    def read(cls, path: str) -> Journal | None:
        try:
            with open(path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return None
        try:
            plan = json.loads(lines[0])
        except ValueError as e:
            raise StoreError(
                f"the commit journal {path} is damaged ({e}); move it away to continue"
            ) from e
        journal = cls(path, plan)
        for line in lines[1:]:
            try:
                marker = json.loads(line)
            except ValueError:
                break  # a torn last line: that phase did not become durable
            phase = marker.get("phase")
            if phase in _PHASES:
                journal.phase = phase
                journal.failed = [int(i) for i in marker.get("failed", [])]
                if "stash" in marker:
                    journal.stash = {int(i): str(d) for i, d in marker["stash"].items()}
        return journal

    def mark(
        self, phase: str, failed: list[int] | None = None, stash: dict[int, str] | None = None
    ) -> None:
        marker: dict[str, Any] = {"phase": phase}
        if failed:
            marker["failed"] = failed
        if stash:
            marker["stash"] = {str(i): d for i, d in stash.items()}
            self.stash = dict(stash)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            write_all(fd, json.dumps(marker).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.phase = phase
        self.failed = list(failed or [])

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        fsync_dir(os.path.dirname(self.path))

