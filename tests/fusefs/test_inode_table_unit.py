"""The one inode table (fusefs/inodes.py) without a mount: its invariants for any kind of
object, then for the two kinds the file systems bind — an overlay's nodes (agentfs, the
filter's views) and the guard's host files. The mount tests prove the kernel side."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from isolated_agent.fusefs.inodes import (
    ROOT_INODE,
    InodeNumbers,
    InodeTable,
    OverlayInodeTable,
    RangeInodeTable,
)
from isolated_agent.guard.inodes import HostInodeTable
from isolated_agent.overlay.layers import Layers
from isolated_agent.overlay.merge import Overlay

pytestmark = pytest.mark.unit

SPARE = 1 << 63


@dataclass(eq=False)
class Thing:
    name: str
    number: int = 0


class RecordingTable(InodeTable[Thing]):
    """A kind of object whose binding is only written down."""

    def __init__(self) -> None:
        super().__init__(Thing("root"), InodeNumbers())
        self.events: list[tuple[str, str, int]] = []

    def _bound(self, obj: Thing) -> None:
        self.events.append(("bound", obj.name, obj.number))

    def _unbound(self, obj: Thing) -> None:
        self.events.append(("unbound", obj.name, obj.number))


def test_the_root_is_one_and_never_counted_or_forgotten() -> None:
    table = RecordingTable()
    root = table.get(ROOT_INODE)
    assert root.number == ROOT_INODE
    assert table.entry(root) == ROOT_INODE
    assert table.lookup_count(ROOT_INODE) == 0
    assert table.forget(ROOT_INODE, 5) is False
    table.unused(root)
    assert table.get(ROOT_INODE) is root and table.events == []


def test_a_stable_number_is_used_unless_another_object_holds_it() -> None:
    table = RecordingTable()
    a, b, c = Thing("a"), Thing("b"), Thing("c")
    assert table.bind(a, 100) == 100
    assert table.bind(a, 555) == 100  # bound already: its number, nothing new bound
    assert table.bind(b, 100) == SPARE  # taken: a spare one
    assert table.bind(c, None) == SPARE + 1  # none fits: a spare one
    assert table.bind(Thing("d"), ROOT_INODE) == SPARE + 2
    assert table.events == [("bound", "a", 100), ("bound", "b", SPARE),
                            ("bound", "c", SPARE + 1), ("bound", "d", SPARE + 2)]


@pytest.mark.parametrize(("entries", "forgets", "bound_after"), [
    (1, [1], False),
    (3, [1, 1], True),
    (3, [2, 1], False),
    (2, [2], False),
])
def test_lookup_counts_bind_until_the_kernel_gives_them_all_back(
    entries: int, forgets: list[int], bound_after: bool
) -> None:
    table = RecordingTable()
    thing = Thing("t")
    number = table.bind(thing, 7)
    for _ in range(entries):
        assert table.entry(thing) == number
    answers = [table.forget(number, count) for count in forgets]
    assert answers[:-1] == [False] * (len(answers) - 1)
    assert answers[-1] is not bound_after
    assert (number in table) is bound_after
    assert thing.number == (number if bound_after else 0)
    assert table.events.count(("unbound", "t", number)) == (0 if bound_after else 1)
    if not bound_after:
        with pytest.raises(OSError) as raised:
            table.get(number)
        assert raised.value.errno == errno.ESTALE


def test_an_object_the_kernel_never_took_is_unbound_by_unused() -> None:
    table = RecordingTable()
    taken, dropped = Thing("taken"), Thing("dropped")
    table.bind(taken, 8)
    table.entry(taken)
    table.bind(dropped, 9)
    table.unused(taken)  # the kernel holds it: stays
    table.unused(dropped)
    assert 8 in table and 9 not in table and dropped.number == 0
    assert table.events[-1] == ("unbound", "dropped", 9)


def test_a_forgotten_object_gets_its_stable_number_again() -> None:
    table = RecordingTable()
    thing = Thing("t")
    table.bind(thing, 42)
    table.entry(thing)
    table.forget(42, 1)
    assert table.bind(thing, 42) == 42


def test_broken_bookkeeping_asserts() -> None:
    table = RecordingTable()
    thing = Thing("t")
    with pytest.raises(AssertionError):
        table.entry(thing)  # never bound
    number = table.bind(thing, 11)
    table.entry(thing)
    with pytest.raises(AssertionError):
        table.forget(number, 2)
    with pytest.raises(AssertionError):
        table.forget(12345, 1)  # a number the kernel was never given


def _overlay(tmp_path: Path) -> Overlay:
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "f").write_text("f")
    (lower / "d").mkdir()
    return Overlay(Layers.open(str(upper), str(work), [str(lower)]))


def test_an_overlay_node_holds_a_reference_while_bound_and_keeps_its_number(
    tmp_path: Path,
) -> None:
    overlay = _overlay(tmp_path)
    table = OverlayInodeTable(overlay)
    node = overlay.lookup(overlay.root, b"f")
    number = table.number(node)
    table.entry(node)
    assert node.refs == 1 and table.get(number) is node
    lower_ino = os.stat(tmp_path / "lower" / "f").st_ino
    assert number & ((1 << 48) - 1) == lower_ino  # derived from where it was first seen
    assert table.forget(number, 1) is True
    assert node.number == 0 and node.refs == 0
    again = overlay.lookup(overlay.root, b"f")
    assert table.number(again) == number  # a new node, the same file: the same number


def test_an_env_views_numbers_stay_in_its_range(tmp_path: Path) -> None:
    overlay = _overlay(tmp_path)
    base = 5 << 40
    table = RangeInodeTable(overlay, base)
    numbers = [table.number(overlay.lookup(overlay.root, name)) for name in (b"f", b"d")]
    assert all(base <= n < base + (1 << 40) for n in numbers)
    assert len(set(numbers)) == 2


class RecordingWatcher:
    def __init__(self) -> None:
        self.watched: set[int] = set()

    def watch(self, number: int, proc_path: str) -> None:
        self.watched.add(number)

    def unwatch(self, number: int) -> None:
        self.watched.discard(number)


def test_a_guard_inode_is_the_host_file_itself(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "a").write_text("a")
    os.link(tmp_path / "a", tmp_path / "d" / "b")
    root_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    watcher = RecordingWatcher()
    table = HostInodeTable(root_fd, os.fsencode(tmp_path), watcher)  # type: ignore[arg-type]
    try:
        root = table.get(ROOT_INODE)
        directory, _ = table.lookup(root, b"d")
        table.entry(directory)
        a, st = table.lookup(root, b"a")
        table.entry(a)
        b, _ = table.lookup(directory, b"b")
        assert b is a  # two names, one file: one inode
        table.entry(b)
        assert a.number == st.st_ino  # DIR's own files show their own st_ino
        assert watcher.watched == {ROOT_INODE, directory.number}
        assert table.path(a) == os.fsencode(tmp_path / "d" / "b")  # its latest name
        fd = a.fd
        assert table.forget(a.number, 1) is False
        assert table.forget(st.st_ino, 1) is True
        with pytest.raises(OSError) as raised:
            os.fstat(fd)
        assert raised.value.errno == errno.EBADF  # the host file is let go
        table.forget(directory.number, 1)
        assert watcher.watched == {ROOT_INODE}
    finally:
        table.close()
        os.close(root_fd)
