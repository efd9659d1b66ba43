"""The guard's caches (guard/fs.py's cache contract): the kernel keeps entries,
attributes, listings and data of a guarded tree, and must still never show what is gone — a
staged file at its old name — nor miss what changed behind the mount."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from isolated_agent.fusefs.replies import handle_free_supported
from isolated_agent.guard.behind import Watcher
from tests.guard.conftest import Guards


def cache_everything(root: Path) -> None:
    """List, stat and read the whole tree through the mount, twice: all of it is cached."""
    for _ in range(2):
        for path in root.rglob("*"):
            path.lstat()
            if path.is_file() and not path.is_symlink():
                path.read_bytes()


def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not seen through the mount: {what}"
        time.sleep(0.02)


def test_the_guard_caches_what_it_serves() -> None:
    """The fast policy is the one in use here (the pyfuse3 of packaging/pyfuse3)."""
    assert handle_free_supported()


def test_a_staged_file_never_shows_at_its_old_name(tmp_path: Path, guards: Guards) -> None:
    directory = tmp_path / "project"
    (directory / "sub").mkdir(parents=True)
    for name, text in (("gone", "gone\n"), ("over", "replaced\n"), ("mover", "mover\n"),
                       ("cut", "cut me\n" * 100), ("sub/deep", "deep\n")):
        (directory / name).write_text(text)
    guards.start(directory)
    cache_everything(directory)
    subprocess.run(["sh", "-c", "rm gone sub/deep && mv mover over && : > cut"],
                   cwd=directory, check=True)
    for name in ("gone", "mover", "sub/deep"):
        assert not (directory / name).exists(), name
        assert name.split("/")[-1] not in os.listdir(directory / os.path.dirname(name) or ".")
    assert (directory / "over").read_text() == "mover\n"
    assert (directory / "cut").read_bytes() == b""
    assert (directory / "cut").stat().st_size == 0
    assert sorted(os.listdir(directory)) == ["cut", "over", "sub"]


def test_changes_behind_the_mount_are_seen_through_it(tmp_path: Path, guards: Guards) -> None:
    """A process that was inside DIR before the guard started changes files beneath the
    mount; the kernel's cached view of the mount follows within moments."""
    directory = tmp_path / "project"
    (directory / "sub").mkdir(parents=True)
    (directory / "grows").write_text("one\n")
    (directory / "same-size").write_text("aaaa\n")
    (directory / "removed").write_text("x\n")
    (directory / "sub" / "mode").write_text("m\n")
    inside = os.open(directory, os.O_PATH | os.O_DIRECTORY)  # taken before the mount
    try:
        guards.start(directory)
        cache_everything(directory)
        assert not (directory / "new").exists()  # a negative entry, cached too
        beneath = Path(f"/proc/self/fd/{inside}")
        (beneath / "new").write_text("new\n")
        (beneath / "sub" / "new-deep").write_text("deep\n")
        with open(beneath / "grows", "a") as f:
            f.write("two\n")
        (beneath / "same-size").write_text("bbbb\n")
        os.utime(beneath / "same-size", ns=(2_000_000_000_000_000_000,) * 2)
        (beneath / "removed").unlink()
        (beneath / "sub" / "mode").chmod(0o600)
        (beneath / "made").mkdir()
    finally:
        os.close(inside)

    eventually(lambda: "new" in os.listdir(directory), "a new file in the listing")
    eventually(lambda: (directory / "new").exists(), "a new file where a lookup had failed")
    assert (directory / "new").read_text() == "new\n"
    eventually(lambda: "new-deep" in os.listdir(directory / "sub"), "a new file in a subdir")
    eventually(lambda: (directory / "grows").read_text() == "one\ntwo\n", "appended data")
    eventually(lambda: (directory / "same-size").read_text() == "bbbb\n",
               "same-size rewrite with a new mtime")
    eventually(lambda: not (directory / "removed").exists(), "a removed file")
    eventually(lambda: stat.S_IMODE((directory / "sub" / "mode").stat().st_mode) == 0o600,
               "a mode")
    eventually(lambda: (directory / "made").is_dir(), "a new directory")


@pytest.mark.unit
def test_the_watcher_tells_the_daemons_own_changes_from_others(tmp_path: Path) -> None:
    """What the daemon did for a request is settled as its own (the kernel knows already);
    anything else is a change behind the mount, to be forgotten by the kernel."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "kept").write_text("k\n")
    watcher = Watcher()
    try:
        directory = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
        sub = os.open(tmp_path / "sub", os.O_PATH | os.O_DIRECTORY)
        watcher.watch(1, f"/proc/self/fd/{directory}")
        watcher.watch(7, f"/proc/self/fd/{sub}")
        (tmp_path / "ours").write_text("o\n")  # a create, a write
        os.rename(tmp_path / "ours", tmp_path / "sub" / "moved")
        os.chmod(tmp_path / "sub", 0o700)
        watcher.settle([(1, b"ours"), (7, b"moved"), (1, b"sub"), (7, b"")])
        assert watcher.take() == []
        (tmp_path / "kept").write_text("changed\n")
        (tmp_path / "sub" / "theirs").write_text("t\n")
        watcher.settle([(1, b"unrelated")])  # a request of ours meanwhile keeps them
        (tmp_path / "sub" / "moved").unlink()
        changes = {(c.directory, c.name, c.namespace) for c in watcher.take()}
        assert changes == {(1, b"kept", False), (7, b"theirs", True), (7, b"theirs", False),
                           (7, b"moved", True)}
        watcher.unwatch(7)
        (tmp_path / "sub" / "after").write_text("a\n")
        assert watcher.take() == []
    finally:
        watcher.close()
        os.close(directory)
        os.close(sub)


def test_the_daemon_counts_its_requests_for_the_benchmarks(tmp_path: Path,
                                                           guards: Guards) -> None:
    """`$AGENTFS_REQUESTS` (fusefs/accounting.py): the totals at each SIGUSR2 and at the end —
    what benchmarks/guard_tree_bench.py --requests reports as requests per pass."""
    directory = tmp_path / "project"
    directory.mkdir()
    for number in range(5):
        (directory / f"f{number}").write_text("x\n")
    counts = tmp_path / "requests.json"
    pid = guards.start(directory, env={"AGENTFS_REQUESTS": str(counts)})

    def totals() -> dict[str, list[float]]:
        old = counts.stat().st_ino if counts.exists() else None
        os.kill(pid, signal.SIGUSR2)
        eventually(lambda: counts.exists() and counts.stat().st_ino != old, "the counts")
        return json.loads(counts.read_text())  # type: ignore[no-any-return]

    cache_everything(directory)
    before = totals()
    for number in range(3):
        os.unlink(directory / f"f{number}")
    after = totals()
    assert after["unlink"][0] - before.get("unlink", [0])[0] == 3
    assert after["unlink"][1] > before.get("unlink", [0, 0.0])[1]
    guards.stop(directory)
    assert json.loads(counts.read_text())["unlink"][0] == 3  # written again at the end
