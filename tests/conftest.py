"""Fixtures shared by every test: an isolated store, a project tree, agentctl as a real
subprocess, tree snapshots, a sweep that fails any test leaving a mount behind, and agentctl
run as an unprivileged user (the rootless path).

Tests run as root on a machine with overlayfs and /dev/fuse: a missing capability is a failure,
never a skip (DESIGN §10).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The suite never reads the config file of whoever runs it (~/.config/isolated-agent): an
# empty config home of its own, which the config tests fill themselves.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="ia-test-config-")
atexit.register(shutil.rmtree, os.environ["XDG_CONFIG_HOME"], True)


# Where tests put their files: pytest's tmp_path, and scratch dirs on the disk outside /tmp
# (which every job sees as its own tmpfs) named with this prefix — one per test session (its
# pid), so that the mount sweep below judges this session's mounts only, never those of
# another session running at the same time on the machine.
DISK_SCRATCH_PREFIX = f"/var/tmp/ia-{os.getpid()}-"


def _mounts_of_this_test(tmp_path: Path) -> set[str]:
    mine = (str(tmp_path) + "/", DISK_SCRATCH_PREFIX)
    with open("/proc/self/mountinfo") as f:
        return {p for p in (line.split()[4] for line in f) if p.startswith(mine)}


@pytest.fixture(autouse=True)
def no_mount_left_behind(tmp_path: Path) -> Iterator[None]:
    """Every test must leave no mount behind; sweep and fail if it does. Only the test's own
    directories are judged: test sessions or benchmarks running at the same time on this machine
    own theirs, and must not be failed or unmounted under their feet."""
    before = _mounts_of_this_test(tmp_path)
    yield
    leaked = sorted(_mounts_of_this_test(tmp_path) - before, key=len, reverse=True)
    for mount_point in leaked:
        subprocess.run(["umount", "-l", mount_point], check=False, capture_output=True)
    assert not leaked, f"mounts left behind on the host: {leaked}"


@pytest.fixture
def store_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "store"
    monkeypatch.setenv("ISOLATED_AGENT_HOME", str(home))
    return home


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small project: files, a nested tree, a symlink, an executable."""
    root = tmp_path / "project"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "README.md").write_text("# demo\n")
    (root / "src" / "main.py").write_text("print('hello')\n")
    (root / "src" / "pkg" / "__init__.py").write_text("")
    (root / "src" / "pkg" / "mod.py").write_text("X = 1\n" * 100)
    (root / "docs" / "guide.txt").write_text("guide\n")
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("README.md")
    return root


Agentctl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def agentctl(store_home: Path) -> Agentctl:
    """Run agentctl as a real subprocess: agentctl("run", "--", "true", cwd=...)."""

    def run(
        *args: str,
        cwd: Path | str | None = None,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "ISOLATED_AGENT_HOME": str(store_home), **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "isolated_agent", *args],
            cwd=cwd,
            input=input,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


Snapshot = dict[str, tuple[object, ...]]


def snapshot(root: Path) -> Snapshot:
    """Everything a job could change about a tree: type, mode, owner, mtime, content, target."""
    result: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                detail: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                detail = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                detail = None
            result[rel] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns,
                st.st_nlink if not stat.S_ISDIR(st.st_mode) else None,
                detail,
            )
    root_st = os.stat(root)  # followed: root may be named by /proc/self/fd/N
    result["."] = (stat.S_IMODE(root_st.st_mode), root_st.st_mtime_ns)  # root entries changed?
    return result


@pytest.fixture
def snap() -> Callable[[Path], Snapshot]:
    return snapshot


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True)


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    """A scratch dir on the host disk, outside /tmp (which every job sees as its own tmpfs)."""
    path = Path(tempfile.mkdtemp(prefix=DISK_SCRATCH_PREFIX + "test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- the rootless path ---------------------------------------------------------------------------
# An unprivileged user, created here, runs Debian's /usr/bin/python3 (the test runner's
# interpreter may live where that user cannot read) with a world-readable copy of the package and
# its pure-Python dependencies on PYTHONPATH.

USER = "ia-rootless"
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="session")
def unprivileged_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
        return pwd.getpwnam(USER)


# What a rootless job imports: the package, click, and for the filter engine's daemon pyfuse3 and
# trio with trio's own dependencies.
RUNTIME_MODULES = ("isolated_agent", "click", "pyfuse3", "trio", "outcome", "sniffio",
                   "sortedcontainers", "attr", "attrs", "idna")


@pytest.fixture(scope="session")
def package_copy() -> Iterator[Path]:
    """The modules a rootless run imports, copied where any user can import them."""
    target = Path(tempfile.mkdtemp(prefix="ia-rootless-py-", dir="/var/tmp"))
    for name in RUNTIME_MODULES:
        module = importlib.import_module(name)
        assert module.__file__ is not None
        source = Path(module.__file__).parent
        shutil.copytree(source, target / source.name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(target)], check=True)
    target.chmod(0o755)
    yield target
    shutil.rmtree(target, ignore_errors=True)


@pytest.fixture
def user_dir(unprivileged_user: pwd.struct_passwd) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=DISK_SCRATCH_PREFIX + "rootless-"))
    os.chown(path, unprivileged_user.pw_uid, unprivileged_user.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_user(cwd: Path | str, *argv: str, env: dict[str, str] | None = None) -> list[str]:
    """argv as run by USER in `cwd`, with a clean environment. setpriv execs (the process is
    argv's own, to signal); the user changes to `cwd` itself: root cannot enter a FUSE mount
    of that user's (no allow_other)."""
    home = pwd.getpwnam(USER).pw_dir
    variables = {"HOME": home, "PATH": "/usr/local/bin:/usr/bin:/bin", **(env or {})}
    return ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups", "--", "env",
            "-i", "-C", str(cwd), *(f"{k}={v}" for k, v in variables.items()), *argv]


def user_agentctl(package: Path, store: Path, cwd: Path | str, *args: str,
                  env: dict[str, str] | None = None) -> list[str]:
    """`agentctl ARGS` run by USER: Debian's python, the package copy, the store given."""
    variables = {"ISOLATED_AGENT_HOME": str(store), "PYTHONPATH": str(package), **(env or {})}
    return as_user(cwd, SYSTEM_PYTHON, "-m", "isolated_agent", *args, env=variables)


RunAs = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_as_user(
    unprivileged_user: pwd.struct_passwd, package_copy: Path, user_dir: Path
) -> RunAs:
    assert os.path.exists(SYSTEM_PYTHON), "the rootless tests need Debian's python3"

    def run(
        *args: str, cwd: Path, wrap: Callable[..., subprocess.CompletedProcess[str]] | None = None
    ) -> subprocess.CompletedProcess[str]:
        argv = user_agentctl(package_copy, user_dir / "store", cwd, *args)
        if wrap is not None:
            return wrap(argv, cwd)
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    return run


@pytest.fixture
def fuse_open_to_users() -> Iterator[None]:
    """/dev/fuse as the fuse3 package's udev rule leaves it on a normal machine (0666); some
    VMs have it 0600."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


@pytest.fixture
def user_project(project: Path, user_dir: Path, unprivileged_user: pwd.struct_passwd) -> Path:
    """The shared project tree, owned by the unprivileged user (uid and gid: rootless runs map
    only those two ids, see README)."""
    target = user_dir / "project"
    shutil.copytree(project, target, symlinks=True)
    for dirpath, dirnames, filenames in os.walk(target):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, unprivileged_user.pw_uid, unprivileged_user.pw_gid)
    return target
