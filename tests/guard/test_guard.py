"""Guard mode for real: a FUSE filter mounted over a directory; whatever deletes, replaces or
truncates a file there — rm, rm -rf, mv, a shell redirection, os.replace, a static binary's
raw unlinkat, git checkout — every old version restores byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from isolated_agent.backup.s3 import S3BlobStore
from isolated_agent.system.durable import process_alive
from tests.guard.conftest import Guards, MotoServer, agentctl_cmd, guard_mounted, upload_all

RAW_UNLINK_C = r"""
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (syscall(SYS_unlinkat, AT_FDCWD, argv[i], 0) != 0) return 1;
    return 0;
}
"""


def is_static(binary: Path) -> bool:
    """An ELF64 executable without a PT_INTERP program header needs no dynamic loader."""
    data = binary.read_bytes()
    assert data[:5] == b"\x7fELF\x02"
    offset = int.from_bytes(data[0x20:0x28], "little")
    size = int.from_bytes(data[0x36:0x38], "little")
    count = int.from_bytes(data[0x38:0x3A], "little")
    types = [int.from_bytes(data[offset + i * size: offset + i * size + 4], "little")
             for i in range(count)]
    return 3 not in types  # PT_INTERP


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sh(cwd: Path, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["sh", "-c", script], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    if check:
        assert done.returncode == 0, (script, done.stderr)
    return done


def events(home: Path) -> list[dict[str, object]]:
    done = agentctl_cmd(home, "backup", "list", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def assert_restores(home: Path, tmp: Path, lost: dict[Path, bytes]) -> None:
    """Each (path, old content) has a guard backup that restores to exactly those bytes."""
    listed = events(home)
    tmp.mkdir(exist_ok=True)
    for number, (path, data) in enumerate(sorted(lost.items())):
        # Uploaded backups carry their sha256; staged ones not yet (None): try those too.
        matching = [e for e in listed if e["path"] == str(path)
                    and e["sha256"] in (sha(data), None) and e["kind"] == "file"]
        assert matching, f"no backup of {path}"
        restored = []
        for each in matching:
            out = tmp / f"restored-{number}-{each['id']}"
            out.mkdir()
            done = agentctl_cmd(home, "backup", "restore", str(each["id"]), "--to", str(out))
            assert done.returncode == 0, done.stderr
            restored.append((out / path.name).read_bytes())
        assert data in restored, f"no backup of {path} restores its old content"


def tree_files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()
            and ".isolated-agent-guard" not in p.parts}


@pytest.fixture
def guarded(tmp_path: Path, guards: Guards) -> Path:
    directory = tmp_path / "project"
    (directory / "src" / "pkg").mkdir(parents=True)
    (directory / "README.md").write_text("# demo\n")
    (directory / "src" / "main.py").write_text("print('hello')\n")
    (directory / "src" / "pkg" / "mod.py").write_bytes(os.urandom(200_000))
    (directory / "src" / "pkg" / "empty").write_bytes(b"")
    (directory / "src" / "link").symlink_to("main.py")
    (directory / "notes.txt").write_text("notes\n" * 100)
    guards.start(directory)
    assert guard_mounted(directory)
    return directory


def test_rm_mv_truncate_and_os_replace(guarded: Path, tmp_path: Path, guards: Guards) -> None:
    home = guards.home
    before = tree_files(guarded)
    (guarded / "b.txt").write_text("the b that mv replaces\n")
    (guarded / "victim").write_text("os.replace replaces me\n")
    sh(guarded, "rm README.md && echo a-content > a.txt && mv a.txt b.txt && : > notes.txt")
    sh(guarded, f"{sys.executable} -c \"import os; open('new', 'w').write('n');"
                " os.replace('new', 'victim')\"")
    assert not (guarded / "README.md").exists()
    assert (guarded / "b.txt").read_text() == "a-content\n"
    assert (guarded / "notes.txt").read_bytes() == b""
    # Before the daemon runs, the staged copies already restore (read from the staging dir
    # through the guard's own fd: the path is hidden by the mount).
    readme = guarded / "README.md"
    assert_restores(home, tmp_path / "early", {readme: before[readme]})
    upload_all(home)
    assert_restores(home, tmp_path, {
        guarded / "README.md": before[guarded / "README.md"],
        guarded / "b.txt": b"the b that mv replaces\n",
        guarded / "notes.txt": before[guarded / "notes.txt"],
        guarded / "victim": b"os.replace replaces me\n",
    })
    verified = agentctl_cmd(home, "backup", "verify", "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"], verified.stderr
    shown = json.loads(agentctl_cmd(home, "backup", "show", "1", "--json").stdout)
    assert (shown["reason"], shown["cause"], shown["state"]) == ("guard", "unlink", "purged")
    causes = {(Path(str(e["path"])).name, e["cause"]) for e in events(home)}
    assert {("README.md", "unlink"), ("b.txt", "rename"), ("notes.txt", "truncate"),
            ("victim", "rename")} <= causes
    assert all(e["state"] == "purged" for e in events(home) if e["kind"] == "file")


def test_rm_rf_tree_restores_whole(guarded: Path, tmp_path: Path, guards: Guards) -> None:
    home = guards.home
    os.link(guarded / "src" / "main.py", guarded / "main-hardlink.py")  # survives the rm -rf
    (guarded / "src" / "deep" / "er").mkdir(parents=True)
    (guarded / "src" / "deep" / "er" / "bin").write_bytes(bytes(range(256)) * 4000)
    os.chmod(guarded / "src" / "deep" / "er" / "bin", 0o751)
    (guarded / "src" / "\udcff-not-utf8").write_bytes(b"odd name")
    before = tree_files(guarded / "src")
    sh(guarded, "rm -rf src")
    assert not (guarded / "src").exists()
    assert (guarded / "main-hardlink.py").read_text() == "print('hello')\n"
    upload_all(home)
    out = tmp_path / "out"
    out.mkdir()
    done = agentctl_cmd(home, "backup", "restore", str(guarded / "src"), "--to", str(out))
    assert done.returncode == 0, done.stderr
    restored = tree_files(out / "src")
    assert {p.relative_to(out): d for p, d in restored.items()} == {
        p.relative_to(guarded): d for p, d in before.items()}
    assert stat.S_IMODE((out / "src" / "deep" / "er" / "bin").stat().st_mode) == 0o751
    assert os.readlink(out / "src" / "link") == "main.py"
    # And in place, the whole tree comes back where it was.
    done = agentctl_cmd(home, "backup", "restore", str(guarded / "src"))
    assert done.returncode == 0, done.stderr
    assert tree_files(guarded / "src") == before


def test_static_binaries_and_raw_unlinkat(guarded: Path, tmp_path: Path, guards: Guards) -> None:
    """No libc wrapper to intercept here: a FUSE filter sees the kernel's requests."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox (a static build: Debian's busybox-static) is needed for this test"
    source = tmp_path / "rawunlink.c"
    source.write_text(RAW_UNLINK_C)
    binary = tmp_path / "rawunlink"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(source)], check=True)
    assert is_static(binary)
    assert is_static(Path(busybox)), "busybox must be the static build (busybox-static)"
    before = tree_files(guarded)
    sh(guarded, f"{binary} src/main.py README.md")
    sh(guarded, f"{busybox} rm notes.txt && {busybox} rm -r src/pkg")
    assert not (guarded / "src" / "main.py").exists() and not (guarded / "src" / "pkg").exists()
    upload_all(home := guards.home)
    assert_restores(home, tmp_path, {p: before[p] for p in [
        guarded / "src" / "main.py", guarded / "README.md", guarded / "notes.txt",
        guarded / "src" / "pkg" / "mod.py", guarded / "src" / "pkg" / "empty"]})


