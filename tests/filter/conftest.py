"""Fixtures for the filter mount: a real filter daemon over a real directory, in place.

`FilterFs` stands in for agentfs's `Agentfs` fixture so that the DESIGN §5 behaviour tests run
unchanged through the filter mount: the test process registers itself as the job (so it sees
the env at the lower's own path, `fs.mnt`), while `fs.lower` — once mounted — is a path through
a descriptor of the lower taken before the mount (`/proc/PID/fd/N`), which reaches the real
files beneath the filter: the host's bytes, for the "lower untouched" checks. As for agentfs,
the lower is bind-mounted read-only first, so a write leaking to the host fails loudly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from isolated_agent.engines.filter import control, records
from isolated_agent.engines.filter.identity import start_time
from isolated_agent.fusefs import mount as mounts
from isolated_agent.protocol.client import request
from isolated_agent.protocol.frames import Code, Frame
from tests.agentfs.conftest import Agentfs, bind_read_only, force_unmount, wait_for
from tests.conftest import snapshot


def stop_filter_daemons(store: Path) -> None:
    """Kill every filter daemon a store's runs started, and take their mounts down."""
    for record in (store / "run" / "filters").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            data = json.loads(record.read_text())
            pid = int(data["pid"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            mounts.wait_exited(pid, timeout=5)
            force_unmount(Path(data["root"]))


class FilterDaemon:
    """A filter daemon over `root`, with its control socket and log under `base`."""

    def __init__(self, root: Path, base: Path) -> None:
        self.root = root
        self.run_dir = base / "run"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = base / "filter.log"
        self.pid = 0

    @property
    def socket(self) -> str:
        return records.socket_path(str(self.run_dir), str(self.root))

    def start(self) -> None:
        self.pid = control.start_background(str(self.root), str(self.run_dir), str(self.log),
                                           on_demand=False)

    def ask(self, code: Code, **body: object) -> dict[str, object]:
        return request(self.socket, Frame(code, dict(body))).body

    def register(self, job: str, env: str, upper: Path, work: Path, pid: int,
                 cgroup: str | None = None) -> None:
        self.ask(Code.REGISTER_JOB, job=job, env=env, upper=str(upper), work=str(work),
                 cgroup=cgroup, anchor=[pid, start_time(pid)])

    def stop(self) -> None:
        if self.pid and mounts.wait_exited(self.pid, timeout=0):
            self.pid = 0
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            if not mounts.wait_exited(self.pid, timeout=10):
                os.kill(self.pid, signal.SIGKILL)
                mounts.wait_exited(self.pid, timeout=5)
            self.pid = 0
        force_unmount(self.root)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class FilterFs(Agentfs):
    """agentfs's fixture, served by the filter mount to this very process (the job)."""

    def __init__(self, base: Path) -> None:
        super().__init__(base, handles=True)  # the filter always answers opens with handles
        self.mnt = self.lowers[0]
        self.daemon = FilterDaemon(self.mnt, base)
        self._lower_fd: int | None = None

    @property
    def lower(self) -> Path:
        if self._lower_fd is None:
            return self.lowers[0]
        return Path(f"/proc/{os.getpid()}/fd/{self._lower_fd}")

    def mount(self, *options: str, env: dict[str, str] | None = None,
              fd_limit: int | None = None) -> Path:
        # The filter decides its caching per name (cache=... is the env mount's choice).
        assert all(o.startswith("cache=") for o in options) and not env and not fd_limit
        real = self.lowers[0]
        if real not in self._bound:
            self._lower_snapshots[real] = snapshot(real)
            bind_read_only(real)
            self._bound.append(real)
            self._lower_fd = os.open(real, os.O_PATH | os.O_DIRECTORY)
        self.daemon.start()
        self.daemon.register("test", "env", self.upper, self.work, os.getpid())
        wait_for(lambda: mounts.is_fuse_mount(mounts.mount_entry(str(real))), what="filter")
        return self.mnt

    def unmount(self) -> None:
        self.daemon.stop()

    def remount(self, *options: str) -> Path:
        self.unmount()
        return self.mount(*options)

    def teardown(self) -> None:
        self.daemon.stop()
        if self._lower_fd is not None:
            os.close(self._lower_fd)
            self._lower_fd = None
        for lower in reversed(self._bound):
            force_unmount(lower)
        self._bound = []

    def check_lowers_untouched(self) -> None:
        for lower, before in self._lower_snapshots.items():
            assert snapshot(lower) == before, f"the host files {lower} changed"

    def log_text(self) -> str:
        return self.daemon.log_text()


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[FilterFs]:
    """The behaviour tests' overlay, through the filter mount. Populate `fs.lower`, then
    `fs.mount()`; this process is then the job."""
    overlay = FilterFs(tmp_path / "ovl")
    try:
        yield overlay
    finally:
        overlay.teardown()
    overlay.check_lowers_untouched()


@pytest.fixture
def fs_factory() -> None:
    pytest.skip("the filter mount has one lower: the host's files")


# A process that does one file operation per line it reads ([op, path]) and prints the result
# (or "errno N"): registered as a job, it is that job's view; unregistered, the host's.
WORKER = r"""
import json, os, sys
for line in sys.stdin:
    op, path = json.loads(line)
    try:
        if op == "read":
            with open(path, "rb") as f:
                result = f.read().decode()
        elif op == "stat":
            st = os.stat(path)
            result = [st.st_size, st.st_mode, st.st_mtime_ns, st.st_nlink]
        elif op == "list":
            result = sorted(os.listdir(path))
        elif op == "write":
            with open(path, "w") as f:
                f.write("written")
            result = "ok"
        elif op == "unlink":
            os.unlink(path)
            result = "ok"
        elif op == "mkdir":
            os.mkdir(path)
            result = "ok"
        elif op == "rmdir":
            os.rmdir(path)
            result = "ok"
    except OSError as e:
        result = f"errno {e.errno}"
    print(json.dumps(result), flush=True)
"""


class Worker:
    """A WORKER process, in `cwd`."""

    def __init__(self, cwd: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", WORKER], cwd=cwd, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    @property
    def pid(self) -> int:
        return self.process.pid

    def __call__(self, op: str, path: Path) -> object:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps([op, str(path)]) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
