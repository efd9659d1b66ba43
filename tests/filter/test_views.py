"""Several views of one root at once: two jobs in two envs and a host process, on the same paths.

Each process sees exactly its own view — data, attributes, listings — including right after
another view looked the same name up, stat'ed it or read it, in every order: the kernel's
caches are shared by the whole mount, so a leak would show as one process answered with what
another one just caused the kernel to cache. Files of the same size and mtime in every view make
a leaked page or attribute cache visible.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from isolated_agent.overlay.format import make_whiteout_at
from tests.filter.conftest import FilterDaemon, Worker

MTIME = 1_700_000_000_000_000_000


def _file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, ns=(MTIME, MTIME))


@pytest.fixture
def three_views(tmp_path: Path) -> Iterator[tuple[Path, dict[str, Worker]]]:
    """A root served by a filter to the host, env one and env two, each with its own worker."""
    root = tmp_path / "root"
    _file(root / "same.txt", "same")
    _file(root / "a.txt", "host")
    _file(root / "b.txt", "host")
    _file(root / "d" / "inner.txt", "host")
    _file(root / "e" / "x.txt", "host")  # no env has touched e: listed alike in every view
    uppers = {}
    for env in ("one", "two"):
        upper, work = tmp_path / env / "upper", tmp_path / env / "work"
        upper.mkdir(parents=True)
        work.mkdir()
        uppers[env] = (upper, work)
    one, two = uppers["one"][0], uppers["two"][0]
    _file(one / "a.txt", "one!")  # same size as "host" minus nothing: 4 bytes each
    _file(one / "d" / "inner.txt", "one!")
    _file(one / "d" / "only-one.txt", "one!")
    make_whiteout_at(os.open(two, os.O_PATH), b"b.txt")
    _file(two / "a.txt", "two!")
    daemon = FilterDaemon(root, tmp_path)
    workers: dict[str, Worker] = {}
    try:
        daemon.start()
        workers = {name: Worker(tmp_path) for name in ("host", "one", "two")}
        for env in ("one", "two"):
            upper, work = uppers[env]
            daemon.register(f"job-{env}", env, upper, work, workers[env].pid)
        yield root, workers
    finally:
        for worker in workers.values():
            worker.stop()
        daemon.stop()


# The four-byte contents each view must show.
EXPECTED = {
    "same.txt": {"host": "same", "one": "same", "two": "same"},
    "a.txt": {"host": "host", "one": "one!", "two": "two!"},
    "b.txt": {"host": "host", "one": "host", "two": "errno 2"},
    "d/inner.txt": {"host": "host", "one": "one!", "two": "host"},
    "d/only-one.txt": {"host": "errno 2", "one": "one!", "two": "errno 2"},
}
LISTINGS = {
    "": {"host": ["a.txt", "b.txt", "d", "e", "same.txt"],
         "one": ["a.txt", "b.txt", "d", "e", "same.txt"], "two": ["a.txt", "d", "e", "same.txt"]},
    "d": {"host": ["inner.txt"], "one": ["inner.txt", "only-one.txt"], "two": ["inner.txt"]},
}


@pytest.mark.parametrize("order", list(itertools.permutations(("host", "one", "two"))))
def test_each_process_sees_its_own_view_in_every_order(
    three_views: tuple[Path, dict[str, Worker]], order: tuple[str, ...]
) -> None:
    root, workers = three_views
    for name, views in EXPECTED.items():
        for op in ("stat", "read", "stat"):
            for who in order:
                got = workers[who](op, root / name)
                want = views[who]
                if op == "read":
                    assert got == want, f"{who} read {name}: {got!r}, expected {want!r}"
                elif want.startswith("errno"):
                    assert got == want, f"{who} stat {name}: {got!r}"
                else:
                    assert isinstance(got, list) and got[0] == 4 and got[2] == MTIME, (who, got)
    for directory, views in LISTINGS.items():
        for who in order:
            assert workers[who]("list", root / directory) == views[who], (who, directory)


def test_a_change_in_one_env_reaches_no_other_view(
    three_views: tuple[Path, dict[str, Worker]]
) -> None:
    root, workers = three_views
    for who in ("host", "one", "two"):  # everyone has the shared file in the kernel's caches
        assert workers[who]("read", root / "same.txt") == "same"
    assert workers["one"]("write", root / "same.txt") == "ok"  # copy-up through a shared inode
    assert workers["host"]("read", root / "same.txt") == "same"
    assert workers["two"]("read", root / "same.txt") == "same"
    assert workers["one"]("read", root / "same.txt") == "written"
    assert workers["two"]("unlink", root / "same.txt") == "ok"
    assert workers["host"]("read", root / "same.txt") == "same"
    assert workers["one"]("read", root / "same.txt") == "written"
    assert workers["two"]("read", root / "same.txt") == "errno 2"
    assert workers["two"]("list", root) == ["a.txt", "d", "e"]
    assert workers["host"]("list", root) == ["a.txt", "b.txt", "d", "e", "same.txt"]


def test_host_changes_show_in_envs_that_did_not_change_the_name(
    three_views: tuple[Path, dict[str, Worker]]
) -> None:
    root, workers = three_views
    for who in ("host", "one", "two"):
        workers[who]("read", root / "b.txt")
    assert workers["host"]("write", root / "b.txt") == "ok"
    assert workers["one"]("read", root / "b.txt") == "written"  # the lower changed under it
    assert workers["two"]("read", root / "b.txt") == "errno 2"  # env two deleted it
    assert (root / "b.txt").read_text() == "written"  # the test process is a host process


def test_a_listing_kept_for_every_view_ends_with_the_first_change(
    three_views: tuple[Path, dict[str, Worker]]
) -> None:
    """A directory that every view lists alike is listed once for all (the kernel keeps the
    listing: FOPEN_CACHE_DIR). A change to it by any view ends that: from then on each view
    lists its own, in every order."""
    root, workers = three_views
    e = root / "e"
    for _ in range(2):  # the second round is answered from the listing the kernel kept
        for who in ("host", "one", "two"):
            assert workers[who]("list", e) == ["x.txt"], who
    assert workers["one"]("write", e / "new.txt") == "ok"
    expected = {"host": ["x.txt"], "one": ["new.txt", "x.txt"], "two": ["x.txt"]}
    for order in itertools.permutations(("host", "one", "two")):
        for who in order:
            assert workers[who]("list", e) == expected[who], (order, who)
    assert workers["two"]("unlink", e / "x.txt") == "ok"
    assert workers["host"]("write", e / "h.txt") == "ok"
    expected = {"host": ["h.txt", "x.txt"], "one": ["h.txt", "new.txt", "x.txt"],
                "two": ["h.txt"]}
    for order in itertools.permutations(("host", "one", "two")):
        for who in order:
            assert workers[who]("list", e) == expected[who], (order, who)


def test_a_host_change_to_a_kept_listing_reaches_every_view(
    three_views: tuple[Path, dict[str, Worker]]
) -> None:
    root, workers = three_views
    e = root / "e"
    for who in ("host", "one", "two"):
        assert workers[who]("list", e) == ["x.txt"]
    assert workers["host"]("mkdir", e / "sub") == "ok"
    assert workers["host"]("unlink", e / "x.txt") == "ok"
    for who in ("two", "one", "host"):
        assert workers[who]("list", e) == ["sub"], who
