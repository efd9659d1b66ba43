"""The CLI called in-process: the one error-to-exit-code mapping, and no traceback ever."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from isolated_agent.cli import main as cli_main
from isolated_agent.cli.main import invoke


def test_env_commands_in_process(
    store_home: Path, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert invoke(["env", "create", "inproc", "--root", str(project)]) == 0
    assert capsys.readouterr().out == "inproc\n"
    assert invoke(["env", "list", "--json"]) == 0
    assert [e["name"] for e in json.loads(capsys.readouterr().out)] == ["inproc"]


def test_user_errors_map_to_exit_codes(
    store_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert invoke(["env", "show", "missing"]) == 1
    assert capsys.readouterr().err.startswith("agentctl: no env named 'missing'")
    assert invoke(["run", "--engine", "warp", "--", "true"]) == 2
    assert "Invalid value for '--engine'" in capsys.readouterr().err
    assert invoke(["--version"]) == 0
    assert "agentctl, version" in capsys.readouterr().out


def test_a_bug_is_one_line_not_a_traceback(
    store_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("isolated_agent.cli.env_cmds.Store.list_envs", broken)
    monkeypatch.delenv("AGENTCTL_DEBUG", raising=False)
    assert invoke(["env", "list"]) == cli_main.EXIT_INTERNAL_ERROR
    err = capsys.readouterr().err
    assert err == (
        "agentctl: internal error: RuntimeError('boom') (a bug; AGENTCTL_DEBUG=1 shows where)\n"
    )
