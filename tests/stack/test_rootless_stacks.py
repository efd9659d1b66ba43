"""Stacks as an unprivileged user: every engine a user can run — the kernel's overlayfs in a
user namespace (its layers named by /proc/self/fd paths), agentfs and the filter, the
filter engine's own daemon this time — serves a checkpointed env, and rolls it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import RunAs, snapshot
from tests.filter.conftest import stop_filter_daemons

pytestmark = pytest.mark.rootless

SHOW = "cat notes.txt; ls"


@pytest.mark.usefixtures("fuse_open_to_users")
@pytest.mark.parametrize("engine", ["kernel", "fuse", "filter"])
def test_a_users_stack_on_every_engine(
    run_as_user: RunAs, user_project: Path, user_dir: Path, engine: str
) -> None:
    def ok(*args: str) -> str:
        done = run_as_user(*args, cwd=user_project)
        assert done.returncode == 0, done.stderr
        return done.stdout

    before = snapshot(user_project)
    try:
        ok("run", "-q", "--env", "u", "--engine", engine, "--", "sh", "-c",
           "echo one > notes.txt && rm README.md")
        first = json.loads(ok("checkpoint", "u", "--json"))["id"]
        ok("run", "-q", "--env", "u", "--engine", engine, "--", "sh", "-c",
           "echo two >> notes.txt && rm -r docs && echo back > README.md")
        ok("checkpoint", "u")
        assert ok("run", "-q", "--env", "u", "--engine", engine, "--", "sh", "-c",
                  SHOW).split() == ["one", "two", "README.md", "link", "notes.txt",
                                    "run.sh", "src"]
        ok("rollback", "u", first)
        assert ok("run", "-q", "--env", "u", "--engine", engine, "--", "sh", "-c",
                  SHOW).split() == ["one", "docs", "link", "notes.txt", "run.sh", "src"]
    finally:
        stop_filter_daemons(user_dir / "store")
    assert snapshot(user_project) == before
