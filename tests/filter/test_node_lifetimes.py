"""The filter's nodes live exactly as long as something holds them, whatever the order of
lookups, listings, creates and deletes by the host and by a job (issue 12: an expired shadow
released the very node a lookup was about to hold, and `make clean` got EIO).

A job, a host process and a second env's job that only looks take turns on a few names.
Whatever they do, no call may fail with EIO (the daemon's answer to an internal error) or lose
the mount, the daemon may log no error, and both the host process and the looking env (which
changed nothing, so it sees the host's files) must get exactly the answers the same
operations give on a plain copy: a job's work never shows anywhere else, however the kernel
caches it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isolated_agent.fusefs.daemon_log import FAILED_MARK, LogWatch
from tests.filter.conftest import FilterDaemon, Worker

NAMES = ["src", "src/a", "src/sub", "src/sub/b", "x", "d", "d/e"]
OPS = ["stat", "list", "read", "write", "unlink", "mkdir", "rmdir"]
# The root itself ("") only looked at: it is a mount point (rmdir says EBUSY there).
LOOKS = ("stat", "list", "read")
STEP = st.tuples(st.sampled_from(["host", "job", "looker"]), st.sampled_from(OPS),
                 st.sampled_from(["", *NAMES])).filter(
    lambda s: (s[2] or s[1] in ("stat", "list")) and (s[0] != "looker" or s[1] in LOOKS))
STEPS = st.lists(STEP, min_size=1, max_size=40)
EIO, ENOTCONN = "errno 5", "errno 107"


def _seed(root: Path) -> None:
    (root / "src" / "sub").mkdir(parents=True)
    (root / "src" / "a").write_text("a")
    (root / "src" / "sub" / "b").write_text("b")
    (root / "d").mkdir()


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=STEPS)
def test_interleaved_host_and_job_operations(tmp_path_factory: pytest.TempPathFactory,
                                             steps: list[tuple[str, str, str]]) -> None:
    base = tmp_path_factory.mktemp("lifetimes")
    root, model = base / "root", base / "model"
    root.mkdir()
    _seed(root)
    shutil.copytree(root, model)
    upper, work = base / "upper", base / "work"
    upper.mkdir()
    work.mkdir()
    daemon = FilterDaemon(root, base)
    workers: dict[str, Worker] = {}
    try:
        daemon.start()
        workers = {name: Worker(base) for name in ("host", "job", "looker", "native")}
        daemon.register("job", "env", upper, work, workers["job"].pid)
        (base / "upper2").mkdir()
        (base / "work2").mkdir()
        daemon.register("looker", "env2", base / "upper2", base / "work2",
                        workers["looker"].pid)
        for who, op, name in steps:
            got = workers[who](op, root / name)
            assert got not in (EIO, ENOTCONN), f"{who} {op} {name!r}: {got}"
            if who != "job":
                native = workers["native"](op, model / name)
                if op == "stat":  # times and inode numbers differ between the trees
                    got, native = _kind(got), _kind(native)
                assert got == native, f"{who} {op} {name!r}: {got!r}, natively {native!r}"
        log = daemon.log_text()
        assert "Traceback" not in log and "Error" not in log, log
    finally:
        for worker in workers.values():
            worker.stop()
        daemon.stop()


def _kind(result: object) -> object:
    return result[1] if isinstance(result, list) else result


@pytest.mark.unit
def test_a_daemon_failure_during_a_job_is_named_with_its_log(tmp_path: Path) -> None:
    """The job sees a bare EIO; the user is told which daemon failed and where its log is —
    counting only what was logged since the job started."""
    log = tmp_path / "daemon.log"
    log.write_text(f"lookup(1, b'old') {FAILED_MARK}\n")
    watch = LogWatch(str(log))
    assert watch.problem("the filter daemon over /p") == []
    with log.open("a") as f:
        f.write(f"lookup(1, b'src') {FAILED_MARK}\nTraceback...\nreaddir(1) {FAILED_MARK}\n")
    (line,) = watch.problem("the filter daemon over /p")
    assert "the filter daemon over /p failed 2 request(s)" in line and str(log) in line
