"""What goes around a guard (README "What the guard cannot see"), each shown on a real guard
mount: the bypass happens — the old content is not backed up — and agentctl says so.

    descriptors taken under DIR before `guard start`   -> start lists the process
    hard links outside DIR                              -> start counts the files
    a bind mount of a parent of DIR (root)              -> start and status name the other path
    `umount -l DIR` (root), with or without the daemon  -> status: "lost", and the next start:
                                                           "deletes may have gone unguarded
                                                           between T1 and T2"
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isolated_agent.system import libc
from tests.guard.conftest import Guards, agentctl_cmd, guard_mounted, wait_for

HOLDER = r"""
import os, sys
directory = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
victim = os.open(sys.argv[2], os.O_RDWR)
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "truncate":
        os.ftruncate(victim, 0)
    elif line.strip() == "unlink":
        os.unlink("doomed", dir_fd=directory)
    print("done", flush=True)
"""


def backed_up(home: Path) -> list[str]:
    done = agentctl_cmd(home, "backup", "list", "--json")
    assert done.returncode == 0, done.stderr
    return [e["path"] for e in json.loads(done.stdout)]


def status_row(home: Path, directory: Path) -> dict[str, object]:
    done = agentctl_cmd(home, "guard", "status", "--json")
    assert done.returncode == 0, done.stderr
    [row] = [r for r in json.loads(done.stdout)["guards"] if r["dir"] == str(directory)]
    return row  # type: ignore[no-any-return]


def start(home: Path, guards: Guards, directory: Path, *args: str
          ) -> subprocess.CompletedProcess[str]:
    done = agentctl_cmd(home, "guard", "start", str(directory), "--no-backupd", *args)
    guards.started.add(str(directory))
    assert done.returncode == 0, done.stderr
    return done


def guarded_file(tmp_path: Path, guards: Guards, content: bytes) -> tuple[Path, int]:
    """A guarded directory holding one file `f`, and the pid of its guard daemon."""
    directory = tmp_path / "guarded"
    directory.mkdir()
    (directory / "f").write_bytes(content)
    start(guards.home, guards, directory)
    pid = guards.pid(directory)
    assert pid is not None
    return directory, pid


def test_descriptors_opened_before_start_are_listed(tmp_path: Path, guards: Guards) -> None:
    directory = tmp_path / "guarded"
    (directory / "sub").mkdir(parents=True)
    (directory / "sub" / "doomed").write_bytes(b"deleted through an old descriptor")
    (directory / "victim").write_bytes(b"truncated through an old descriptor")
    (directory / "other").write_bytes(b"truncated through the mount")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory / "sub"), str(directory / "victim")],
        cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "ready"
        done = start(guards.home, guards, directory)
        lines = [line for line in done.stderr.splitlines() if f"pid {holder.pid} " in line]
        assert len(lines) == 1 and "2 open descriptor(s)" in lines[0], done.stderr
        assert "from before the guard" in done.stderr
        for command in ("truncate", "unlink"):  # both bypass the mount
            holder.stdin.write(command + "\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "done"
        with open(directory / "other", "r+b") as f:
            f.truncate(0)  # through the mount: staged
    finally:
        holder.kill()
        holder.wait(10)
    assert (directory / "victim").read_bytes() == b""
    assert not (directory / "sub" / "doomed").exists()
    assert backed_up(guards.home) == [str(directory / "other")]
    again = agentctl_cmd(guards.home, "guard", "stop", str(directory))
    assert again.returncode == 0, again.stderr


def test_descriptors_are_in_the_json_and_bounded_in_the_text(tmp_path: Path,
                                                             guards: Guards) -> None:
    directory = tmp_path / "guarded"
    directory.mkdir()
    (directory / "f").write_bytes(b"x")
    sleepers = [subprocess.Popen(["sleep", "60"], cwd=directory) for _ in range(13)]
    try:
        done = start(guards.home, guards, directory, "--json")
        listed = {h["pid"]: h for h in json.loads(done.stdout)["holders"]}
        for sleeper in sleepers:
            assert listed[sleeper.pid]["cwd"] is True and listed[sleeper.pid]["fds"] == 0
        guards.stop(directory)
        text = start(guards.home, guards, directory)
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait(10)
    holder_lines = [line for line in text.stderr.splitlines() if "(sleep):" in line]
    assert len(holder_lines) == 10, text.stderr
    assert "and 3 more" in text.stderr


def test_hard_links_outside_are_counted(tmp_path: Path, guards: Guards) -> None:
    directory, outside = tmp_path / "guarded", tmp_path / "outside"
    (directory / "d").mkdir(parents=True)
    outside.mkdir()
    for i in range(5):
        (directory / "d" / f"shared{i}").write_bytes(b"old content")
        os.link(directory / "d" / f"shared{i}", outside / f"link{i}")
    (directory / "inner").write_bytes(b"both links inside")
    os.link(directory / "inner", directory / "d" / "inner-link")
    done = start(guards.home, guards, directory, "--json")
    links = json.loads(done.stdout)["outside_links"]
    assert links["files"] == 5 and links["complete"] is True
    assert len(links["examples"]) == 3
    assert all(e.startswith(str(directory / "d" / "shared")) for e in links["examples"])
    (outside / "link0").write_bytes(b"")  # O_TRUNC through the other link: not seen
    assert (directory / "d" / "shared0").read_bytes() == b""
    assert backed_up(guards.home) == []
    guards.stop(directory)
    text = start(guards.home, guards, directory)
    assert "5 file(s) under" in text.stderr and "hard links outside it" in text.stderr


@pytest.fixture
def bind_view(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/parent bind-mounted at tmp_path/view, as root could."""
    (tmp_path / "parent").mkdir()
    view = tmp_path / "view"
    view.mkdir()
    libc.mount(str(tmp_path / "parent"), str(view), None, libc.MS_BIND)
    try:
        yield view
    finally:
        with contextlib.suppress(OSError):
            libc.umount(str(view), libc.MNT_DETACH)


