"""The filter's view decisions without a mount: `FilterFileSystem` (the model the FUSE adapter
serves) driven directly over a real root and a real env upper, with the real identity placing
a real job process in the env. Which name is shared (one inode number, kept by the kernel for
long), which one diverges (a number per view, asked each time), which listings the kernel may
keep for every view, and when an env's change must first give it an inode of its own.

The mount tests (test_views.py and the rest of tests/filter) prove the adapter and what the
kernel does with these answers; these prove the answers.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from isolated_agent.engines.filter.fs import LONG, FilterFileSystem
from isolated_agent.engines.filter.identity import Identity, JobRecord, start_time
from isolated_agent.fusefs.inodes import ROOT_INODE
from isolated_agent.fusefs.model import Attributes, Caller, Changes

pytestmark = pytest.mark.unit

PRIVATE = 1 << 62  # env views number their own inodes from here (fs.py)


class RecordingKernel:
    """The notifications the model sends, kept for the test (no kernel to send them to)."""

    def __init__(self) -> None:
        self.dropped: list[tuple[int, bytes]] = []

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        self.dropped.append((parent, name))

    def invalidate_inode(self, inode: int, attributes_only: bool = True) -> None:
        pass

    def store(self, inode: int, offset: int, data: memoryview) -> None:
        pass


@dataclass
class Views:
    fs: FilterFileSystem
    kernel: RecordingKernel
    host: Caller
    env: Caller
    root: Path

    def lookup(self, who: Caller, path: str) -> Attributes:
        """Resolve `path` name by name, as the kernel does, in `who`'s view."""
        inode = ROOT_INODE
        answer = None
        for name in path.split("/"):
            answer = self.fs.lookup(inode, name.encode(), who)
            inode = answer.inode
        assert answer is not None
        return answer


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def views(tmp_path: Path) -> Iterator[Views]:
    root, upper, work = tmp_path / "root", tmp_path / "upper", tmp_path / "work"
    for name in ("same.txt", "a.txt", "d/inner.txt", "e/x.txt", "sub/old.txt"):
        _write(root / name, "host")
    work.mkdir()
    _write(upper / "a.txt", "env!")  # changed by the env
    _write(upper / "d" / "inner.txt", "env!")  # changed below a directory both views have
    _write(upper / "sub" / "new.txt", "env!")  # made by the env in a directory both have
    for directory in ("d", "sub"):  # the env's copies of directories keep the host's modes
        os.chmod(upper / directory, os.stat(root / directory).st_mode & 0o7777)
    job = subprocess.Popen(["sleep", "120"])
    identity = Identity()
    identity.register(JobRecord("job", "one", None, (job.pid, start_time(job.pid))))
    kernel = RecordingKernel()
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    fs = FilterFileSystem(root_fd, identity, kernel, keep_listings=True)
    fs.add_env("one", str(upper), str(work))
    uid, gid = os.getuid(), os.getgid()
    try:
        yield Views(fs, kernel, Caller(uid, gid, os.getpid()), Caller(uid, gid, job.pid), root)
    finally:
        fs.close()
        os.close(root_fd)
        job.kill()
        job.wait()


def _kind(answer: Attributes) -> str:
    if answer.inode == 0:
        return "missing"
    return "private" if answer.inode >= PRIVATE else "host"


def _lifetime(answer: Attributes) -> str:
    return "kept" if answer.entry_timeout == LONG else "asked"


# path: (host's answer, env's answer), each (whose inode number, how long the kernel keeps it)
DECISIONS = {
    "same.txt": (("host", "kept"), ("host", "kept")),  # the very same object in every view
    "a.txt": (("host", "asked"), ("private", "asked")),  # the env changed it
    "d": (("host", "kept"), ("host", "kept")),  # a directory in every view stays shared
    "d/inner.txt": (("host", "asked"), ("private", "asked")),
    "e/x.txt": (("host", "kept"), ("host", "kept")),
    "sub/old.txt": (("host", "kept"), ("host", "kept")),
    "missing.txt": (("missing", "kept"), ("missing", "kept")),  # missing in every view
}


@pytest.mark.parametrize("path", list(DECISIONS))
def test_which_names_are_shared_and_kept(views: Views, path: str) -> None:
    host_wants, env_wants = DECISIONS[path]
    for who, wants in ((views.host, host_wants), (views.env, env_wants)):
        answer = views.lookup(who, path)
        assert (_kind(answer), _lifetime(answer)) == wants, (who, path)
    if host_wants[0] == env_wants[0] == "host":
        assert views.lookup(views.host, path).inode == views.lookup(views.env, path).inode
        assert views.lookup(views.host, path).inode == os.lstat(views.root / path).st_ino


