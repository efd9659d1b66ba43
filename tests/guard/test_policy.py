"""--exclude GLOB and --max-size: what the guard deliberately does not back up, each skip
recorded with its reason and logged by the backup daemon."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from isolated_agent.guard.policy import Policy
from isolated_agent.system.sizes import parse_size
from tests.guard.conftest import Backupd, Guards, agentctl_cmd, wait_for


def test_globs_and_sizes() -> None:
    policy = Policy(("build", "*.o", "docs/*.tmp", "node_modules"), max_size=1000)
    assert policy.skip_reason(b"build/out/app", 1) == "excluded by 'build'"
    assert policy.skip_reason(b"src/build/x", 1) == "excluded by 'build'"
    assert policy.skip_reason(b"src/main.o", 1) == "excluded by '*.o'"
    assert policy.skip_reason(b"docs/a/b.tmp", 1) == "excluded by 'docs/*.tmp'"
    assert policy.skip_reason(b"x/docs/b.tmp", 1) is None  # a glob with / is anchored at DIR
    assert policy.skip_reason(b"a/node_modules/p/index.js", 1) is not None
    assert policy.skip_reason(b"src/building.c", 1) is None
    assert policy.skip_reason(b"src/big.c", 1001) == \
        "larger than the size cap (1001 > 1000 bytes)"
    assert policy.skip_reason(b"src/\xff.c", 1000) is None
    assert [parse_size(t) for t in ("1024", "2K", "1.5M", "3G", "10MiB", "7 kb")] == [
        1024, 2048, 1572864, 3 << 30, 10 << 20, 7168]
    with pytest.raises(ValueError):
        parse_size("lots")


def test_excluded_and_oversized_files_are_deleted_unsaved_and_say_why(
    tmp_path: Path, guards: Guards, backupd_factory: Callable[..., Backupd]
) -> None:
    home = guards.home
    directory = tmp_path / "project"
    (directory / "build" / "obj").mkdir(parents=True)
    (directory / "build" / "obj" / "app").write_bytes(b"binary")
    (directory / "main.o").write_bytes(b"object")
    (directory / "huge.iso").write_bytes(b"x" * 20_000)
    (directory / "keep.c").write_bytes(b"int main;")
    daemon = backupd_factory(home)
    daemon.start()
    guards.start(directory, "--exclude", "build", "--exclude", "*.o", "--max-size", "10K")
    subprocess.run(["sh", "-c", "rm -rf build main.o huge.iso keep.c"], cwd=directory,
                   check=True, timeout=60)
    assert os.listdir(directory) == []

    def listed() -> list[dict[str, object]]:
        return json.loads(agentctl_cmd(home, "backup", "list", "--json").stdout)  # type: ignore[no-any-return]

    wait_for(lambda: any(e["state"] == "purged" for e in listed()), what="keep.c uploaded")
    files = {Path(str(e["path"])).name: e for e in listed() if e["kind"] == "file"}
    assert files["keep.c"]["state"] == "purged"
    assert (files["app"]["state"], files["app"]["last_error"]) == ("skipped", "excluded by 'build'")
    assert files["main.o"]["last_error"] == "excluded by '*.o'"
    assert files["huge.iso"]["last_error"] == "larger than the size cap (20000 > 10240 bytes)"
    wait_for(lambda: daemon.log.read_text().count("skipped (not backed up)") == 3,
             what="three skips logged by backupd")
    assert f"{directory}/huge.iso: larger than the size cap" in daemon.log.read_text()
    # Restoring says why there is nothing to restore, and brings back what there is.
    done = agentctl_cmd(home, "backup", "restore", str(directory))
    assert done.returncode == 0, done.stderr
    assert "huge.iso: it was not backed up: larger than the size cap" in done.stderr
    assert (directory / "keep.c").read_bytes() == b"int main;"
    assert not (directory / "huge.iso").exists()
    status = json.loads(agentctl_cmd(home, "guard", "status", "--json").stdout)
    [row] = status["guards"]
    assert row["counts"]["skipped"] == 3
    assert row["policy"] == {"excludes": ["build", "*.o"], "max_size": 10240}


def test_the_config_file_gives_guard_start_its_policy(tmp_path: Path, guards: Guards) -> None:
    config = tmp_path / "config" / "isolated-agent" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[guard]\nexclude = ["node_modules", "*.o"]\nmax_size = "1M"\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    configured, flagged = tmp_path / "configured", tmp_path / "flagged"
    configured.mkdir()
    flagged.mkdir()
    guards.start(configured, env=env)
    guards.start(flagged, "--exclude", "dist", env=env)  # a flag replaces the list
    status = json.loads(agentctl_cmd(guards.home, "guard", "status", "--json").stdout)
    policies = {row["dir"]: row["policy"] for row in status["guards"]}
    assert policies[str(configured)] == {"excludes": ["node_modules", "*.o"],
                                         "max_size": 1 << 20}
    assert policies[str(flagged)] == {"excludes": ["dist"], "max_size": 1 << 20}