def test_bind_mount_of_a_parent_is_named(tmp_path: Path, guards: Guards,
                                         bind_view: Path) -> None:
    directory = tmp_path / "parent" / "guarded"
    directory.mkdir()
    (directory / "f").write_bytes(b"deleted through another mount")
    done = start(guards.home, guards, directory, "--json")
    assert json.loads(done.stdout)["other_views"] == [str(bind_view / "guarded")]
    os.unlink(bind_view / "guarded" / "f")  # below the guard's mount: not seen
    assert not (directory / "f").exists() and backed_up(guards.home) == []
    assert status_row(guards.home, directory)["other_views"] == [str(bind_view / "guarded")]
    status = agentctl_cmd(guards.home, "guard", "status")
    assert f"also reachable at {bind_view / 'guarded'}" in status.stderr
    guards.stop(directory)


def lazy_unmount(directory: Path) -> None:
    subprocess.run(["umount", "-l", str(directory)], check=True, timeout=30)


def test_umount_l_under_a_live_guard_is_a_reported_gap(tmp_path: Path, guards: Guards) -> None:
    directory, pid = guarded_file(tmp_path, guards, b"deleted after umount -l")
    # A process working in the mount keeps it alive after the lazy unmount: the kernel does
    # not end the session, the guard's heartbeat must notice.
    inside = subprocess.Popen(["sleep", "60"], cwd=directory)
    try:
        time.sleep(2.5)  # one heartbeat: "seen" moves past the start
        before = time.time()
        lazy_unmount(directory)
        os.unlink(directory / "f")  # the directory below: unguarded
        deleted = time.time()
        row = status_row(guards.home, directory)
        assert row["state"] == "lost", row
        gap = row["unguarded"]
        assert isinstance(gap, dict)
        assert gap["since"] <= before and gap["until"] >= deleted
        assert before - gap["since"] < 5, gap  # the last heartbeat, not the start
        text = agentctl_cmd(guards.home, "guard", "status")
        assert "may have gone unguarded between" in text.stderr, text.stderr
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=20,
                 what="the guard daemon to notice and end")
        assert inside.poll() is None
        with pytest.raises(OSError) as raised:  # the detached mount it held: ended too
            os.stat(f"/proc/{inside.pid}/cwd")
        assert raised.value.errno == errno.ENOTCONN, raised.value
    finally:
        inside.kill()
        inside.wait(10)
    recorded = status_row(guards.home, directory)["unguarded"]
    assert isinstance(recorded, dict) and "removed while the guard daemon ran" in recorded["cause"]
    assert backed_up(guards.home) == []
    restarted = start(guards.home, guards, directory)
    assert "warning: deletes under" in restarted.stderr
    assert "may have gone unguarded between" in restarted.stderr
    row = status_row(guards.home, directory)
    assert row["state"] == "guarded" and row["unguarded"] is None
    assert len(row["gaps"]) == 1 and row["gaps"][0]["since"] == recorded["since"]  # type: ignore[index]
    guards.stop(directory)
    assert status_row(guards.home, directory)["state"] == "stopped"