def test_git_checkout_of_another_branch(tmp_path: Path, guards: Guards) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(tmp_path)}

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)

    git("init", "-q", "-b", "main")
    (repo / "keep.txt").write_text("same on both\n")
    (repo / "changed.py").write_text("VERSION = 'main'\n" * 50)
    (repo / "gone.txt").write_text("only on main\n")
    (repo / "dir").mkdir()
    (repo / "dir" / "data.bin").write_bytes(os.urandom(50_000))
    git("add", "-A")
    git("commit", "-q", "-m", "main")
    git("checkout", "-q", "-b", "other")
    (repo / "changed.py").write_text("VERSION = 'other'\n")
    (repo / "gone.txt").unlink()
    (repo / "dir" / "data.bin").write_bytes(b"replaced")
    (repo / "added.txt").write_text("only on other\n")
    git("add", "-A")
    git("commit", "-q", "-m", "other")
    git("checkout", "-q", "main")
    before = tree_files(repo)
    guards.start(repo)
    git("checkout", "-q", "other")  # through the guard
    assert (repo / "changed.py").read_text() == "VERSION = 'other'\n"
    assert not (repo / "gone.txt").exists()
    git("status", "--porcelain")
    upload_all(guards.home)
    assert_restores(guards.home, tmp_path, {p: before[p] for p in [
        repo / "changed.py", repo / "gone.txt", repo / "dir" / "data.bin"]})


