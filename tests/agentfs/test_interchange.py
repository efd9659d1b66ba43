"""One on-disk format (DESIGN §3): an upper layer written by agentfs is served identically by
the kernel's overlayfs, and one written by the kernel identically by agentfs."""

from __future__ import annotations

import os
from pathlib import Path

from tests.agentfs.conftest import Agentfs, force_unmount, merged_view, mount_kernel_overlay


def _populate(lower: Path) -> None:
    (lower / "src" / "pkg").mkdir(parents=True)
    (lower / "docs").mkdir()
    (lower / "README").write_text("readme\n")
    (lower / "src" / "main.py").write_text("main\n")
    (lower / "src" / "pkg" / "mod.py").write_text("mod\n" * 50)
    (lower / "docs" / "a.txt").write_text("a")
    (lower / "docs" / "b.txt").write_text("b")
    os.symlink("README", lower / "link")
    os.setxattr(lower / "README", "user.origin", b"lower")


def _workload(m: Path) -> None:
    with open(m / "README", "a") as f:
        f.write("appended\n")
    (m / "new").mkdir()
    (m / "new" / "file").write_text("new file")
    os.unlink(m / "docs" / "a.txt")
    os.unlink(m / "docs" / "b.txt")
    os.rmdir(m / "docs")
    (m / "docs").mkdir()  # over a whiteout: opaque
    (m / "docs" / "c.txt").write_text("c")
    os.unlink(m / "src" / "main.py")
    (m / "src" / "main.py").write_text("recreated")
    os.rename(m / "src" / "pkg" / "mod.py", m / "src" / "mod2.py")
    os.chmod(m / "src", 0o750)
    os.unlink(m / "link")
    os.symlink("new/file", m / "link")
    os.link(m / "README", m / "README.hard")
    os.setxattr(m / "new" / "file", "user.tag", b"v")
    os.mkfifo(m / "fifo")


def test_agentfs_upper_is_served_identically_by_the_kernel(fs: Agentfs, tmp_path: Path) -> None:
    _populate(fs.lower)
    mnt = fs.mount()
    _workload(mnt)
    seen_by_agentfs = merged_view(mnt)
    fs.unmount()
    kernel_mnt = tmp_path / "kernel"
    kernel_mnt.mkdir()
    mount_kernel_overlay(fs.lowers, fs.upper, fs.work, kernel_mnt)
    try:
        assert merged_view(kernel_mnt) == seen_by_agentfs
    finally:
        force_unmount(kernel_mnt)


def test_kernel_upper_is_served_identically_by_agentfs(fs: Agentfs, tmp_path: Path) -> None:
    _populate(fs.lower)
    kernel_mnt = tmp_path / "kernel"
    kernel_mnt.mkdir()
    mount_kernel_overlay(fs.lowers, fs.upper, fs.work, kernel_mnt)
    try:
        _workload(kernel_mnt)
        seen_by_kernel = merged_view(kernel_mnt)
    finally:
        force_unmount(kernel_mnt)
    mnt = fs.mount()
    assert merged_view(mnt) == seen_by_kernel
