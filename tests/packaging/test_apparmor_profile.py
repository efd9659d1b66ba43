"""packaging/apparmor/agentctl: well formed, and attached where the README installs agentctl.

Where apparmor_parser is installed it parses the profile (without loading it into a kernel).
Parsers older than AppArmor 4.0 (Debian 12 has 3.0.8) know neither the 4.0 ABI nor its
`userns` rule: they parse the rest — header, attachment, flags, includes — and the two
4.0 lines are checked against apparmor.d(5)'s grammar here."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from isolated_agent.jobs.doctor import APPARMOR_FIX, APPARMOR_PROFILE

pytestmark = pytest.mark.unit

PROFILE = Path(__file__).parents[2] / APPARMOR_PROFILE
ABI_4 = "abi <abi/4.0>,"
USERNS_RULE = "  userns,"


def _lines() -> list[str]:
    return PROFILE.read_text().splitlines()


def _parser_version(parser: str) -> tuple[int, int]:
    out = subprocess.run([parser, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"version (\d+)\.(\d+)", out)
    assert found, out
    return int(found.group(1)), int(found.group(2))


@pytest.mark.skipif(shutil.which("apparmor_parser") is None,
                    reason="apparmor_parser is not installed (CI installs it)")
def test_apparmor_parser_accepts_the_profile(tmp_path: Path) -> None:
    parser = shutil.which("apparmor_parser")
    assert parser is not None
    text = PROFILE.read_text()
    if _parser_version(parser) < (4, 0):
        assert text.count(ABI_4 + "\n") == 1 and text.count(USERNS_RULE + "\n") == 1
        text = text.replace(ABI_4, "abi <abi/3.0>,").replace(USERNS_RULE + "\n", "")
    checked = tmp_path / "agentctl"
    checked.write_text(text)
    done = subprocess.run([parser, "--skip-kernel-load", "--skip-cache", str(checked)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_profile_grants_user_namespaces_and_nothing_else() -> None:
    rules = [line.strip() for line in _lines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert rules[0] == ABI_4
    header = next(r for r in rules if r.startswith("profile "))
    assert header.endswith("flags=(unconfined) {")
    body = rules[rules.index(header) + 1:]
    assert body == ["userns,", "include if exists <local/agentctl>", "}"]


def _glob_regex(glob: str) -> str:
    """apparmor.d(5)'s globbing: {a,b} alternation (not nested here), * within one path
    component."""
    pattern = ""
    for part in re.split(r"(\{[^}]*\})", glob):
        if part.startswith("{"):
            pattern += "(" + "|".join(_glob_regex(a) for a in part[1:-1].split(",")) + ")"
        else:
            pattern += "[^/]*".join(re.escape(piece) for piece in part.split("*"))
    return pattern


def _attachment_regex() -> re.Pattern[str]:
    header = next(line for line in _lines() if line.startswith("profile "))
    return re.compile(_glob_regex(header.split()[2]) + r"\Z")


@pytest.mark.parametrize("path,attached", [
    ("/home/alice/.isolated-agent/bin/agentctl", True),  # the README's set-up command
    ("/root/.isolated-agent/bin/agentctl", True),
    ("/usr/local/bin/agentctl", True),  # pip install as root
    ("/usr/bin/agentctl", True),
    ("/home/alice/src/project/bin/agentctl", False),
    ("/home/alice/.isolated-agent/bin/python3", False),
])
def test_profile_attaches_where_agentctl_is_installed(path: str, attached: bool) -> None:
    assert bool(_attachment_regex().match(path)) is attached


def test_doctor_names_the_profile_and_how_to_load_it() -> None:
    assert PROFILE.is_file()
    assert f"{APPARMOR_PROFILE} /etc/apparmor.d/agentctl" in APPARMOR_FIX
    assert "apparmor_parser -r /etc/apparmor.d/agentctl" in APPARMOR_FIX