def test_hidden_staging_dir_and_pass_through(guarded: Path, guards: Guards) -> None:
    listing = sh(guarded, "ls -a").stdout.split()
    assert ".isolated-agent-guard" not in listing and "." in listing and ".." in listing
    for script in ("ls .isolated-agent-guard", "touch .isolated-agent-guard",
                   "mkdir .isolated-agent-guard", "mv README.md .isolated-agent-guard",
                   "rm -rf .isolated-agent-guard/items"):
        sh(guarded, script, check=False)
    assert os.path.isdir(guarded / "src")  # through the mount
    # Pass-through: writes, appends, modes, times, symlinks, hard links, xattrs, fifos.
    sh(guarded, "echo x >> notes.txt && chmod 600 notes.txt && touch -d 2001-01-01 notes.txt "
                "&& ln -s notes.txt sl && ln notes.txt hl && mkfifo ff && mkdir -p a/b/c "
                "&& setfattr -n user.k -v v notes.txt && cd a/b/c && cd ../../.. && ls -la a")
    st = os.stat(guarded / "notes.txt")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_nlink == 2
    assert sh(guarded, "getfattr --only-values -n user.k notes.txt").stdout == "v"
    guards.stop(guarded)
    # The staging dir is on the host all along, and nothing was staged by those operations.
    assert (guarded / ".isolated-agent-guard").is_dir()
    assert (guarded / "notes.txt").read_text().endswith("x\n")
    assert os.listdir(guarded / ".isolated-agent-guard" / "items") == []
    # ... and git, beneath the mount, leaves it alone.
    sh(guarded, "git init -q . && git add -A")
    assert ".isolated-agent-guard" not in sh(guarded, "git status --porcelain").stdout


