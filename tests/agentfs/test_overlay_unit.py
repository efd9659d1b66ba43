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
