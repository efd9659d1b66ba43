"""An interactive shell under a real pty: commands run, job control works, Ctrl-C reaches the
job and not agentctl, the window size is the terminal's, and the exit status comes back."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pexpect


def wait_until_foreground(marker: str) -> None:
    """Wait until a process with `marker` in its command line owns its terminal."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
        for pid in found.stdout.split():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                if fields[2] == fields[5]:  # process group == the terminal's foreground group
                    return
        time.sleep(0.01)
    raise AssertionError(f"no foreground process matching {marker}")


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

        # Ctrl-C interrupts the sleep; the shell (and agentctl) live on. A ^C sent before bash
        # has handed the terminal to `sleep` is bash's to swallow, so wait for the hand-over.
        child.sendline("sleep 31.25")
        wait_until_foreground("31.25")
        child.sendintr()
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