def test_status_stop_restart_and_recovery_of_a_dead_guard(guarded: Path, guards: Guards) -> None:
    home = guards.home
    status = json.loads(agentctl_cmd(home, "guard", "status", "--json").stdout)
    [row] = status["guards"]
    assert row["state"] == "guarded" and row["dir"] == str(guarded)
    again = agentctl_cmd(home, "guard", "start", str(guarded), "--no-backupd")
    assert again.returncode == 1 and "guarded already" in again.stderr
    inner = agentctl_cmd(home, "guard", "start", str(guarded / "src"), "--no-backupd")
    assert inner.returncode == 1 and "inside or over" in inner.stderr
    pid = guards.pid(guarded)
    assert pid is not None
    os.kill(pid, 9)  # the guard dies: DIR answers ENOTCONN, nothing can be deleted
    done = sh(guarded.parent, f"rm {guarded}/README.md", check=False)
    assert done.returncode != 0
    [row] = json.loads(agentctl_cmd(home, "guard", "status", "--json").stdout)["guards"]
    assert row["state"] == "dead"
    restarted = agentctl_cmd(home, "guard", "start", str(guarded), "--no-backupd")
    assert restarted.returncode == 0 and "replaced the dead guard" in restarted.stderr
    sh(guarded, "rm README.md")
    guards.stop(guarded)
    assert not (guarded / "README.md").exists()
    [row] = json.loads(agentctl_cmd(home, "guard", "status", "--json").stdout)["guards"]
    assert row["state"] == "stopped" and row["counts"] == {"staged": 1}
    stopped = agentctl_cmd(home, "guard", "stop", str(guarded))
    assert stopped.returncode == 1 and "not guarded now" in stopped.stderr


def test_refuses_the_store_and_slash(tmp_path: Path, guards: Guards) -> None:
    home = guards.home
    home.mkdir(parents=True)
    for directory, message in [("/", "cannot guard /"), (str(tmp_path), "overlaps the store"),
                               (str(home / "x"), "not a directory")]:
        done = agentctl_cmd(home, "guard", "start", directory, "--no-backupd")
        assert done.returncode != 0 and message in done.stderr, done.stderr


def test_o_rdonly_o_trunc_is_a_truncation_too(guarded: Path, guards: Guards,
                                              tmp_path: Path) -> None:
    before = (guarded / "notes.txt").read_bytes()
    fd = os.open(guarded / "notes.txt", os.O_RDONLY | os.O_TRUNC)
    os.close(fd)
    assert (guarded / "notes.txt").read_bytes() == b""
    assert_restores(guards.home, tmp_path / "out", {guarded / "notes.txt": before})


def test_guarded_deletes_go_to_an_s3_bucket(guarded: Path, guards: Guards, tmp_path: Path,
                                            moto_server: MotoServer) -> None:
    """The whole path against a real S3-compatible server: rm under the guard, backupd
    uploads to the bucket, restore reads it back from there."""
    config = moto_server.config()
    store = S3BlobStore(config, str(tmp_path / "spool"))
    store.ensure_bucket()
    env = moto_server.environment(config)
    before = tree_files(guarded)
    sh(guarded, "rm -r src README.md")
    upload_all(guards.home, env=env)
    expected = {sha(d) for p, d in before.items() if p.name != "notes.txt"} | {sha(b"main.py")}
    assert set(store.list()) == expected  # the files, and the symlink's target
    out = tmp_path / "out"
    out.mkdir()
    done = agentctl_cmd(guards.home, "backup", "restore", str(guarded / "src"), "--to",
                        str(out), env=env)
    assert done.returncode == 0, done.stderr
    assert {p.relative_to(out): d for p, d in tree_files(out).items()} == {
        p.relative_to(guarded): d for p, d in before.items() if "src" in p.parts}
    verified = agentctl_cmd(guards.home, "backup", "verify", "--json", env=env)
    assert verified.returncode == 0 and json.loads(verified.stdout)["checked"] == len(expected)


def test_guard_start_brings_backupd_which_uploads_on_its_own(tmp_path: Path,
                                                             guards: Guards) -> None:
    home = guards.home
    directory = tmp_path / "auto"
    directory.mkdir()
    (directory / "a").write_bytes(b"first version")
    done = agentctl_cmd(home, "guard", "start", str(directory))
    guards.started.add(str(directory))
    assert done.returncode == 0, done.stderr
    assert "backupd pid" in done.stderr
    sh(directory, "echo second version > a")  # O_TRUNC: the first version is staged
    from tests.guard.conftest import wait_for

    def uploaded() -> bool:
        return any(e["state"] == "purged" for e in events(home))

    wait_for(uploaded, timeout=30, what="backupd to upload without being asked")
    status = json.loads(agentctl_cmd(home, "guard", "status", "--json").stdout)
    assert status["backupd"]["running"] and status["guards"][0]["counts"] == {"purged": 1}
    assert_restores(home, tmp_path / "out", {directory / "a": b"first version"})


