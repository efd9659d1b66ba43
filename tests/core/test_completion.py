"""Shell completion (click's scripts, our values) and --version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Agentctl


def complete(store: Path, words: str, shell: str = "bash") -> list[str]:
    """What the shell would offer for `words` (the last word being completed)."""
    parts = words.split(" ")
    environ = {**os.environ, "ISOLATED_AGENT_HOME": str(store), "COMP_WORDS": words,
               "COMP_CWORD": str(len(parts) - 1), "_AGENTCTL_COMPLETE": f"{shell}_complete"}
    done = subprocess.run([sys.executable, "-m", "isolated_agent"], env=environ,
                          capture_output=True, text=True, check=True)
    return [line.split(",", 1)[1] for line in done.stdout.splitlines() if line]


@pytest.mark.parametrize(("shell", "marker"), [("bash", "_agentctl_completion()"),
                                               ("zsh", "#compdef agentctl"),
                                               ("fish", "function _agentctl_completion")])
def test_the_completion_scripts(store_home: Path, shell: str, marker: str) -> None:
    done = subprocess.run([sys.executable, "-m", "isolated_agent"],
                          env={**os.environ, "_AGENTCTL_COMPLETE": f"{shell}_source"},
                          capture_output=True, text=True, check=True)
    assert marker in done.stdout


def test_commands_envs_and_checkpoints_complete(
    agentctl: Agentctl, store_home: Path, project: Path
) -> None:
    assert complete(store_home, "agentctl chec") == ["checkpoint"]
    assert complete(store_home, "agentctl log ") == []  # no store yet: nothing, no error
    assert agentctl("env", "create", "e1", "--root", str(project)).returncode == 0
    assert agentctl("env", "create", "other", "--root", str(project)).returncode == 0
    checkpoint = json.loads(agentctl("checkpoint", "e1", "--json").stdout)["id"]
    assert complete(store_home, "agentctl log e") == ["e1"]
    assert complete(store_home, "agentctl env show o") == ["other"]
    assert complete(store_home, "agentctl rollback e1 ") == [checkpoint]
    assert complete(store_home, "agentctl fork e1 new --at ") == [checkpoint]
    shown = json.loads(agentctl("env", "show", "e1", "--json").stdout)
    assert (shown["layers"], shown["checkpoints"]) == (0, 1)


def test_version(agentctl: Agentctl) -> None:
    done = agentctl("--version")
    assert done.returncode == 0 and done.stdout.startswith("agentctl, version ")
