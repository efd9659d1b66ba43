"""An interactive shell under a real pty: commands run, job control works, Ctrl-C reaches the
job and not agentctl, the window size is the terminal's, and the exit status comes back."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pexpect


def test_interactive_bash_on_a_pty(store_home: Path, project: Path) -> None:
    env = {**os.environ, "ISOLATED_AGENT_HOME": str(store_home), "PS1": "ia$ ", "TERM": "dumb"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "isolated_agent", "run", "-q", "--", "bash", "--norc", "--noprofile", "-i"],
        cwd=str(project), env=env, encoding="utf-8", timeout=20, dimensions=(33, 101),
    )
    try:
        child.expect_exact("ia$ ")
        child.sendline("echo $((6 * 7)) > answer; cat answer")
        child.expect_exact("42")
        child.expect_exact("ia$ ")

        child.sendline("stty size")
        child.expect_exact("33 101")
        child.expect_exact("ia$ ")
        child.setwinsize(40, 120)
        child.sendline("stty size")
        child.expect_exact("40 120")
        child.expect_exact("ia$ ")

        child.sendline("sleep 30")
        child.sendintr()  # Ctrl-C interrupts the sleep, the shell (and agentctl) live on
        child.expect_exact("ia$ ")
        child.sendline("echo still-here")
        child.expect_exact("still-here")
        child.expect_exact("ia$ ")

        child.sendline("sleep 30 &")  # job control: a background job, then kill it
        child.expect_exact("ia$ ")
        child.sendline("jobs; kill %1")
        child.expect_exact("sleep 30 &")
        child.expect_exact("ia$ ")

        child.sendline("exit 3")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 3
    assert not (project / "answer").exists()
