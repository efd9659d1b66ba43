"""The hostile-job battery (issue 11): each test is an attack a clever job would try, run on
every engine where it applies, bounded in time and count, and it cleans up after itself.

`hostile` runs a job through `agentctl run --engine E` over a project on the disk (not under
/tmp, which a namespaced job sees private, and where the filter engine refuses a store). The
filter and copy engines run no root job, so their jobs are run by the unprivileged user, who
owns the battery's files; after each such run the user's filter daemon is stopped, so that the
test (root) can look at the host's files again (a user's FUSE mount is that user's alone).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DISK_SCRATCH_PREFIX, USER, user_agentctl
from tests.filter.conftest import stop_filter_daemons
from tests.guard.conftest import guards  # noqa: F401 - the guard battery's fixture

ENGINES = ("kernel", "fuse", "filter", "copy")
# Engines without namespaces run no root job: their jobs are run by the unprivileged user.
USER_ENGINES = ("filter", "copy")


@dataclass
class Hostile:
    """A store, a project and a place outside both, for one engine."""

    engine: str
    base: Path
    # Where the package copy is when the job is run by the unprivileged user (the filter).
    package: Path | None = None

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

    def argv(self, *command: str, options: tuple[str, ...] = (), quiet: bool = True) -> list[str]:
        args = ("run", *(["-q"] if quiet else []), "--engine", self.engine, *options, "--",
                *command)
        if self.package is not None:
            return user_agentctl(self.package, self.store, self.project, *args)
        return [sys.executable, "-m", "isolated_agent", *args]

    def run(self, *command: str, options: tuple[str, ...] = (), quiet: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(self.argv(*command, options=options, quiet=quiet),
                                  cwd=self.project, env=self.env, capture_output=True, text=True,
                                  timeout=timeout)
        finally:
            if self.package is not None:
                stop_filter_daemons(self.store)

    def give(self, *paths: Path) -> None:
        """Make paths the job's user's own, as the files of whoever runs agentctl are."""
        if self.package is not None:
            user = pwd.getpwnam(USER)
            for path in paths:
                os.lchown(path, user.pw_uid, user.pw_gid)


@pytest.fixture(params=ENGINES)
def hostile(request: pytest.FixtureRequest) -> Iterator[Hostile]:
    base = Path(tempfile.mkdtemp(prefix=DISK_SCRATCH_PREFIX + "hostile-"))
    battery = Hostile(request.param, base)
    battery.project.mkdir()
    battery.outside.mkdir()
    (battery.project / "a.txt").write_text("host\n")
    if battery.engine in USER_ENGINES:
        request.getfixturevalue("unprivileged_user")
        request.getfixturevalue("fuse_open_to_users")
        battery.package = request.getfixturevalue("package_copy")
        battery.give(base, battery.project, battery.outside, battery.project / "a.txt")
    try:
        yield battery
    finally:
        stop_filter_daemons(battery.store)
        shutil.rmtree(base, ignore_errors=True)
