"""Fixtures for agentfs: real FUSE mounts served by a daemon in a subprocess.

Every mount here has its lower bind-mounted read-only first, so any write that leaks to the
lower fails loudly (EROFS) instead of passing silently; and at the end of every test the lower
must be byte-for-byte what it was at mount time. Mounts are always taken down, lazily if they
must be, and the daemon is killed if it does not exit on its own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from isolated_agent.engines.fuse.daemon import HANDLES_ENV
from isolated_agent.fusefs.replies import handle_free_supported
from isolated_agent.system import libc
from tests.conftest import Snapshot, snapshot

AT_FDCWD = -100


def is_mounted(path: Path | str) -> bool:
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def bind_read_only(path: Path) -> None:
    libc.mount(str(path), str(path), None, libc.MS_BIND)
    libc.mount(None, str(path), None, libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY)


def force_unmount(path: Path) -> None:
    for _ in range(5):
        if not is_mounted(path):
            return
        try:
            libc.umount(str(path), 0)
        except OSError as e:
            if e.errno in (errno.EBUSY, errno.ENOTCONN):
                with contextlib.suppress(OSError):
                    libc.umount(str(path), libc.MNT_DETACH)
            elif e.errno == errno.EINVAL:
                return


@pytest.fixture(autouse=True)
def no_mount_left_behind(tmp_path: Path) -> Iterator[None]:
    """Overrides the suite-wide sweep: the same check, for mounts under this test's own
    directory only (where every agentfs test mounts), so that test sessions running at the same
    time on this machine never unmount each other's filesystems."""
    def mine() -> set[str]:
        prefix = str(tmp_path) + "/"
        with open("/proc/self/mountinfo") as f:
            return {p for p in (line.split()[4] for line in f) if p.startswith(prefix)}

    before = mine()
    yield
    leaked = sorted(mine() - before, key=len, reverse=True)
    for mount_point in leaked:
        subprocess.run(["umount", "-l", mount_point], check=False, capture_output=True)
    assert not leaked, f"mounts left behind: {leaked}"


class Agentfs:
    """One overlay: lowers (top first), upper, work, a mount point, and the daemon serving it."""

    def __init__(
        self, base: Path, lower_count: int = 1, layer_root: Path | None = None,
        handles: bool = False,
    ) -> None:
        self.base = base
        self.handles = handles  # answer opens with file handles even where handle-free works
        self.lowers = [base / f"lower{i}" if i else base / "lower" for i in range(lower_count)]
        self.upper = (layer_root or base) / "upper"
        self.work = (layer_root or base) / "work"
        self.mnt = base / "mnt"
        for d in (*self.lowers, self.upper, self.work, self.mnt):
            d.mkdir(parents=True, exist_ok=True)
        self.log = base / "agentfs.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._bound: list[Path] = []
        self._lower_snapshots: dict[Path, Snapshot] = {}

    @property
    def lower(self) -> Path:
        return self.lowers[0]

    def mount(
        self, *options: str, env: dict[str, str] | None = None, fd_limit: int | None = None
    ) -> Path:
        """Bind the lowers read-only (once) and start a foreground daemon; return the mount."""
        for lower in self.lowers:
            if lower not in self._bound:
                self._lower_snapshots[lower] = snapshot(lower)
                bind_read_only(lower)
                self._bound.append(lower)
        args = [
            sys.executable, "-m", "isolated_agent.engines.fuse", "-f",
            "--lower", ":".join(str(p) for p in self.lowers),
            "--upper", str(self.upper), "--work", str(self.work),
            *(a for option in options for a in ("-o", option)),
            str(self.mnt),
        ]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=log,
                env=dict(os.environ, **({HANDLES_ENV: "1"} if self.handles else {}),
                         **(env or {})),
                preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                       (fd_limit, fd_limit)))
                if fd_limit else None,
            )
        process = self.process
        wait_for(lambda: is_mounted(self.mnt) or process.poll() is not None, what="agentfs mount")
        if process.poll() is not None:
            raise RuntimeError(f"agentfs did not mount: {self.log.read_text()}")
        return self.mnt

    def unmount(self) -> None:
        """Unmount the way a user does, and check the daemon goes away on its own."""
        subprocess.run(["umount", str(self.mnt)], check=True)
        self.wait_daemon()

    def wait_daemon(self, timeout: float = 10.0) -> int:
        assert self.process is not None
        code = self.process.wait(timeout)
        self.process = None
        return code

    def remount(self, *options: str) -> Path:
        self.unmount()
        return self.mount(*options)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def teardown(self) -> None:
        force_unmount(self.mnt)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait(5)
            self.process = None
        force_unmount(self.mnt)
        for lower in reversed(self._bound):
            force_unmount(lower)
        self._bound = []

    def check_lowers_untouched(self) -> None:
        for lower, before in self._lower_snapshots.items():
            assert snapshot(lower) == before, f"the lower {lower} changed"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture(params=["handle-free", "handles"])
