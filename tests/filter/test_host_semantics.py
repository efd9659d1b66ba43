"""While a job works through the filter, every other process sees the host as if no filter were
there: data, times, permissions, locks, mmap, inode numbers, and every namespace change lands in
the real files. Checked against the real files through a descriptor taken before the mount."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DISK_SCRATCH_PREFIX
from tests.filter.conftest import FilterDaemon

NOBODY = 65534


@pytest.fixture
def host() -> Iterator[tuple[Path, Path]]:
    """(the root as every process sees it, the real files beneath the filter)."""
    # On disk, not under pytest's 0700 tmp dirs: user nobody must reach the root.
    tmp_path = Path(tempfile.mkdtemp(prefix=DISK_SCRATCH_PREFIX + "host-"))
    tmp_path.chmod(0o755)
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "f").write_text("host\n")
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    (upper / "f").write_text("env\n")  # the env changed f: f differs between the views
    real_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    daemon = FilterDaemon(root, tmp_path)
    job = subprocess.Popen(["sleep", "600"])
    try:
        daemon.start()
        daemon.register("job", "env", upper, work, job.pid)
        yield root, Path(f"/proc/{os.getpid()}/fd/{real_fd}")
    finally:
        job.kill()
        job.wait()
        daemon.stop()
        os.close(real_fd)
        shutil.rmtree(tmp_path)


def test_data_times_and_inode_numbers_are_the_host_files(host: tuple[Path, Path]) -> None:
    root, real = host
    assert (root / "f").read_text() == "host\n"
    with open(root / "f", "a") as f:
        f.write("more\n")
    os.utime(root / "f", ns=(1_000_000_000, 2_000_000_000))
    seen, actual = os.stat(root / "f"), os.stat(real / "f")
    assert (real / "f").read_text() == "host\nmore\n"
    assert seen.st_mtime_ns == actual.st_mtime_ns == 2_000_000_000
    assert seen.st_ino == actual.st_ino and seen.st_size == actual.st_size
    (root / "d" / "new").write_text("x")
    os.rename(root / "d" / "new", root / "d" / "renamed")
    os.link(root / "d" / "renamed", root / "d" / "link")
    os.symlink("renamed", root / "d" / "sym")
    os.mkdir(root / "d" / "sub")
    os.unlink(root / "f")
    assert sorted(os.listdir(real / "d")) == ["link", "renamed", "sub", "sym"]
    assert os.stat(real / "d" / "renamed").st_nlink == 2
    assert not (real / "f").exists()


def test_permissions_are_checked_for_the_caller(host: tuple[Path, Path]) -> None:
    root, _ = host
    secret, public = root / "d" / "secret", root / "d" / "public"
    secret.write_text("s")
    public.write_text("p")
    secret.chmod(0o600)
    public.chmod(0o644)
    (root / "d").chmod(0o755)
    root.chmod(0o755)

    def read_as_nobody(path: Path) -> int:
        return subprocess.run(["cat", str(path)], user=NOBODY, group=NOBODY,
                              capture_output=True).returncode

    assert read_as_nobody(public) == 0
    assert read_as_nobody(secret) != 0


def test_locks_work_between_host_processes(host: tuple[Path, Path]) -> None:
    root, _ = host
    target = root / "d" / "locked"
    target.write_text("x")
    probe = (
        "import fcntl, sys\n"
        f"f = open({str(target)!r}, 'r+')\n"
        "try:\n"
        "    fcntl.{kind}(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n"
        "    sys.exit(3)\n"
    )
    with open(target, "r+") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        held = subprocess.run([sys.executable, "-c", probe.format(kind="lockf")])
        assert held.returncode == 3
        fcntl.lockf(f, fcntl.LOCK_UN)
        fcntl.flock(f, fcntl.LOCK_EX)
        held = subprocess.run([sys.executable, "-c", probe.format(kind="flock")])
        assert held.returncode == 3
        fcntl.flock(f, fcntl.LOCK_UN)
    free = subprocess.run([sys.executable, "-c", probe.format(kind="lockf")])
    assert free.returncode == 0


def test_shared_mmap_writes_reach_the_file(host: tuple[Path, Path]) -> None:
    root, real = host
    target = root / "d" / "mapped"
    target.write_bytes(b"\0" * 8192)
    with open(target, "r+b") as f, mmap.mmap(f.fileno(), 8192) as mapped:
        mapped[:5] = b"hello"
        mapped[4096:4101] = b"world"
        mapped.flush()
    assert (real / "d" / "mapped").read_bytes()[:5] == b"hello"
    assert target.read_bytes()[4096:4101] == b"world"


def test_the_host_never_sees_the_env(host: tuple[Path, Path]) -> None:
    root, real = host
    assert (root / "f").read_text() == "host\n"
    assert sorted(os.listdir(root)) == ["d", "f"]
    # The overlay's own xattr names stay reserved, for the host too (README: limitations).
    with pytest.raises(OSError) as refused:
        os.setxattr(root / "f", "user.overlay.opaque", b"y")
    assert refused.value.errno in (errno.EPERM, errno.ENOTSUP, errno.EACCES)
