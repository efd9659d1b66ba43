"""The guard's staging decisions without a mount: `GuardFileSystem` (the model the FUSE
adapter serves) driven directly on a real directory, with the guard's own Stager, staging dir
and catalog. Each row: what is in the directory, one request, and exactly which entries were
kept before it destroyed anything — with which cause and state, and their old bytes. The mount
tests (test_guard.py) prove the adapter and the kernel side; these prove the decisions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from isolated_agent.fusefs.model import Caller, Changes
from isolated_agent.guard.fs import GuardFileSystem
from isolated_agent.guard.inodes import ROOT
from isolated_agent.system import libc
from tests.guard.conftest import Staged

pytestmark = pytest.mark.unit


class RecordingKernel:
    """The notifications the model sends, kept for the test (no kernel to send them to)."""

    def __init__(self) -> None:
        self.sent: list[tuple[object, ...]] = []

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        self.sent.append(("entry", parent, name))

    def invalidate_inode(self, inode: int, attributes_only: bool = True) -> None:
        self.sent.append(("inode", inode))

    def store(self, inode: int, offset: int, data: memoryview) -> None:
        self.sent.append(("store", inode))


@dataclass
class Guarded:
    fs: GuardFileSystem
    staged: Staged
    directory: Path
    caller: Caller

    def inode(self, name: str) -> int:
        return self.fs.lookup(ROOT, name.encode(), self.caller).inode

    def kept(self) -> list[tuple[str, str, str, str, bytes | None]]:
        """(path, cause, kind, state, old content) of every item the guard recorded."""
        catalog = self.staged.backups.catalog
        found = []
        for item in catalog.items(guard_id=self.staged.guard.id):
            event = catalog.get(item.event_id)
            assert event is not None
            content = None
            if item.staged_name is not None and event.kind == "file":
                fd = self.staged.staging.open_item(item.staged_name)
                with os.fdopen(fd, "rb") as f:
                    content = f.read()
            path = os.path.relpath(os.fsdecode(event.path), self.directory)
            found.append((path, item.cause, event.kind, item.state, content))
        return sorted(found)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Guarded]:
    directory = tmp_path / "dir"
    (directory / "d").mkdir(parents=True)
    (directory / "empty").mkdir()
    (directory / "a").write_bytes(b"old a")
    (directory / "b").write_bytes(b"old b")
    (directory / "d" / "c").write_bytes(b"old c")
    os.link(directory / "b", directory / "b2")
    os.symlink("a", directory / "s")
    staged = Staged(tmp_path / "home", directory)
    root_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fs = GuardFileSystem(root_fd, os.fsencode(directory), staged.stager, RecordingKernel(),
                         handle_free=True)
    try:
        yield Guarded(fs, staged, directory, Caller(os.getuid(), os.getgid(), os.getpid()))
    finally:
        fs.close()
        staged.close()


Request = Callable[[Guarded], object]
RULES: list[tuple[str, Request, list[tuple[str, str, str, str, bytes | None]]]] = [
    ("unlink keeps the file",
     lambda g: g.fs.unlink(ROOT, b"a", g.caller),
     [("a", "unlink", "file", "staged", b"old a")]),
    ("unlink of one of two links keeps a copy",
     lambda g: g.fs.unlink(ROOT, b"b", g.caller),
     [("b", "unlink", "file", "staged", b"old b")]),
    ("unlink of a symlink keeps the link",
     lambda g: g.fs.unlink(ROOT, b"s", g.caller),
     [("s", "unlink", "symlink", "staged", None)]),
    ("rename over a file keeps the replaced one",
     lambda g: g.fs.rename(ROOT, b"a", ROOT, b"b", 0, g.caller),
     [("b", "rename", "file", "staged", b"old b")]),
    ("rename onto a new name keeps nothing",
     lambda g: g.fs.rename(ROOT, b"a", ROOT, b"new", libc.RENAME_NOREPLACE, g.caller),
     []),
    ("exchange keeps a copy of each side",
     lambda g: g.fs.rename(ROOT, b"a", ROOT, b"b", libc.RENAME_EXCHANGE, g.caller),
     [("a", "exchange", "file", "staged", b"old a"),
      ("b", "exchange", "file", "staged", b"old b")]),
    ("truncation to zero (an O_TRUNC open, handle-free) keeps the old bytes",
     lambda g: g.fs.setattr(g.inode("a"), Changes(size=0), None, g.caller),
     [("a", "truncate", "file", "staged", b"old a")]),
    ("a shrinking truncate keeps the old bytes",
     lambda g: g.fs.setattr(g.inode("a"), Changes(size=2), None, g.caller),
     [("a", "truncate", "file", "staged", b"old a")]),
    ("a growing truncate keeps nothing",
     lambda g: g.fs.setattr(g.inode("a"), Changes(size=100), None, g.caller),
     []),
    ("chmod and utimes keep nothing",
     lambda g: g.fs.setattr(g.inode("a"), Changes(mode=0o600, mtime_ns=0), None, g.caller),
     []),
    ("a write into the file keeps nothing",
     lambda g: g.fs.write(g.inode("a"), 0, b"new"),
     []),
    ("rmdir records the directory",
     lambda g: g.fs.rmdir(ROOT, b"empty", g.caller),
     [("empty", "rmdir", "dir", "recorded", None)]),
    ("rename over an empty directory records it",
     lambda g: g.fs.rename(ROOT, b"d", ROOT, b"empty", 0, g.caller),
     [("empty", "rename", "dir", "recorded", None)]),
]


@pytest.mark.parametrize(("request_", "expected"), [rule[1:] for rule in RULES],
                         ids=[rule[0] for rule in RULES])
def test_what_is_kept_before_a_request_destroys(
        guarded: Guarded, request_: Request,
        expected: list[tuple[str, str, str, str, bytes | None]]) -> None:
    request_(guarded)
    guarded.staged.stager.flush_rows()
    assert guarded.kept() == expected


def test_a_request_that_fails_keeps_nothing(guarded: Guarded) -> None:
    with pytest.raises(FileNotFoundError):
        guarded.fs.unlink(ROOT, b"missing", guarded.caller)
    with pytest.raises(OSError):
        guarded.fs.rmdir(ROOT, b"d", guarded.caller)  # not empty
    assert guarded.kept() == []


def test_the_staging_dir_is_out_of_reach(guarded: Guarded) -> None:
    name = b".isolated-agent-guard"
    assert guarded.fs.lookup(ROOT, name, guarded.caller).inode == 0  # a negative entry
    with pytest.raises(FileNotFoundError):
        guarded.fs.unlink(ROOT, name, guarded.caller)
    with pytest.raises(PermissionError):
        guarded.fs.mkdir(ROOT, name, 0o755, guarded.caller)
    with pytest.raises(PermissionError):
        guarded.fs.rename(ROOT, b"a", ROOT, name, 0, guarded.caller)
    listing = guarded.fs.listing(ROOT)  # handle-free: a listing is named by its inode
    assert name not in listing and b"a" in listing
    assert guarded.kept() == []


def test_a_missing_name_is_remembered_as_missing(guarded: Guarded) -> None:
    """Handle-free, a lookup of a missing name answers a negative entry the kernel keeps
    (git asks for a .gitignore in every directory, every time)."""
    answer = guarded.fs.lookup(ROOT, b"nothing-here", guarded.caller)
    assert answer.inode == 0 and answer.entry_timeout > 0