def test_backupd_started_on_demand_leaves_when_it_has_nothing_to_do(
    tmp_path: Path, guards: Guards
) -> None:
    """Not while a guard runs or an item waits; once the guards stopped and every item is
    uploaded, it exits (a run of the test batteries once left nine behind)."""
    from tests.guard.conftest import wait_for

    home, env = guards.home, {"ISOLATED_AGENT_BACKUPD_IDLE": "0.3"}
    directory = tmp_path / "idle"
    directory.mkdir()
    (directory / "a").write_bytes(b"first version")
    done = agentctl_cmd(home, "guard", "start", "--json", str(directory), env=env)
    guards.started.add(str(directory))
    assert done.returncode == 0, done.stderr
    backupd = int(json.loads(done.stdout)["backupd"])
    sh(directory, "echo second version > a")
    time.sleep(1.5)  # five idle periods: a running guard keeps it
    assert process_alive(backupd)
    guards.stop(directory)
    wait_for(lambda: not process_alive(backupd), timeout=30, what="backupd to exit when idle")
    assert [e["state"] for e in events(home) if e["kind"] == "file"] == ["purged"]


def test_backupd_leaves_when_its_store_is_removed(tmp_path: Path) -> None:
    from tests.guard.conftest import wait_for

    home = tmp_path / "home"
    home.mkdir()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "isolated_agent", "backupd", "--exit-when-idle", "600",
         "--rescan", "0.1"], env={**os.environ, "ISOLATED_AGENT_HOME": str(home)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (home / "run" / "backupd.sock").exists(), what="backupd to serve")
        shutil.rmtree(home)
        daemon.wait(timeout=20)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_the_same_name_deleted_again_and_again_keeps_every_version(
    guarded: Path, guards: Guards, tmp_path: Path
) -> None:
    """The seed staged by original name, so a second delete of the same path overwrote the
    first one's backup. Here each staged item has a name of its own, never reused."""
    sh(guarded, "for i in $(seq 1 25); do echo version $i > f; rm f; done; "
                "for i in $(seq 1 5); do echo other $i > g; echo x > h; mv h g; done")
    upload_all(guards.home)
    versions = {f"version {i}\n".encode() for i in range(1, 26)}
    listed = [e for e in events(guards.home) if e["path"] == str(guarded / "f")]
    assert {e["sha256"] for e in listed} == {sha(v) for v in versions}
    assert len({e["staged_name"] for e in listed}) == 25
    assert_restores(guards.home, tmp_path / "g", {guarded / "g": b"other 5\n"})


def test_daemons_started_from_inside_dir_hold_nothing_there(tmp_path: Path,
                                                            guards: Guards) -> None:
    """`guard start` run from a shell cd'ed into DIR: backupd (started on demand) and the
    guard daemon work from /, so neither reaches DIR below the mount nor keeps anything busy."""
    home = guards.home
    directory = tmp_path / "cwd-inside"
    (directory / "sub").mkdir(parents=True)
    done = agentctl_cmd(home, "guard", "start", str(directory), "--json",
                        cwd=directory / "sub")
    guards.started.add(str(directory))
    assert done.returncode == 0, done.stderr
    started = json.loads(done.stdout)
    for pid in (started["backupd"], started["pid"]):
        assert os.readlink(f"/proc/{pid}/cwd") == "/", pid
        assert os.getsid(pid) == pid, pid  # a session of its own
    stopped = agentctl_cmd(home, "guard", "stop", str(directory), cwd=directory / "sub")
    assert stopped.returncode == 0, stopped.stderr
    assert not guard_mounted(directory)