def open_mode(request: pytest.FixtureRequest) -> str:
    """How agentfs answers OPEN and OPENDIR (see engines/fuse/filesystem.py): every test that
    mounts runs in both modes; handle-free needs the pyfuse3 of packaging/pyfuse3."""
    if request.param == "handle-free" and not handle_free_supported():
        pytest.skip("this pyfuse3 lacks the extensions of packaging/pyfuse3")
    return str(request.param)


@pytest.fixture
def fs(tmp_path: Path, open_mode: str) -> Iterator[Agentfs]:
    """An overlay with one lower. Populate `fs.lower`, then `fs.mount()`."""
    overlay = Agentfs(tmp_path / "ovl", handles=open_mode == "handles")
    try:
        yield overlay
    finally:
        overlay.teardown()
    overlay.check_lowers_untouched()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a small tmpfs: tmpfs("size=2m") -> its path. Unmounted at the end."""
    made: list[Path] = []

    def make(options: str) -> Path:
        path = tmp_path / f"tmpfs{len(made)}"
        path.mkdir()
        libc.mount("tmpfs", str(path), "tmpfs", 0, options)
        made.append(path)
        return path

    yield make
    for path in reversed(made):
        force_unmount(path)


@pytest.fixture
def fs_factory(tmp_path: Path, open_mode: str) -> Iterator[Callable[..., Agentfs]]:
    made: list[Agentfs] = []

    def make(name: str = "ovl", lower_count: int = 1, layer_root: Path | None = None) -> Agentfs:
        overlay = Agentfs(tmp_path / name, lower_count, layer_root, open_mode == "handles")
        made.append(overlay)
        return overlay

    try:
        yield make
    finally:
        for overlay in made:
            overlay.teardown()
    for overlay in made:
        overlay.check_lowers_untouched()


def renameat2(old: Path | str, new: Path | str, flags: int) -> None:
    libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)


def upper_tree(upper: Path) -> dict[str, str]:
    """What an upper layer holds, readable in assertions: path -> kind (+ details)."""
    result: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, upper)
            st = os.lstat(path)
            if os.path.isdir(path) and not os.path.islink(path):
                try:
                    opaque = os.getxattr(path, "user.overlay.opaque") == b"y"
                except OSError:
                    opaque = False
                result[rel] = "dir,opaque" if opaque else "dir"
            elif os.path.islink(path):
                result[rel] = f"link:{os.readlink(path)}"
            elif st.st_mode & 0o170000 == 0o020000 and st.st_rdev == 0:
                result[rel] = "whiteout"
            elif st.st_mode & 0o170000 != 0o100000:
                result[rel] = f"special:{st.st_mode & 0o170000:o}"
            else:
                with open(path, "rb") as f:
                    result[rel] = f"file:{f.read(64)!r}"
    return result


View = dict[bytes, tuple[object, ...]]


def merged_view(root: Path | str, times: bool = True) -> View:
    """Everything a program sees of a merged tree (but inode numbers, which engines choose
    freely): kind, mode, owner, link count, size, content or link target, user xattrs, times."""
    import hashlib
    import stat as st_mod

    base = os.fsencode(root)
    result: View = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in sorted([*dirnames, *filenames]):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            kind = st_mod.S_IFMT(st.st_mode)
            detail: object = None
            if st_mod.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            elif st_mod.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    detail = hashlib.sha256(f.read()).hexdigest()
            xattrs: tuple[tuple[str, bytes], ...] = ()
            if kind in (st_mod.S_IFREG, st_mod.S_IFDIR):
                xattrs = tuple(sorted((n, os.getxattr(path, n)) for n in os.listxattr(path)
                                      if n.startswith("user.")))
            result[os.path.relpath(path, base)] = (
                kind, st_mod.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                st.st_nlink, st.st_size if kind != st_mod.S_IFDIR else None, detail, xattrs,
                (st.st_mtime_ns if kind != st_mod.S_IFDIR else None) if times else None,
            )
    return result


def mount_kernel_overlay(lowers: list[Path], upper: Path, work: Path, target: Path) -> None:
    options = ",".join((
        "lowerdir=" + ":".join(str(p) for p in lowers),
        f"upperdir={upper}", f"workdir={work}", "userxattr",
    ))
    libc.mount("overlay", str(target), "overlay", 0, options)
