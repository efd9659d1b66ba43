"""What a new user meets on a first run (issue 12): default state paths that do not exist yet,
a program left in /tmp, and a /dev/fuse they may not open. Each either works or says exactly
why and what to do."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Agentctl, RunAs


def test_missing_default_allows_are_made_for_the_job_and_kept_only_if_used(
    agentctl: Agentctl, project: Path, disk_dir: Path
) -> None:
    """A user without ~/.npm: a first `npm install` must be able to make its cache."""
    home = disk_dir / "home"
    home.mkdir()
    done = agentctl("run", "-q", "--", "sh", "-c",
                    'mkdir -p "$HOME/.npm/_cacache" && echo data > "$HOME/.npm/_cacache/x"',
                    cwd=project, env={"HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert (home / ".npm" / "_cacache" / "x").read_text() == "data\n"
    # What the job did not use is not left behind (nor ~/.cargo, made for ~/.cargo/registry).
    assert sorted(p.name for p in home.iterdir()) == [".npm"]


def test_a_program_in_the_hosts_tmp_is_explained(agentctl: Agentctl, project: Path) -> None:
    program = Path("/tmp") / f"ia-tool-{os.getpid()}"
    shutil.copy("/bin/true", program)
    try:
        done = agentctl("run", "-q", "--", str(program), cwd=project)
        assert done.returncode == 127
        assert "the job's /tmp and /dev/shm are its own" in done.stderr, done.stderr
        assert "--allow /tmp" in done.stderr
        assert agentctl("run", "-q", "--allow", "/tmp", "--", str(program),
                        cwd=project).returncode == 0
    finally:
        program.unlink()


def test_a_dev_fuse_closed_to_the_user_says_how_to_open_it(
    run_as_user: RunAs, user_project: Path
) -> None:
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o600)
    try:
        done = run_as_user("run", "-q", "--engine", "fuse", "--", "true", cwd=user_project)
    finally:
        os.chmod("/dev/fuse", mode)
    assert done.returncode == 125
    assert "/dev/fuse is not open to you (mode 0600)" in done.stderr, done.stderr
    assert "chmod 0666 /dev/fuse" in done.stderr


def test_a_run_from_a_subdirectory_uses_the_projects_env(
    agentctl: Agentctl, project: Path
) -> None:
    first = agentctl("run", "-q", "--", "sh", "-c", "echo 1 > src/count", cwd=project)
    assert first.returncode == 0, first.stderr
    inside = agentctl("run", "--", "cat", "count", cwd=project / "src")
    assert inside.returncode == 0 and inside.stdout == "1\n", inside.stderr
    assert "created env" not in inside.stderr and "using it" in inside.stderr
    assert agentctl("diff", "--name-status", cwd=project / "src").stdout == "A\tsrc/count\n"
    assert len(json.loads(agentctl("env", "list", "--json").stdout)) == 1


@pytest.mark.parametrize("engine", ["kernel", "fuse"])
def test_the_project_roots_own_mode_and_group_are_shown(
    agentctl: Agentctl, project: Path, engine: str
) -> None:
    """A shared project root (2770, the team's group): a directory the job makes there gets
    the group and the setgid bit, as natively, and the commit carries them."""
    group = 4242
    os.chown(project, -1, group)
    project.chmod(0o2770)
    script = "stat -c '%a %g' . && mkdir made && stat -c '%a %g' made"
    done = agentctl("run", "-q", "--engine", engine, "--", "sh", "-c", script, cwd=project)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["2770 4242", "2755 4242"], done.stdout
    assert agentctl("commit", cwd=project).returncode == 0
    made = (project / "made").stat()
    assert (stat.S_IMODE(made.st_mode), made.st_gid) == (0o2755, group)


def test_a_working_directory_that_is_gone_is_explained(store_home: Path, tmp_path: Path) -> None:
    """A removed directory, or one on a filter mount that stopped (ENOTCONN): one line that
    says so, never an internal error."""
    gone = tmp_path / "gone"
    gone.mkdir()
    done = subprocess.run(
        ["sh", "-c", 'rmdir "$1" && exec "$2" -m isolated_agent run -- true', "-", str(gone),
         sys.executable],
        cwd=gone, env={**os.environ, "ISOLATED_AGENT_HOME": str(store_home)},
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "current directory is not reachable" in done.stderr, done.stderr
