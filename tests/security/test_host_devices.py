"""A job reaches none of the host's devices but the harmless few (confine.DEVICES).

A read-only mount does not stop reads or writes to a device node, and a root job without
capabilities still owns /dev/sda and /dev/input's keyboards. The namespaced engines show the
host's tree nodev and bind the few devices a program needs back in; under the filter, Landlock
lets the job read only those of /dev and write only where it may write.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.conftest import Hostile

# Read 3 bytes from argv[1], write one to argv[2]; print what happened to each.
PROBE = r"""
import sys
for what, path, mode in (("read", sys.argv[1], "rb"), ("write", sys.argv[2], "wb")):
    try:
        with open(path, mode, buffering=0) as f:
            f.read(3) if what == "read" else f.write(b"x")
        print(what, "done")
    except OSError as e:
        print(what, "refused", e.errno)
"""


def _node(path: Path, minor: int) -> Path:
    """A character device like /dev/zero (1, 5) or /dev/null (1, 3): harmless to reach, so
    that reaching it proves only that the job could reach any device."""
    os.mknod(path, 0o666 | 0o020000, os.makedev(1, minor))
    return path


@pytest.fixture
def in_dev() -> Iterator[tuple[Path, Path]]:
    nodes = (_node(Path(f"/dev/ia-zero-{os.getpid()}"), 5),
             _node(Path(f"/dev/ia-null-{os.getpid()}"), 3))
    try:
        yield nodes
    finally:
        for node in nodes:
            node.unlink(missing_ok=True)


def test_no_device_under_dev_but_the_harmless_ones(
    hostile: Hostile, in_dev: tuple[Path, Path]
) -> None:
    result = hostile.run("python3", "-c", PROBE, str(in_dev[0]), str(in_dev[1]))
    assert result.returncode == 0, result.stderr
    assert "done" not in result.stdout, result.stdout
    usable = hostile.run("sh", "-c", "head -c 4 /dev/urandom | wc -c && echo ok > /dev/null")
    assert usable.returncode == 0 and usable.stdout.strip() == "4", usable.stderr


def test_no_device_node_elsewhere_on_the_host(hostile: Hostile) -> None:
    hostile.outside.chmod(0o755)
    zero, null = _node(hostile.outside / "zero", 5), _node(hostile.outside / "null", 3)
    result = hostile.run("python3", "-c", PROBE, str(zero), str(null))
    assert result.returncode == 0, result.stderr
    assert "write refused" in result.stdout, result.stdout
    if hostile.engine in ("filter", "copy"):
        # Landlock reads everywhere but /dev: a node planted elsewhere (by root: mknod needs
        # CAP_MKNOD) stays readable without namespaces (README "Remaining gaps").
        assert "read done" in result.stdout
    else:
        assert "read refused" in result.stdout, result.stdout