def test_a_killed_guard_then_umount_l_is_a_gap_since_its_last_heartbeat(
    tmp_path: Path, guards: Guards
) -> None:
    directory, pid = guarded_file(tmp_path, guards, b"x")
    time.sleep(2.5)
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="the guard to die")
    assert status_row(guards.home, directory)["state"] == "dead"  # ENOTCONN: no gap yet
    lazy_unmount(directory)
    os.unlink(directory / "f")
    row = status_row(guards.home, directory)
    gap = row["unguarded"]
    assert row["state"] == "lost" and isinstance(gap, dict), row
    assert killed - 5 < gap["since"] <= killed and "ended without `guard stop`" in gap["cause"]
    done = start(guards.home, guards, directory, "--json")
    reported = json.loads(done.stdout)["unguarded"]
    assert reported["since"] == gap["since"] and reported["until"] >= gap["until"]
    guards.stop(directory)


def test_a_dead_guard_replaced_by_start_is_no_gap(tmp_path: Path, guards: Guards) -> None:
    """Killed but still mounted, the guard answered ENOTCONN: nothing could be deleted."""
    directory = tmp_path / "guarded"
    directory.mkdir()
    start(guards.home, guards, directory)
    pid = guards.pid(directory)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="the guard to die")
    done = start(guards.home, guards, directory, "--json")
    assert json.loads(done.stdout)["recovered"] is True
    assert json.loads(done.stdout)["unguarded"] is None
    guards.stop(directory)
    assert not guard_mounted(directory)


def test_stop_of_a_lost_guard_says_so_and_clears_it(tmp_path: Path, guards: Guards) -> None:
    directory = tmp_path / "guarded"
    directory.mkdir()
    start(guards.home, guards, directory)
    lazy_unmount(directory)
    done = agentctl_cmd(guards.home, "guard", "stop", str(directory))
    assert done.returncode == 0 and "may have gone unguarded" in done.stderr, done.stderr
    assert status_row(guards.home, directory)["state"] == "stopped"


def test_a_guard_moved_with_its_parent_keeps_guarding_and_stops(tmp_path: Path,
                                                               guards: Guards) -> None:
    """Renaming a parent of DIR moves the mount along: no gap (the files are guarded at their
    new path), status says where, and `guard stop` unmounts it there."""
    directory = tmp_path / "parent" / "guarded"
    directory.mkdir(parents=True)
    (directory / "f").write_bytes(b"deleted at the new path")
    start(guards.home, guards, directory)
    moved = tmp_path / "renamed" / "guarded"
    guards.started.add(str(moved))
    os.rename(tmp_path / "parent", tmp_path / "renamed")
    assert guard_mounted(moved)
    time.sleep(2.5)  # a heartbeat sees it moved; it must not end the session
    row = status_row(guards.home, directory)
    assert row["state"] == "moved" and row["moved_to"] == str(moved), row
    assert row["unguarded"] is None
    os.unlink(moved / "f")
    # Kept; recorded under the path the guard started with (README says so).
    assert backed_up(guards.home) == [str(directory / "f")]
    directory.mkdir(parents=True)  # a new directory at the old path
    again = agentctl_cmd(guards.home, "guard", "start", str(directory), "--no-backupd")
    assert again.returncode == 1 and "moved to" in again.stderr, again.stderr
    done = agentctl_cmd(guards.home, "guard", "stop", str(directory))
    assert done.returncode == 0 and "unguarded" not in done.stderr, done.stderr
    wait_for(lambda: not guard_mounted(moved), what="the moved mount to go")
    assert status_row(guards.home, directory)["state"] == "stopped"