def test_a_name_only_the_env_has_is_not_remembered_as_missing(views: Views) -> None:
    with pytest.raises(FileNotFoundError):  # asked again each time: no negative entry
        views.lookup(views.host, "sub/new.txt")
    answer = views.lookup(views.env, "sub/new.txt")
    assert (_kind(answer), _lifetime(answer)) == ("private", "asked")


@pytest.mark.parametrize(("path", "alike"), [("e", True), ("d", False), ("sub", False),
                                              ("", False)])
def test_which_listings_the_kernel_may_keep_for_every_view(views: Views, path: str,
                                                           alike: bool) -> None:
    for who in (views.host, views.env):
        inode = views.lookup(who, path).inode if path else ROOT_INODE
        opened = views.fs.opendir(inode, who)
        assert (opened.cache_readdir, opened.keep_cache) == (alike, alike), (who, path)
        views.fs.releasedir(opened.fh)


def test_a_listing_stops_being_kept_once_the_env_changes_it(views: Views) -> None:
    e = views.lookup(views.env, "e").inode
    views.fs.create(e, b"new.txt", 0o644, os.O_WRONLY, views.env)
    for who in (views.host, views.env):
        assert not views.fs.opendir(e, who).cache_readdir


def test_listings_show_each_view_its_own(views: Views) -> None:
    for who, names in ((views.host, [b"old.txt"]), (views.env, [b"new.txt", b"old.txt"])):
        opened = views.fs.opendir(views.lookup(who, "sub").inode, who)
        listed = views.fs.listing(opened.fh)
        assert sorted(listed[2:]) == names
        assert listed[:2] == [b".", b".."]


def test_an_env_change_through_a_shared_inode_diverges_the_name_first(views: Views) -> None:
    shared = views.lookup(views.env, "same.txt").inode
    views.kernel.dropped.clear()
    with pytest.raises(OSError) as refused:
        views.fs.open(shared, os.O_WRONLY, views.env)
    assert refused.value.errno == errno.ESTALE  # the kernel retries with a fresh lookup
    assert (ROOT_INODE, b"same.txt") in views.kernel.dropped
    again = views.lookup(views.env, "same.txt")
    assert (_kind(again), _lifetime(again)) == ("private", "asked")
    views.fs.open(again.inode, os.O_WRONLY, views.env)  # now on the env's own inode
    host = views.lookup(views.host, "same.txt")
    assert (_kind(host), _lifetime(host)) == ("host", "asked")


@pytest.mark.parametrize("change", [Changes(mode=0o600), Changes(size=0), Changes(mtime_ns=0)])
def test_an_env_cannot_change_attributes_through_a_shared_inode(views: Views,
                                                                change: Changes) -> None:
    shared = views.lookup(views.env, "e/x.txt").inode
    with pytest.raises(OSError) as refused:
        views.fs.setattr(shared, change, None, views.env)
    assert refused.value.errno == errno.ESTALE
    assert (views.root / "e" / "x.txt").read_text() == "host"


def test_the_host_changes_shared_files_in_place(views: Views) -> None:
    shared = views.lookup(views.host, "same.txt").inode
    opened = views.fs.open(shared, os.O_WRONLY, views.host)
    views.fs.write(opened.fh, 0, b"HOST")
    views.fs.release(opened.fh)
    assert (views.root / "same.txt").read_text() == "HOST"


def test_a_new_env_drops_the_kernels_entries_of_every_name_its_upper_has(views: Views) -> None:
    # add_env ran in the fixture: the root's names the upper holds were dropped.
    assert {(ROOT_INODE, b"a.txt"), (ROOT_INODE, b"d"), (ROOT_INODE, b"sub")} <= set(
        views.kernel.dropped)


def test_a_process_that_cannot_be_placed_is_refused(views: Views) -> None:
    with pytest.raises(PermissionError):
        views.fs.lookup(ROOT_INODE, b"same.txt", Caller(0, 0, 0))


def test_an_ended_env_leaves_its_inodes_stale(views: Views) -> None:
    private = views.lookup(views.env, "a.txt").inode
    views.fs.remove_env("one")
    with pytest.raises(OSError) as stale:
        views.fs.getattr(private, views.host)
    assert stale.value.errno == errno.ESTALE
    answer = views.lookup(views.host, "a.txt")
    assert (_kind(answer), _lifetime(answer)) == ("host", "kept")
