"""On a terminal, commit draws a progress bar for large commits and diff is coloured; piped,
both stay plain."""

from __future__ import annotations

import os
import sys

import pexpect

from tests.review.conftest import Workspace


def spawn(ws: Workspace, *args: str) -> str:
    env = {**os.environ, "ISOLATED_AGENT_HOME": str(ws.store_home), "TERM": "xterm-256color"}
    child = pexpect.spawn(sys.executable, ["-m", "isolated_agent", *args], cwd=str(ws.project),
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 120))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return str(child.before)


def test_progress_bar_and_colours_on_a_terminal_only(ws: Workspace) -> None:
    for index in range(700):
        (ws.project / f"f{index:03d}.txt").write_text(f"{index}\n")
    ws.run("for f in f*.txt; do echo more >> $f; done")

    coloured = spawn(ws, "diff", "f000.txt")
    assert "\x1b[32m+more\x1b[m" in coloured
    assert "\x1b[" not in ws.ctl("diff", "f000.txt").stdout

    piped = ws.ctl("commit", "--dry-run")
    assert "\x1b[" not in piped.stderr and "backing up" not in piped.stderr

    output = spawn(ws, "commit")
    assert "commit backing up" in output or "commit applying" in output
    assert "committed 700 changes of env e1 (700 modified)" in output
    assert (ws.project / "f699.txt").read_text() == "699\nmore\n"
