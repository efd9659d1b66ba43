"""Commit never loses a host byte: conflicts refuse everything, --force backs the host's version
up first, a running job blocks it, a full backup store leaves the host untouched, a selective
commit keeps the rest in the env, and bad input is one clear line."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from isolated_agent.backup.restore import events_for_path
from isolated_agent.cli.main import invoke
from tests.review.conftest import Workspace, file_hash, tree_state


def test_conflicts_refuse_everything_and_force_applies(ws: Workspace) -> None:
    ws.run("echo env >> README.md; echo env > src/main.py; rm docs/guide.txt; echo new > new.txt")
    time.sleep(0.05)
    (ws.project / "README.md").write_text("the host's own edit\n")
    with open(ws.project / "docs" / "guide.txt", "a") as f:
        f.write("host addition\n")
    host_edit = file_hash(ws.project / "README.md")
    before = tree_state(ws.project)

    refused = ws.ctl("commit")
    assert refused.returncode == 1
    assert "changed on the host after the env changed them" in refused.stderr
    listed = [line.strip() for line in refused.stderr.splitlines() if line.startswith("  ")]
    assert listed == [str(ws.project / "README.md"), str(ws.project / "docs" / "guide.txt")]
    assert tree_state(ws.project) == before, "a refused commit touched the host"
    assert ws.ctl("diff", "--name-status").stdout.split("\n")[:4] == [
        "M\tREADME.md", "D\tdocs/guide.txt", "A\tnew.txt", "M\tsrc/main.py",
    ]
    dry = ws.ctl("commit", "--dry-run")
    assert dry.returncode == 0 and "2 conflict(s)" in dry.stderr
    assert tree_state(ws.project) == before

    forced = ws.ctl("commit", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    report = json.loads(forced.stdout)
    assert {c["path"] for c in report["conflicts"]} == {
        str(ws.project / "README.md"), str(ws.project / "docs" / "guide.txt")
    }
    assert (ws.project / "src" / "main.py").read_text() == "env\n"
    assert not (ws.project / "docs" / "guide.txt").exists()
    # The host's edit was overwritten, but it is in the backup store.
    backups = ws.backups()
    try:
        [event] = events_for_path(backups, os.fsencode(ws.project / "README.md"), None)
        assert event.sha256 == host_edit
    finally:
        backups.close()


def test_a_host_change_before_the_env_took_the_file_is_no_conflict(ws: Workspace) -> None:
    ws.run("echo one > unrelated")
    (ws.project / "README.md").write_text("host edit first\n")
    time.sleep(0.05)
    ws.run("echo env >> README.md")
    result = ws.ctl("commit")
    assert result.returncode == 0, result.stderr
    assert (ws.project / "README.md").read_text() == "host edit first\nenv\n"


def test_commit_is_refused_while_a_job_runs(ws: Workspace) -> None:
    ws.run("echo change > new.txt")
    job = subprocess.Popen(
        [sys.executable, "-m", "isolated_agent", "run", "-q", "--env", "e1", "--", "sleep", "60"],
        cwd=ws.project, env=dict(os.environ, ISOLATED_AGENT_HOME=str(ws.store_home)),
        start_new_session=True,
    )
    try:
        for _ in range(100):
            shown = json.loads(ws.ctl("env", "show", "e1", "--json").stdout)
            if shown["in_use"]:
                break
            time.sleep(0.05)
        result = ws.ctl("commit")
        assert result.returncode == 1
        assert "in use" in result.stderr and "commit" in result.stderr
        assert not (ws.project / "new.txt").exists()
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    result = ws.ctl("commit")
    assert result.returncode == 0, result.stderr
    assert (ws.project / "new.txt").read_text() == "change\n"


def test_selective_commit_keeps_the_rest(ws: Workspace) -> None:
    script = textwrap.dedent("""\
        echo more >> README.md
        echo new > src/new.py
        rm -rf docs
        mkdir -p fresh/sub && echo a > fresh/sub/a && echo b > fresh/b
        rm -rf src/pkg && mkdir src/pkg && echo 1 > src/pkg/one && echo 2 > src/pkg/two
    """)
    reference = ws.direct(script)
    ws.run(script)

    assert ws.ctl("commit", "src/new.py", "fresh/sub/a", "src/pkg/one").returncode == 0
    assert (ws.project / "src" / "new.py").read_text() == "new\n"
    assert (ws.project / "fresh" / "sub" / "a").read_text() == "a\n"
    assert not (ws.project / "fresh" / "b").exists()
    assert (ws.project / "src" / "pkg" / "one").exists()
    assert (ws.project / "src" / "pkg" / "mod.py").exists(), "the deletion was not selected"
    assert (ws.project / "docs" / "guide.txt").exists()
    assert (ws.project / "README.md").read_text() == "# demo\n"
    remaining = ws.ctl("diff", "--name-status").stdout.splitlines()
    assert remaining == [
        "M\tREADME.md", "D\tdocs/", "D\tdocs/guide.txt", "A\tfresh/b",
        "D\tsrc/pkg/__init__.py", "D\tsrc/pkg/mod.py", "A\tsrc/pkg/two",
    ]
    # The env's view is unchanged: the job still sees exactly what it made.
    view = ws.agentctl("run", "-q", "--env", "e1", "--", "sh", "-c",
                       "ls src/pkg fresh fresh/sub; cat src/new.py", cwd=ws.project)
    assert view.stdout.split() == ["fresh:", "b", "sub", "fresh/sub:", "a",
                                   "src/pkg:", "one", "two", "new"]

    assert ws.ctl("commit").returncode == 0
    assert tree_state(ws.project) == tree_state(reference)
    assert os.listdir(ws.upper()) == []


def test_nothing_to_commit_and_dry_run(ws: Workspace) -> None:
    result = ws.ctl("commit", "--env", "e1")
    assert result.returncode == 1 and "no env named 'e1'" in result.stderr
    ws.run("touch README.md")
    result = ws.ctl("commit")
    assert result.returncode == 0 and "nothing to commit" in result.stderr
    ws.run("echo x > a.txt && rm run.sh")
    before = tree_state(ws.project)
    dry = ws.ctl("commit", "--dry-run")
    assert dry.returncode == 0
    assert dry.stdout.splitlines() == [f"A\t{ws.project}/a.txt", f"D\t{ws.project}/run.sh"]
    assert tree_state(ws.project) == before
    assert sorted(os.listdir(ws.upper())) == ["a.txt", "run.sh"]


def test_a_full_backup_store_leaves_the_host_untouched(ws: Workspace) -> None:
    (ws.project / "large.bin").write_bytes(os.urandom(2 << 20))
    ws.run("echo small > large.bin && echo more >> README.md")
    before = tree_state(ws.project)
    backup_dir = ws.store_home / "backup"
    backup_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tiny", str(backup_dir)],
                   check=True)
    try:
        result = ws.ctl("commit")
    finally:
        subprocess.run(["umount", str(backup_dir)], check=True)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "is full" in line and "nothing on the host was changed" in line
    assert tree_state(ws.project) == before
    assert not list((ws.store_home / "envs").glob("*/commit.journal"))
    assert ws.ctl("diff", "--name-status").stdout.splitlines() == ["M\tREADME.md", "M\tlarge.bin"]
    result = ws.ctl("commit")  # with room again, it goes through
    assert result.returncode == 0, result.stderr
    assert (ws.project / "large.bin").read_text() == "small\n"


def test_bad_input_is_one_clear_line(ws: Workspace, tmp_path: Path) -> None:
    ws.run("echo x > new.txt")
    cases = [
        (("commit", "e1", "/etc"), 2, "/etc is outside the roots of env e1"),
        (("diff", "e1", "../elsewhere"), 2, "is outside the roots of env e1"),
        (("diff", "--env", "nosuch"), 1, "no env named 'nosuch'"),
        (("backup", "show", "999"), 1, "no backup with id 999"),
        (("backup", "restore", "999"), 1, "no backup with id 999"),
        (("backup", "restore", str(ws.project / "README.md")), 1, "no backup of"),
        (("backup", "list", "--since", "yesterday-ish"), 2, "is not a time"),
    ]
    for args, code, message in cases:
        result = ws.ctl(*args)
        assert result.returncode == code, (args, result.stderr)
        [line] = result.stderr.strip().splitlines()
        assert message in line, (args, line)
    outside = ws.agentctl("commit", "nosuch", cwd=tmp_path)
    assert outside.returncode == 1 and "no env named 'nosuch'" in outside.stderr

    moved = tmp_path / "moved-away"
    ws.project.rename(moved)
    for command in (("diff",), ("commit",)):
        result = ws.agentctl(*command, "e1", cwd=tmp_path)
        assert result.returncode == 1
        [line] = result.stderr.strip().splitlines()
        assert f"the managed root {ws.project} of env e1 no longer exists" in line


def test_errors_map_to_exit_codes_in_process(
    ws: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ws.run("echo x > new.txt")
    monkeypatch.chdir(ws.project)
    assert invoke(["diff", "--name-status"]) == 0
    assert capsys.readouterr().out == "A\tnew.txt\n"
    assert invoke(["commit", "e1", "/etc"]) == 2
    assert "outside the roots" in capsys.readouterr().err
    assert invoke(["commit", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["A"] == 1
    assert (ws.project / "new.txt").read_text() == "x\n"


def test_replaced_and_deleted_files_move_into_the_store_without_a_copy(ws: Workspace) -> None:
    """Store and project share a filesystem here: the backup of a replaced or deleted file is
    the file itself (same inode), moved into the store as the commit replaces it."""
    readme, guide = ws.project / "README.md", ws.project / "docs" / "guide.txt"
    old_inodes = {readme.stat().st_ino: file_hash(readme), guide.stat().st_ino: file_hash(guide)}
    ws.run("echo more >> README.md; rm docs/guide.txt")
    assert ws.ctl("commit").returncode == 0
    blobs = ws.store_home / "backup" / "blobs" / "sha256"
    for ino, digest in old_inodes.items():
        blob = blobs / digest[:2] / digest
        assert blob.stat().st_ino == ino
        assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert readme.read_text() == "# demo\nmore\n"
    assert ws.ctl("backup", "verify").returncode == 0
