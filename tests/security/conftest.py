"""The hostile-job battery (issue 11): each test is an attack a clever job would try, run on
every engine where it applies, bounded in time and count, and it cleans up after itself.

`hostile` runs a job through `agentctl run --engine E` over a project on the disk (not under
/tmp, which a namespaced job sees private, and where the filter engine refuses a store), and
stops whatever filter daemon the run started when the test ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DISK_SCRATCH_PREFIX
from tests.filter.conftest import stop_filter_daemons
from tests.guard.conftest import guards  # noqa: F401 - the guard battery's fixture

ENGINES = ("kernel", "fuse", "filter")


@dataclass
class Hostile:
    """A store, a project and a place outside both, for one engine."""

    engine: str
    base: Path

    @property
    def store(self) -> Path:
        return self.base / "store"

    @property
    def project(self) -> Path:
        return self.base / "project"

    @property
    def outside(self) -> Path:
        return self.base / "outside"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "ISOLATED_AGENT_HOME": str(self.store)}

    def argv(self, *command: str, options: tuple[str, ...] = ()) -> list[str]:
        return [sys.executable, "-m", "isolated_agent", "run", "-q", "--engine", self.engine,
                *options, "--", *command]

    def run(self, *command: str, options: tuple[str, ...] = (),
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*command, options=options), cwd=self.project,
                              env=self.env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(params=ENGINES)
def hostile(request: pytest.FixtureRequest) -> Iterator[Hostile]:
    base = Path(tempfile.mkdtemp(prefix=DISK_SCRATCH_PREFIX + "hostile-"))
    battery = Hostile(request.param, base)
    battery.project.mkdir()
    battery.outside.mkdir()
    (battery.project / "a.txt").write_text("host\n")
    try:
        yield battery
    finally:
        stop_filter_daemons(battery.store)
        shutil.rmtree(base, ignore_errors=True)
