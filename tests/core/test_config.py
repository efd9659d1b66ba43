"""The user's config file ($XDG_CONFIG_HOME/isolated-agent/config.toml): defaults for `run`,
which flags override; refused when someone else could write it; never read from a project,
and out of a job's reach."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from isolated_agent.cli import settings
from isolated_agent.errors import UsageError
from isolated_agent.system.cgroup import Limits, limits_problem


def write_config(config_home: Path, text: str) -> Path:
    path = config_home / "isolated-agent" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "config"
    home.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


def agentctl(*args: str, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "isolated_agent", *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


# -- the file's rules, without a job ---------------------------------------------------------------

unit = pytest.mark.unit


@unit
def test_settings_become_the_commands_defaults(config_home: Path) -> None:
    write_config(config_home, '[run]\nengine = "fuse"\nallow = ["~/.m2"]\n'
                 'default_allows = false\ncpus = 2\n[guard]\nexclude = ["*.o"]\n')
    assert settings.load().default_map() == {
        "run": {"engine": "fuse", "allow": ["~/.m2"], "no_default_allows": True, "cpus": 2.0},
        "guard": {"start": {"excludes": ["*.o"]}},
    }


@unit
@pytest.mark.parametrize("text,message", [
    ('[run]\nengin = "fuse"\n', "unknown setting run.engin; known: guard.exclude"),
    ('[run]\nengine = "docker"\n', "run.engine must be one of auto, kernel, fuse, filter, copy"),
    ('[run]\nallow = "/tmp"\n', "run.allow must be a list of strings"),
    ('[run]\npids = 0\n', "run.pids must be a whole number of at least 1"),
    ('[run]\npids = true\n', "run.pids must be a whole number of at least 1"),
    ('[run]\nmemory = "lots"\n', "run.memory must be a size such as 500M or 8G"),
    ('[run]\ndefault_allows = "no"\n', "run.default_allows must be true or false"),
    ('engine = "fuse"\n', "engine must be a table ([engine])"),
    ('[run\n', "fix the file"),
])
def test_a_wrong_file_is_refused_with_what_is_wrong(config_home: Path, text: str,
                                                   message: str) -> None:
    path = write_config(config_home, text)
    with pytest.raises(UsageError, match=re.escape(message)) as raised:
        settings.load()
    assert str(path) in str(raised.value)


@unit
def test_a_file_others_may_write_is_refused(config_home: Path) -> None:
    path = write_config(config_home, '[run]\nengine = "fuse"\n')
    path.chmod(0o666)
    with pytest.raises(UsageError, match=r"writable by others \(mode 0666\).*chmod go-w"):
        settings.load()
    path.chmod(0o644)
    path.parent.chmod(0o777)
    with pytest.raises(UsageError, match=f"{re.escape(str(path.parent))} is writable by others"):
        settings.load()
    path.parent.chmod(0o755)

def test_a_file_of_another_user_is_refused(config_home: Path) -> None:
    path = write_config(config_home, '[run]\nengine = "fuse"\n')
    os.chown(path, 12345, 12345)  # root makes it another user's
    with pytest.raises(UsageError, match="belongs to uid 12345, not to you"):
        settings.load()


@unit
def test_a_relative_config_home_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")
    assert settings.config_path() == os.path.expanduser("~/.config/isolated-agent/config.toml")


# -- through agentctl ------------------------------------------------------------------------------


def test_config_show_says_where_each_value_comes_from(config_home: Path) -> None:
    path = write_config(config_home, '[run]\nnetwork = "none"\n[guard]\nmax_size = "1G"\n')
    done = agentctl("config", "show", "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["file"] == str(path)
    assert shown["settings"]["run.network"] == {"value": "none", "source": str(path)}
    assert shown["settings"]["guard.max_size"] == {"value": "1G", "source": str(path)}
    assert shown["settings"]["run.engine"] == {"value": "auto", "source": "default"}
    assert shown["settings"]["run.default_allows"] == {"value": True, "source": "default"}
    assert shown["settings"]["run.allow"] == {"value": [], "source": "default"}
    assert len(shown["settings"]) == len(settings.SETTINGS)


def test_a_broken_config_stops_run_but_not_review(config_home: Path, project: Path,
                                                  store_home: Path) -> None:
    write_config(config_home, '[run]\nengine = "docker"\n')
    done = agentctl("run", "--", "true", cwd=project)
    assert done.returncode == 2
    assert done.stderr.startswith("agentctl: ") and "run.engine must be one of" in done.stderr
    assert "Traceback" not in done.stderr
    assert agentctl("env", "list", cwd=project).returncode == 0


def test_run_takes_the_configured_engine_and_a_flag_overrides_it(
    config_home: Path, project: Path, store_home: Path
) -> None:
    write_config(config_home, '[run]\nengine = "fuse"\n')
    done = agentctl("run", "--", "true", cwd=project)
    assert done.returncode == 0, done.stderr
    assert ", fuse engine" in done.stderr
    done = agentctl("run", "--engine", "kernel", "--", "true", cwd=project)
    assert done.returncode == 0, done.stderr
    assert ", kernel engine" in done.stderr


def test_configured_allows_are_replaced_by_allow_flags(
    config_home: Path, project: Path, store_home: Path, disk_dir: Path
) -> None:
    configured, flagged = disk_dir / "configured", disk_dir / "flagged"
    configured.mkdir()
    flagged.mkdir()
    write_config(config_home, f'[run]\nallow = ["{configured}"]\n')
    done = agentctl("run", "--", "sh", "-c", f"touch {configured}/a", cwd=project)
    assert done.returncode == 0, done.stderr
    assert (configured / "a").exists()
    done = agentctl("run", "--allow", str(flagged), "--", "sh", "-c",
                    f"touch {flagged}/b; touch {configured}/c", cwd=project)
    assert (flagged / "b").exists()
    assert not (configured / "c").exists()


def test_configured_limits_apply(config_home: Path, project: Path, store_home: Path) -> None:
    write_config(config_home, '[run]\npids = 64\n')
    done = agentctl("run", "--", "true", cwd=project)
    problem = limits_problem(Limits(pids=64))
    if problem is None:
        assert done.returncode == 0, done.stderr
    else:  # as on this test machine: refused, never run without the limit
        assert done.returncode == 125
        assert f"resource limits: {problem}" in done.stderr


def test_a_job_cannot_rewrite_the_config(disk_dir: Path, project: Path,
                                         store_home: Path) -> None:
    """The config lives on the host outside the project (here on the disk, not in /tmp, which
    a job sees as its own): the job's write to it fails, the file stays as it was."""
    path = write_config(disk_dir, '[run]\nnetwork = "none"\n')
    widen = f"printf '[run]\\nnetwork = \"host\"\\n' > {path}"
    done = agentctl("run", "--", "sh", "-c", widen, cwd=project,
                    env={"XDG_CONFIG_HOME": str(disk_dir)})
    assert done.returncode != 0
    assert "Read-only file system" in done.stderr or "Permission denied" in done.stderr
    assert path.read_text() == '[run]\nnetwork = "none"\n'


def test_a_project_cannot_configure_its_own_sandbox(config_home: Path, project: Path,
                                                   store_home: Path) -> None:
    """The files a repository might carry to loosen its sandbox are not read."""
    write_config(config_home, '[run]\nnetwork = "none"\n')
    for name in (".agentctl.toml", "agentctl.toml", ".isolated-agent/config.toml",
                 ".config/isolated-agent/config.toml"):
        target = project / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text('[run]\nnetwork = "host"\nallow = ["/"]\n')
    done = agentctl("config", "show", "--json", cwd=project)
    shown = json.loads(done.stdout)["settings"]
    assert shown["run.network"]["value"] == "none"
    assert shown["run.allow"]["value"] == []
