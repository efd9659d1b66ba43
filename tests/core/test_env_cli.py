"""The env store through the CLI: create, list, show, rm, discard, and their bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import Agentctl


def test_create_list_show_rm_json(agentctl: Agentctl, project: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    created = agentctl("env", "create", "demo", "--root", str(project), "--root", str(other),
                       "--json")
    assert created.returncode == 0, created.stderr
    info = json.loads(created.stdout)
    assert info["name"] == "demo"
    assert [r["path"] for r in info["roots"]] == [str(project), str(other)]
    for root in info["roots"]:
        assert os.path.isdir(root["upper"]) and os.path.isdir(root["work"])

    listed = json.loads(agentctl("env", "list", "--json").stdout)
    assert [e["name"] for e in listed] == ["demo"]
    assert listed[0]["in_use"] is False and listed[0]["changes"] == 0

    shown = json.loads(agentctl("env", "show", "demo", "--json").stdout)
    assert shown["id"] == info["id"]
    assert json.loads(agentctl("env", "show", info["id"], "--json").stdout)["name"] == "demo"

    removed = agentctl("env", "rm", "demo", "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["removed"] == "demo"
    assert not os.path.exists(Path(info["roots"][0]["upper"]).parent.parent.parent)
    assert json.loads(agentctl("env", "list", "--json").stdout) == []


def test_default_root_is_cwd_and_relative_roots_resolve(agentctl: Agentctl, project: Path) -> None:
    by_cwd = json.loads(agentctl("env", "create", "a", "--json", cwd=project).stdout)
    assert by_cwd["roots"][0]["path"] == str(project)
    relative = agentctl("env", "create", "b", "--root", "src", "--json", cwd=project)
    assert json.loads(relative.stdout)["roots"][0]["path"] == str(project / "src")


def test_plain_list_output_is_tab_separated_when_piped(agentctl: Agentctl, project: Path) -> None:
    agentctl("env", "create", "plain", "--root", str(project))
    lines = agentctl("env", "list").stdout.splitlines()
    assert lines[0].split("\t")[0] == "NAME"
    assert lines[1].split("\t")[0] == "plain"


def _one_line_error(result: object, code: int, *needles: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)  # type: ignore[attr-defined]
    err = result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("agentctl: ") or err.startswith("Error: ") or "Usage" in err
    for needle in needles:
        assert needle in err, err


def test_bad_inputs_give_one_line_errors(
    agentctl: Agentctl, project: Path, store_home: Path, tmp_path: Path
) -> None:
    _one_line_error(agentctl("env", "show", "nope"), 1, "no env named 'nope'")
    _one_line_error(agentctl("env", "rm", "nope"), 1, "no env named")
    _one_line_error(agentctl("discard", "nope"), 1, "no env named")
    _one_line_error(agentctl("env", "create", "--root", str(tmp_path / "missing")), 2,
                    "does not exist")
    _one_line_error(agentctl("env", "create", "--root", str(project / "README.md")), 2,
                    "not a directory")
    _one_line_error(agentctl("env", "create", "--root", "/"), 2, "/ cannot be a managed root")
    _one_line_error(
        agentctl("env", "create", "--root", str(project), "--root", str(project / "src")), 2,
        "nested",
    )
    store_home.mkdir(exist_ok=True)
    inside = store_home / "inner"
    inside.mkdir()
    _one_line_error(agentctl("env", "create", "--root", str(inside)), 2, "overlaps the store")
    _one_line_error(agentctl("env", "create", "--root", str(tmp_path)), 2, "overlaps the store")
    _one_line_error(agentctl("env", "create", "bad/name", "--root", str(project)), 2,
                    "not a valid env name")
    assert agentctl("env", "create", "twice", "--root", str(project)).returncode == 0
    _one_line_error(agentctl("env", "create", "twice", "--root", str(project)), 2,
                    "exists already")


def test_unwritable_store_is_a_clear_error(agentctl: Agentctl, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = agentctl("env", "list", env={"ISOLATED_AGENT_HOME": str(blocker / "store")})
    _one_line_error(result, 1, "cannot use the store", "ISOLATED_AGENT_HOME")


def test_discard_empties_the_env_and_keeps_it(agentctl: Agentctl, project: Path) -> None:
    run = agentctl("run", "--env", "d", "--", "sh", "-c", "echo new > new.txt; rm README.md",
                   cwd=project)
    assert run.returncode == 0, run.stderr
    assert json.loads(agentctl("env", "show", "d", "--json").stdout)["changes"] == 2
    discarded = agentctl("discard", "d", "--json")
    assert discarded.returncode == 0, discarded.stderr
    assert json.loads(discarded.stdout)["entries"] == 2
    assert json.loads(agentctl("env", "show", "d", "--json").stdout)["changes"] == 0
    seen = agentctl("run", "--env", "d", "--", "ls", cwd=project)
    assert "README.md" in seen.stdout and "new.txt" not in seen.stdout
