"""The rootless path: agentctl run as an unprivileged user, through a user namespace.

The user and the way it runs agentctl are tests/conftest.py's rootless fixtures.
"""

from __future__ import annotations

import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DISK_SCRATCH_PREFIX, SYSTEM_PYTHON, RunAs, snapshot
from tests.core.test_run import MANIFEST, WORKLOAD

pytestmark = pytest.mark.rootless

def test_rootless_run_keeps_host_untouched(
    run_as_user: RunAs, user_project: Path, user_dir: Path
) -> None:
    reference = user_dir / "reference"
    shutil.copytree(user_project, reference, symlinks=True)
    subprocess.run(["sh", "-c", WORKLOAD], cwd=reference, check=True)
    before = snapshot(user_project)

    done = run_as_user("run", "--env", "u", "--", "sh", "-c", WORKLOAD, cwd=user_project)
    assert done.returncode == 0, done.stderr
    assert snapshot(user_project) == before

    seen = run_as_user("run", "-q", "--env", "u", "--", SYSTEM_PYTHON, "-c", MANIFEST,
                       cwd=user_project)
    assert seen.returncode == 0, seen.stderr
    expected = subprocess.run([SYSTEM_PYTHON, "-c", MANIFEST], cwd=reference,
                              capture_output=True, text=True, check=True)
    assert seen.stdout == expected.stdout


def test_rootless_job_is_the_user_without_capabilities(
    run_as_user: RunAs, user_project: Path, unprivileged_user: pwd.struct_passwd
) -> None:
    script = (
        "id -u; grep CapEff /proc/self/status; "
        "echo x > /etc/ia-rootless 2>/dev/null || echo etc-refused; "
        "echo x > $HOME/.profile 2>/dev/null || echo home-refused; "
        "umount -l . 2>/dev/null || echo umount-refused; exit 5"
    )
    done = run_as_user("run", "-q", "--", "sh", "-c", script, cwd=user_project)
    assert done.returncode == 5, done.stderr
    assert done.stdout.split("\n") == [
        str(unprivileged_user.pw_uid),
        "CapEff:\t0000000000000000",
        "etc-refused",
        "home-refused",
        "umount-refused",
        "",
    ]


# Run argv (sys.argv[1:]) in a user namespace with the identity mapping whose own limit of
# further user namespaces is 0 (user.max_user_namespaces counts per user namespace).
LIMIT_USER_NAMESPACES = (
    "import os, sys\n"
    "from isolated_agent.system import libc\n"
    "r, w = os.pipe(); go_r, go_w = os.pipe()\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    libc.unshare(libc.CLONE_NEWUSER); os.write(w, b'1'); os.read(go_r, 1)\n"
    "    open('/proc/sys/user/max_user_namespaces', 'w').write('0')\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "os.read(r, 1)\n"
    "for name in ('uid_map', 'gid_map'):\n"
    "    open(f'/proc/{pid}/{name}', 'w').write('0 0 4294967295')\n"
    "os.write(go_w, b'1')\n"
    "sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
)


def without_user_namespaces(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run argv where no further user namespace can be created, as on hosts that disable them.

    user.max_user_namespaces is counted per user namespace: we make one with the identity
    mapping (so every user stays who it is), set its limit to 0 inside it, and run argv there.
    """
    return subprocess.run([sys.executable, "-c", LIMIT_USER_NAMESPACES, *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_rootless_without_user_namespaces_refuses_to_run(
    run_as_user: RunAs, user_project: Path
) -> None:
    # --engine kernel: `auto` would fall back to the filter or copy engine (their tests).
    done = run_as_user("run", "--engine", "kernel", "--", "touch", "ran", cwd=user_project,
                       wrap=without_user_namespaces)
    assert done.returncode == 125, done.stderr
    assert "isolation failed at creating namespaces" in done.stderr
    assert "enable user namespaces" in done.stderr
    assert not (user_project / "ran").exists()


def test_rootless_run_ignores_mounts_it_cannot_reach(
    run_as_user: RunAs, user_project: Path, disk_dir_root_only: Path
) -> None:
    """A mount behind a directory the user may not enter (another user's FUSE mount, say)
    cannot be remounted read-only by the user; the job cannot reach it either, so it must not
    stop the run."""
    hidden = disk_dir_root_only / "mnt"
    hidden.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(hidden)], check=True)
    try:
        done = run_as_user("run", "-q", "--", "sh", "-c", f"ls {hidden} || echo unreachable",
                           cwd=user_project)
    finally:
        subprocess.run(["umount", str(hidden)], check=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "unreachable\n"


@pytest.fixture
def disk_dir_root_only() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=DISK_SCRATCH_PREFIX + "rootonly-"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_rootless_filter_engine(
    run_as_user: RunAs, user_project: Path, user_dir: Path, fuse_open_to_users: None
) -> None:
    """No namespaces, no capabilities to drop: an unprivileged user's job through the filter
    (fusermount3 mounts it; only that user may enter it, as without user_allow_other)."""
    before = snapshot(user_project)
    outside = user_dir / "outside"
    script = (
        "cat README.md; echo changed > README.md; cat README.md; "
        "grep CapEff /proc/self/status; "
        f"echo x > {outside} 2>/dev/null || echo outside-refused; "
        "fusermount3 -u . 2>/dev/null || echo unmount-refused"
    )
    try:
        done = run_as_user("run", "-q", "--engine", "filter", "--", "sh", "-c", script,
                           cwd=user_project)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split("\n") == [
            "# demo", "changed", "CapEff:\t0000000000000000", "outside-refused",
            "unmount-refused", "",
        ]
        stopped = run_as_user("filter", "stop", str(user_project), cwd=user_dir)
        assert stopped.returncode == 0, stopped.stderr
    finally:
        subprocess.run(["umount", "-l", str(user_project)], capture_output=True)
    assert not outside.exists()
    assert snapshot(user_project) == before
