"""The staging journal and reconcile, without a mount: the records a crash leaves between the
steps of staging.py's write ordering, and what reconcile makes of them. The crash tests of the
real daemon (test_guard_failures.py) kill it at each step; these check each leftover exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from isolated_agent.backup.staging import StagedRecord, StagingDir, reconcile
from isolated_agent.guard.stage import Stager
from tests.guard.conftest import Staged

pytestmark = pytest.mark.unit


@pytest.fixture
def staged(tmp_path: Path) -> Iterator[Staged]:
    directory = tmp_path / "dir"
    directory.mkdir()
    staged = Staged(tmp_path / "home", directory)
    try:
        yield staged
    finally:
        staged.close()


def begin_staging(staged: Staged, name: str, content: bytes) -> tuple[str, StagedRecord]:
    """The first step of staging the file `name` (its record in the journal), as the guard
    does before it moves the file: (the item's name, the record)."""
    path = staged.directory / name
    path.write_bytes(content)
    item = StagingDir.new_name()
    record = StagedRecord.of(os.fsencode(path), "unlink", os.lstat(path), "file")
    staged.staging.record(item, record, sync=False)
    return item, record


def kept(staged: Staged) -> list[tuple[str, str, str, bytes]]:
    """(path relative to the directory, cause, state, staged bytes) of every row."""
    catalog = staged.backups.catalog
    rows = []
    for item in catalog.items(guard_id=staged.guard.id):
        event = catalog.get(item.event_id)
        assert event is not None and item.staged_name is not None
        with os.fdopen(staged.staging.open_item(item.staged_name), "rb") as f:
            rows.append((os.path.relpath(os.fsdecode(event.path), staged.directory),
                         item.cause, item.state, f.read()))
    return sorted(rows)


def journal(staged: Staged) -> bytes:
    return (staged.directory / ".isolated-agent-guard" / "journal").read_bytes()


def test_a_record_whose_item_never_came_is_an_operation_that_never_happened(
        staged: Staged) -> None:
    begin_staging(staged, "victim", b"old")  # the crash: after the journal, before the move
    report = reconcile(staged.staging, staged.backups.catalog, staged.guard)
    assert (report.dropped_records, report.recorded) == (1, 0)
    assert kept(staged) == [] and journal(staged) == b""
    assert (staged.directory / "victim").read_bytes() == b"old"


def test_an_item_without_its_row_gets_it_from_the_journal(staged: Staged) -> None:
    item, _ = begin_staging(staged, "victim", b"old")
    staged.staging.move_in(staged.dir_fd, b"victim", item)  # the crash: before the row
    report = reconcile(staged.staging, staged.backups.catalog, staged.guard)
    assert (report.recorded, report.orphans, report.dropped_records) == (1, 0, 0)
    assert kept(staged) == [("victim", "unlink", "staged", b"old")]
    assert journal(staged) == b""
    # A second reconcile (the daemon's next rescan) finds nothing more to do.
    again = reconcile(staged.staging, staged.backups.catalog, staged.guard)
    assert (again.recorded, again.dropped_records) == (0, 0)


def test_every_item_a_crash_left_gets_its_row_in_one_reconcile(staged: Staged) -> None:
    for number in range(5):
        item, _ = begin_staging(staged, f"f{number}", b"old %d" % number)
        staged.staging.move_in(staged.dir_fd, f"f{number}".encode(), item)
    report = reconcile(staged.staging, staged.backups.catalog, staged.guard)
    assert report.recorded == 5
    assert kept(staged) == [(f"f{n}", "unlink", "staged", b"old %d" % n) for n in range(5)]


def test_a_line_torn_by_a_crash_is_skipped_and_the_next_record_starts_clean(
        staged: Staged) -> None:
    item, _ = begin_staging(staged, "whole", b"whole")
    staged.staging.move_in(staged.dir_fd, b"whole", item)
    torn, _ = begin_staging(staged, "torn", b"torn")
    with open(staged.directory / ".isolated-agent-guard" / "journal", "r+b") as f:
        f.truncate(len(journal(staged)) - 40)  # the last record half written
    report = reconcile(staged.staging, staged.backups.catalog, staged.guard)
    assert (report.recorded, report.dropped_records) == (1, 0)
    assert kept(staged) == [("whole", "unlink", "staged", b"whole")]
    assert journal(staged) == b""  # so no record is ever written after the torn half
    staged.delete("torn")  # the guard's next start stages on an empty journal
    assert [row[0] for row in kept(staged)] == ["torn", "whole"]


def test_a_staging_dir_from_before_the_journal_is_read_and_converted(staged: Staged) -> None:
    """Records in a file of their own per item (`items/<name>.json`), as an older guard left
    them: recorded from there, then removed."""
    items = staged.directory / ".isolated-agent-guard" / "items"
    (staged.directory / "old").write_bytes(b"old bytes")
    record = StagedRecord.of(os.fsencode(staged.directory / "old"), "rename",
                             os.lstat(staged.directory / "old"), "file")
    sidecar = record.encode("unused").replace(b'"name": "unused", ', b"")
    assert b'"name"' not in sidecar  # the old format: no item name in the record
    (items / "a-1-1-aa.json").write_bytes(sidecar)
    os.rename(staged.directory / "old", items / "a-1-1-aa")
    (items / "b-1-2-bb.json").write_bytes(sidecar)  # its operation never happened
    report = reconcile(staged.staging, staged.backups.catalog, staged.guard)
    assert (report.recorded, report.orphans, report.dropped_records) == (1, 0, 1)
    assert kept(staged) == [("old", "rename", "staged", b"old bytes")]
    assert sorted(os.listdir(items)) == ["a-1-1-aa"]


def test_an_item_without_any_record_is_kept_as_an_orphan(staged: Staged) -> None:
    """Only a power loss can lose a record before its item: the bytes are still kept."""
    items = staged.directory / ".isolated-agent-guard" / "items"
    (items / "c-1-3-cc").write_bytes(b"nameless")
    report = reconcile(staged.staging, staged.backups.catalog, staged.guard)
    assert (report.recorded, report.orphans) == (1, 1)
    [(path, cause, state, content)] = kept(staged)
    assert path.endswith("items/c-1-3-cc") and (cause, content) == ("orphan", b"nameless")


def test_the_journal_is_emptied_only_when_every_record_in_it_has_its_row(
        staged: Staged) -> None:
    stager = Stager(staged.staging, staged.backups.catalog, staged.guard, staged.stager.policy,
                    defer_rows=True)
    for name in ("a", "b"):
        (staged.directory / name).write_bytes(name.encode())
        st = os.lstat(staged.directory / name)
        stager.unlink(staged.dir_fd, name.encode(), os.fsencode(staged.directory / name), st)
    assert stager.journal_mark() is None  # two rows wait for their group commit
    stager.flush_rows()
    mark = stager.journal_mark()
    assert mark == len(journal(staged)) > 0
    (staged.directory / "c").write_bytes(b"c")  # staged after the mark, its row not committed
    stager.unlink(staged.dir_fd, b"c", os.fsencode(staged.directory / "c"),
                  os.lstat(staged.directory / "c"))
    staged.staging.clear_journal(mark)
    assert len(journal(staged)) > mark  # kept: c's record is the only one it has
    stager.flush_rows()
    staged.staging.clear_journal(stager.journal_mark())
    assert journal(staged) == b""
    assert [row[0] for row in kept(staged)] == ["a", "b", "c"]
