"""Crash safety: a commit SIGKILLed at any point is finished (or rolled back) by the next
agentctl command, so that every path is in its pre- or post-commit state and every host file
the commit replaced or deleted is in the backup store."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from isolated_agent.backup.restore import verify_blob
from tests.review.conftest import State, Workspace, copy_tree, rmtree, tree_state

WORKLOAD = textwrap.dedent("""\
    set -e
    for i in 0 1 2 3 4 5; do sed -i 's/line/LINE/' d0$i/*.txt; done
    rm -rf d06 d07
    mkdir new && for i in $(seq 1 300); do echo n$i > new/n$i; done
    mv d08 d08moved
    rm -rf d09 && echo file > d09
    chmod 600 d10/*.txt
    echo tail >> big.bin
    rm -rf d11 && mkdir d11 && echo fresh > d11/f000.txt
""")


@dataclass
class Scenario:
    ws: Workspace
    pristine_project: Path
    pristine_upper: Path
    pre: State
    post: State
    journal: Path

    def reset(self) -> None:
        """Host and env exactly as before the commit (host first, so every upper entry is
        born after the host's last change: no conflicts)."""
        rmtree(self.ws.project)
        copy_tree(self.pristine_project, self.ws.project)
        upper = self.ws.upper()
        rmtree(upper)
        copy_tree(self.pristine_upper, upper)
        assert not self.journal.exists()

    def start_commit(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "isolated_agent", "commit"],
            cwd=self.ws.project, env=dict(os.environ, ISOLATED_AGENT_HOME=str(self.ws.store_home)),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def phase(self) -> str:
        """Where the killed commit stood: the journal's last durable marker."""
        try:
            lines = self.journal.read_bytes().split(b"\n")
        except FileNotFoundError:
            return "no journal"
        phase = "planned"
        for line in lines[1:]:
            try:
                phase = json.loads(line)["phase"]
            except ValueError:
                break
        return phase

    def check_after_recovery(self) -> None:
        state = tree_state(self.ws.project)
        for path in set(self.pre) | set(self.post):
            assert state.get(path) in (self.pre.get(path), self.post.get(path)), path
        backups = self.ws.backups()
        try:
            for path, (kind, perms, detail) in self.pre.items():
                if state.get(path) == (kind, perms, detail) or not isinstance(detail, str):
                    continue
                host_path = os.fsencode(self.ws.project) + b"/" + path
                events = backups.catalog.find(path=host_path)
                matching = [e for e in events if e.path == host_path and e.sha256 == detail]
                assert matching, f"{path!r} was replaced but is not in the backup store"
                verify_blob(backups, matching[-1])
        finally:
            backups.close()


@pytest.fixture(params=["store-on-host-fs", "store-on-own-fs"])
def store_placement(request: pytest.FixtureRequest, ws: Workspace) -> Iterator[str]:
    """The store on the project's filesystem (env files move to the host and replaced host
    files move into the backup store, no copies) or on a filesystem of its own (everything is
    copied): both paths must survive a SIGKILL."""
    if request.param == "store-on-own-fs":
        ws.store_home.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "store", str(ws.store_home)],
                       check=True)
        try:
            yield request.param
        finally:
            subprocess.run(["umount", "-l", str(ws.store_home)], check=True)
    else:
        yield request.param


@pytest.fixture
def scenario(ws: Workspace, store_placement: str) -> Scenario:
    for d in range(12):
        folder = ws.project / f"d{d:02d}"
        folder.mkdir()
        for f in range(100):
            (folder / f"f{f:03d}.txt").write_text(f"line {d} {f}\n" * 20)
    (ws.project / "big.bin").write_bytes(os.urandom(8 << 20))
    pre = tree_state(ws.project)
    reference = ws.direct(WORKLOAD, "reference")
    ws.run(WORKLOAD)
    pristine_project = ws.tmp / "pristine-project"
    pristine_upper = ws.tmp / "pristine-upper"
    copy_tree(ws.project, pristine_project)
    copy_tree(ws.upper(), pristine_upper)
    env_dir = ws.upper().parent.parent.parent
    return Scenario(ws, pristine_project, pristine_upper, pre, tree_state(reference),
                    env_dir / "commit.journal")


def recover_and_check(scenario: Scenario, how: str) -> None:
    ws = scenario.ws
    # `commit --resume`, or any other command, which finishes it before doing its own work
    result = ws.ctl("commit", "--resume") if how == "resume" else ws.ctl("env", "list")
    assert result.returncode == 0, result.stderr
    assert not scenario.journal.exists()
    scenario.check_after_recovery()
    # ...and the env still holds exactly what is left to commit.
    result = ws.ctl("commit")
    assert result.returncode == 0, result.stderr
    assert tree_state(ws.project) == scenario.post
    assert os.listdir(ws.upper()) == []


@pytest.mark.slow
@pytest.mark.parametrize("store_placement", ["store-on-host-fs"], indirect=True)
def test_sigkill_at_random_points(scenario: Scenario) -> None:
    scenario.reset()
    started = time.monotonic()
    clean = scenario.start_commit()
    assert clean.wait(120) == 0
    duration = time.monotonic() - started
    assert tree_state(scenario.ws.project) == scenario.post

    rng = random.Random(int(os.environ.get("CRASH_SEED", "20260301")))
    phases: Counter[str] = Counter()
    for iteration in range(10):
        scenario.reset()
        process = scenario.start_commit()
        time.sleep(rng.uniform(0.15, duration))
        process.send_signal(signal.SIGKILL)
        process.wait()
        phases[scenario.phase()] += 1
        recover_and_check(scenario, "resume" if iteration % 2 else "auto")
    print("killed in:", dict(phases))
    assert len(phases) >= 2, f"every kill landed in the same place: {dict(phases)}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("phase", "delay"),
    [("planned", 0.0), ("backed-up", 0.0), ("backed-up", 0.05), ("applied", 0.0)],
)
def test_sigkill_in_each_phase(scenario: Scenario, phase: str, delay: float) -> None:
    """Kill as soon as the journal reaches a phase (and a little after), so that every phase
    is certainly covered, whatever the machine's speed."""
    scenario.reset()
    process = scenario.start_commit()
    deadline = time.monotonic() + 60
    while scenario.phase() != phase and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.0005)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    recover_and_check(scenario, "resume")
