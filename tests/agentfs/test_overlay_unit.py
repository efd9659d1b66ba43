"""The overlay rules without any mount: `isolated_agent.overlay` driven directly.

These check what a mount cannot show easily: node lifetimes (nothing leaks, nothing is used
after release), identity, and that materializing a directory never changes the merged view.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from isolated_agent.overlay.format import is_opaque_dir, is_whiteout
from isolated_agent.overlay.layers import LayerError, Layers
from isolated_agent.overlay.merge import Overlay
from isolated_agent.overlay.node import Node
from isolated_agent.overlay.rename import rename


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "d" / "sub").mkdir(parents=True)
    (lower / "d" / "a").write_text("a")
    (lower / "d" / "sub" / "b").write_text("b")
    (lower / "f").write_text("f")
    yield lower, upper


def _open(tmp_path: Path) -> Overlay:
    return Overlay(Layers.open(str(tmp_path / "upper"), str(tmp_path / "work"),
                               [str(tmp_path / "lower")]))


def _view(ov: Overlay, node: Node, prefix: bytes = b"") -> dict[bytes, bytes | None]:
    result: dict[bytes, bytes | None] = {}
    for name in ov.listdir(node):
        child = ov.held_lookup(node, name)
        try:
            if child.is_dir:
                result[prefix + name] = None
                result.update(_view(ov, child, prefix + name + b"/"))
            else:
                fd = ov.open(child, os.O_RDONLY)
                try:
                    result[prefix + name] = os.read(fd, 1 << 16)
                finally:
                    os.close(fd)
        finally:
            ov.unref(child)
    return result


def test_nodes_are_released_when_their_last_reference_goes(
    layers: tuple[Path, Path], tmp_path: Path
) -> None:
    ov = _open(tmp_path)
    _view(ov, ov.root)
    assert list(ov.index.values()) == [ov.root], "a node outlived every reference to it"
    d = ov.held_lookup(ov.root, b"d")
    sub = ov.held_lookup(d, b"sub")
    ov.unref(d)
    assert not d.released, "a child's link must keep its parent alive"
    ov.unref(sub)
    assert d.released and sub.released
    ov.close()


def test_one_object_is_one_node(layers: tuple[Path, Path], tmp_path: Path) -> None:
    lower, _ = layers
    os.link(lower / "f", lower / "f-link")
    ov = _open(tmp_path)
    first = ov.held_lookup(ov.root, b"f")
    second = ov.held_lookup(ov.root, b"f-link")
    assert first is second
    assert ov.held_lookup(ov.root, b"d") is ov.held_lookup(ov.root, b"d")
    ov.close()


def test_materialize_never_changes_the_view(layers: tuple[Path, Path], tmp_path: Path) -> None:
    ov = _open(tmp_path)
    d = ov.held_lookup(ov.root, b"d")
    ov.unlink(d, b"a")
    before = _view(ov, ov.root)
    ov.materialize(d)
    assert _view(ov, ov.root) == before
    assert d.opaque and not d.lowers
    ov.unref(d)
    ov.close()


def test_rename_errors_follow_posix(layers: tuple[Path, Path], tmp_path: Path) -> None:
    ov = _open(tmp_path)
    root = ov.root
    with pytest.raises(OSError) as e:
        rename(ov, root, b"d", root, b"f")
    assert e.value.errno == errno.ENOTDIR
    with pytest.raises(OSError) as e:
        rename(ov, root, b"f", root, b"d")
    assert e.value.errno == errno.EISDIR
    ov.mkdir(root, b"empty", 0o755, None)
    with pytest.raises(OSError) as e:
        rename(ov, root, b"empty", root, b"d")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as e:
        rename(ov, root, b"missing", root, b"x")
    assert e.value.errno == errno.ENOENT
    assert list(ov.index.values()) == [root]
    ov.close()


def test_unsuitable_layers_are_refused(tmp_path: Path) -> None:
    (tmp_path / "l").mkdir()
    (tmp_path / "u").mkdir()
    with pytest.raises(LayerError, match="does not exist"):
        Layers.open(str(tmp_path / "u"), str(tmp_path / "nowork"), [str(tmp_path / "l")])
    with pytest.raises(LayerError, match="different"):
        Layers.open(str(tmp_path / "u"), str(tmp_path / "u"), [str(tmp_path / "l")])
    with pytest.raises(LayerError, match="at least one lower"):
        Layers.open(str(tmp_path / "u"), str(tmp_path / "l"), [])


# -- the overlay rules of DESIGN §5, as a table ------------------------------------------------
# Each case: operations on the merged view of the `layers` fixture's lower (d/a, d/sub/b, f),
# the merged view afterwards, and what the upper layer must hold for it (a whiteout, an
# opaque directory, a copied-up file). The lower is never touched.

Op = tuple[str, ...]
RULES: list[tuple[str, list[Op], dict[str, str | None], dict[str, str]]] = [
    ("a write copies the file up", [("write", "f", "F")],
     {"f": "F"}, {"f": "file"}),
    ("a deleted lower file leaves a whiteout", [("unlink", "f")],
     {"f": None}, {"f": "whiteout"}),
    ("a file made again over its whiteout is a plain file",
     [("unlink", "f"), ("write", "f", "new")], {"f": "new"}, {"f": "file"}),
    ("a new file in a lower dir copies the dir up, not its files",
     [("write", "d/new", "n")], {"d/new": "n", "d/a": "a"}, {"d": "dir", "d/a": "absent"}),
    ("a deleted lower dir leaves a whiteout",
     [("unlink", "d/a"), ("unlink", "d/sub/b"), ("rmdir", "d/sub"), ("rmdir", "d")],
     {"d": None}, {"d": "whiteout"}),
    ("a dir made again over its whiteout is opaque: the lower's files stay hidden",
     [("unlink", "d/a"), ("unlink", "d/sub/b"), ("rmdir", "d/sub"), ("rmdir", "d"),
      ("mkdir", "d")], {"d": "", "d/a": None, "d/sub": None}, {"d": "opaque"}),
    ("a renamed lower file is copied to its new name, a whiteout at the old",
     [("rename", "f", "g")], {"f": None, "g": "f"}, {"f": "whiteout", "g": "file"}),
    ("a file made and deleted in the env leaves nothing",
     [("write", "tmp", "t"), ("unlink", "tmp")], {"tmp": None}, {"tmp": "absent"}),
    ("a rename over a lower file replaces it",
     [("write", "new", "N"), ("rename", "new", "f")], {"f": "N", "new": None},
     {"f": "file", "new": "absent"}),
    ("a renamed lower dir keeps its files",
     [("rename", "d/sub", "moved")], {"moved/b": "b", "d/sub": None, "d/a": "a"},
     {"d/sub": "whiteout"}),
]


def _apply(ov: Overlay, op: Op) -> None:
    held: list[Node] = []

    def parent_and_name(path: str) -> tuple[Node, bytes]:
        *dirs, name = path.encode().split(b"/")
        node = ov.root
        for part in dirs:
            node = ov.held_lookup(node, part)
            held.append(node)  # referenced until the operation is done
        return node, name

    kind, path, *rest = op
    try:
        parent, name = parent_and_name(path)
        if kind == "write":
            try:
                node = ov.held_lookup(parent, name)
            except FileNotFoundError:
                node, fd = ov.create(parent, name, 0o644, os.O_WRONLY, None)
            else:
                held.append(node)
                fd = ov.open(node, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, rest[0].encode())
            finally:
                os.close(fd)
        elif kind == "unlink":
            ov.unlink(parent, name)
        elif kind == "rmdir":
            ov.rmdir(parent, name)
        elif kind == "mkdir":
            ov.mkdir(parent, name, 0o755, None)
        elif kind == "rename":
            new_parent, new_name = parent_and_name(rest[0])
            rename(ov, parent, name, new_parent, new_name)
    finally:
        for node in reversed(held):
            ov.unref(node)


def _upper_kind(path: Path) -> str:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return "absent"
    if is_whiteout(st):
        return "whiteout"
    if path.is_dir():
        return "opaque" if is_opaque_dir(path) else "dir"
    return "file"


@pytest.mark.unit
@pytest.mark.parametrize(("ops", "merged", "upper"), [case[1:] for case in RULES],
                         ids=[case[0] for case in RULES])
def test_overlay_rules(layers: tuple[Path, Path], tmp_path: Path, ops: list[Op],
                       merged: dict[str, str | None], upper: dict[str, str]) -> None:
    lower, upper_dir = layers
    before = {p: p.read_bytes() if p.is_file() else None for p in lower.rglob("*")}
    ov = _open(tmp_path)
    for op in ops:
        _apply(ov, op)
    view = _view(ov, ov.root)
    for path, content in merged.items():
        seen = view.get(path.encode(), "missing")
        expected = "missing" if content is None else (None if content == "" else
                                                      content.encode())
        assert seen == expected, (path, seen)
    for path, kind in upper.items():
        assert _upper_kind(upper_dir / path) == kind, path
    ov.close()
    # The same upper, served again, gives the same view (the format is all there is).
    again = _open(tmp_path)
    assert _view(again, again.root) == view
    again.close()
    assert {p: p.read_bytes() if p.is_file() else None for p in lower.rglob("*")} == before
