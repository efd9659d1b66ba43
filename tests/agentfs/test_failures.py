"""Fail closed (DESIGN §5.11): when something goes wrong inside agentfs the caller gets an
error, the daemon keeps serving, nothing half-done shows, and the lower is byte-identical (the
fixtures check that after every test). And shutdown never leaves a stale mount."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from isolated_agent.fusefs.mount import unmount
from isolated_agent.system import libc
from tests.agentfs.conftest import Agentfs, is_mounted, upper_tree, wait_for


def _work_leftovers(fs: Agentfs) -> list[str]:
    work = fs.work / "work"
    return sorted(os.listdir(work)) if work.exists() else []


def _remount_read_only(path: Path) -> bool:
    try:
        libc.mount(None, str(path), None, libc.MS_REMOUNT | libc.MS_RDONLY)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return False
        raise
    return True


def _append(path: Path) -> None:
    """Write to a file: copy-up at the open (file handles) or at the write (handle-free)."""
    with open(path, "ab") as f:
        f.write(b"!")


def _forget_and_remount_read_only(path: Path) -> bool:
    """agentfs keeps a file it wrote open until the kernel forgets the inode (handle-free) or
    releases the file (which it does after close() returned): ask the kernel to drop unused
    inodes, then try."""
    Path("/proc/sys/vm/drop_caches").write_text("2")
    return _remount_read_only(path)


def _still_serving(mnt: Path) -> None:
    (mnt / "after-the-failure").write_text("ok")
    assert (mnt / "after-the-failure").read_text() == "ok"


def test_enospc_in_the_middle_of_a_copy_up(
    tmpfs: Callable[[str], Path], fs_factory: Callable[..., Agentfs]
) -> None:
    small = tmpfs("size=2m")
    fs = fs_factory("enospc", layer_root=small)
    (fs.lower / "big").write_bytes(os.urandom(8 << 20))
    (fs.lower / "small").write_text("fits")
    mnt = fs.mount()
    with pytest.raises(OSError) as e:
        _append(mnt / "big")  # copy-up needs 8 MiB, upper has 2
    assert e.value.errno == errno.ENOSPC
    assert not (fs.upper / "big").exists()
    assert _work_leftovers(fs) == []
    assert (mnt / "big").stat().st_size == 8 << 20  # still the lower file, intact
    with open(mnt / "small", "a") as f:  # a copy-up that fits still works
        f.write("!")
    assert (mnt / "small").read_text() == "fits!"
    with pytest.raises(OSError) as e, open(mnt / "filler", "wb") as f:
        f.write(b"x" * (4 << 20))
    assert e.value.errno == errno.ENOSPC
    os.unlink(mnt / "filler")
    # The kernel sends RELEASE after close() returned; the space comes back when agentfs got it.
    wait_for(lambda: os.statvfs(small).f_bfree * os.statvfs(small).f_frsize > 1 << 20,
             what="the filler's space to come back")
    _still_serving(mnt)


def test_upper_made_unwritable(
    tmpfs: Callable[[str], Path], fs_factory: Callable[..., Agentfs]
) -> None:
    layer_fs = tmpfs("size=16m")
    fs = fs_factory("rofs", layer_root=layer_fs)
    (fs.lower / "d").mkdir()
    (fs.lower / "d" / "f").write_text("lower")
    mnt = fs.mount()
    (mnt / "before").write_text("written before")
    wait_for(lambda: _forget_and_remount_read_only(layer_fs),
             what="a read-only remount of upper")
    attempts: list[Callable[[], object]] = [
        lambda: (mnt / "new").write_text("x"),
        lambda: _append(mnt / "d" / "f"),
        lambda: os.unlink(mnt / "d" / "f"),
        lambda: os.mkdir(mnt / "d" / "sub"),
        lambda: os.rename(mnt / "d", mnt / "e"),
        lambda: os.chmod(mnt / "d" / "f", 0o600),
        lambda: os.setxattr(mnt / "d" / "f", "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS
    assert (mnt / "d" / "f").read_text() == "lower"  # reading goes on
    assert (mnt / "before").read_text() == "written before"
    libc.mount(None, str(layer_fs), None, libc.MS_REMOUNT)
    _still_serving(mnt)


def test_injected_exceptions_become_eio_and_the_daemon_goes_on(fs: Agentfs) -> None:
    (fs.lower / "copy-boom").write_text("lower content")
    mnt = fs.mount(env={"AGENTFS_FAULTS": "lookup:look-boom,copy_up:copy-boom"})
    with pytest.raises(OSError) as e:
        (mnt / "look-boom").write_text("x")
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError) as e:
        _append(mnt / "copy-boom")
    assert e.value.errno == errno.EIO
    assert (mnt / "copy-boom").read_text() == "lower content"
    assert upper_tree(fs.upper) == {}
    assert _work_leftovers(fs) == []
    _still_serving(mnt)
    assert "injected fault at copy_up" in fs.log_text()
    assert "Traceback" in fs.log_text()


# -- shutdown -------------------------------------------------------------------------------


def test_umount_ends_the_daemon(fs: Agentfs) -> None:
    mnt = fs.mount()
    (mnt / "f").write_text("x")
    fs.unmount()
    assert not is_mounted(mnt)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_unmount_cleanly(fs: Agentfs, signum: int) -> None:
    mnt = fs.mount()
    (mnt / "f").write_text("x")
    fs.signal(signum)
    assert fs.wait_daemon() == 0
    assert not is_mounted(mnt)
    assert (fs.upper / "f").read_text() == "x"


def test_sigterm_while_busy_still_leaves_no_mount(fs: Agentfs) -> None:
    (fs.lower / "f").write_text("x")
    mnt = fs.mount()
    holder = subprocess.Popen([sys.executable, "-c", "import sys,time; f=open(sys.argv[1]); "
                               "print('open', flush=True); time.sleep(60)", str(mnt / "f")],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        fs.signal(signal.SIGTERM)
        assert fs.wait_daemon() == 0
        assert not is_mounted(mnt)  # detached, though a process still holds a file in it
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_daemon_leaves_enotconn_never_the_lower(fs: Agentfs) -> None:
    (fs.lower / "secret-of-the-lower").write_text("lower")
    mnt = fs.mount()
    (mnt / "written").write_text("x")
    fs.signal(signal.SIGKILL)
    fs.wait_daemon()
    assert is_mounted(mnt)
    for probe in (lambda: os.listdir(mnt), lambda: os.stat(mnt / "secret-of-the-lower"),
                  lambda: os.open(mnt / "new", os.O_CREAT | os.O_WRONLY)):
        with pytest.raises(OSError) as e:
            probe()
        assert e.value.errno == errno.ENOTCONN
    unmount(str(mnt))  # what `agentctl umount` does: recovers the dead mount
    wait_for(lambda: not is_mounted(mnt), what="the dead mount to go")
    assert sorted(os.listdir(mnt)) == []  # the bare mount point again
    fs.mount()
    assert sorted(os.listdir(mnt)) == ["secret-of-the-lower", "written"]


def test_more_files_than_the_daemon_may_open(fs: Agentfs) -> None:
    """One fd per node the kernel holds: past its budget agentfs has the kernel forget the
    least recently used files, so a tree bigger than RLIMIT_NOFILE still works throughout."""
    for d in range(30):
        (fs.lower / f"d{d}").mkdir()
        for f in range(100):
            (fs.lower / f"d{d}" / f"f{f}").write_text(f"{d}/{f}")
    mnt = fs.mount(fd_limit=512)
    inodes = {}
    for d in range(30):
        for f in range(100):
            path = mnt / f"d{d}" / f"f{f}"
            assert path.read_text() == f"{d}/{f}"
            inodes[path] = path.stat().st_ino
    for i in range(2000):
        (mnt / "d0" / f"new{i}").write_text(str(i))
    assert len(os.listdir(mnt / "d0")) == 2100
    assert all(path.stat().st_ino == ino for path, ino in inodes.items())  # numbers are stable
    assert "Too many open files" not in fs.log_text()
