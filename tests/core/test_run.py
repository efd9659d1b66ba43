"""`agentctl run` with the kernel engine: the host is never written, the env keeps every change,
descendants stay inside, exit statuses propagate, and bad input never runs the command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import Agentctl, snapshot

# Every kind of change a job can make under a root (mv of a lower dir goes through EXDEV →
# copy + delete inside mv, which is what a user's tools do).
WORKLOAD = textwrap.dedent(
    """\
    set -e
    echo created > new.txt
    mkdir -p newdir/deep && echo deep > newdir/deep/f
    echo appended >> README.md
    : > src/pkg/mod.py
    chmod 600 docs/guide.txt
    chmod 700 src
    rm src/main.py
    rm -r docs
    mv run.sh renamed.sh
    mv src/pkg src/pkg2
    mv newdir newdir2
    ln -s renamed.sh newlink
    rm link && ln -s new.txt link
    ln README.md hardlink
    printf '\\000\\001\\002binary' > blob.bin
    """
)

# Jobs see a private /tmp, so they run the system interpreter, not the test runner's venv.
JOB_PYTHON = "/usr/bin/python3"

MANIFEST = textwrap.dedent(
    """\
    import hashlib, json, os, stat, sys
    out = {}
    for d, dirs, files in os.walk("."):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            detail = None
            if stat.S_ISLNK(st.st_mode):
                detail = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                detail = hashlib.sha256(open(p, "rb").read()).hexdigest()
            nlink = st.st_nlink if not stat.S_ISDIR(st.st_mode) else None
            out[p] = [kind, stat.S_IMODE(st.st_mode), nlink, detail]
    json.dump(out, sys.stdout, sort_keys=True)
    """
)


def manifest_of(path: Path) -> dict[str, list[object]]:
    done = subprocess.run([sys.executable, "-c", MANIFEST], cwd=path, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def manifest_in_env(agentctl: Agentctl, env: str, root: Path) -> dict[str, list[object]]:
    done = agentctl("run", "-q", "--env", env, "--", JOB_PYTHON, "-c", MANIFEST, cwd=root)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_host_untouched_and_next_run_sees_exactly_the_changes(
    agentctl: Agentctl, project: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference"
    shutil.copytree(project, reference, symlinks=True)
    subprocess.run(["sh", "-c", WORKLOAD], cwd=reference, check=True)
    before = snapshot(project)

    done = agentctl("run", "--env", "w", "--", "sh", "-c", WORKLOAD, cwd=project)
    assert done.returncode == 0, done.stderr
    assert "created env w" in done.stderr

    assert snapshot(project) == before
    assert manifest_in_env(agentctl, "w", project) == manifest_of(reference)
    assert snapshot(project) == before


def test_daemon_writes_land_in_env_and_die_with_the_run(
    agentctl: Agentctl, project: Path
) -> None:
    marker = f"ia-daemon-{os.getpid()}-{time.monotonic_ns()}"
    script = (
        f"(setsid bash -c 'exec -a {marker} sh -c \"sleep 0.3; echo daemon > d.txt; sleep 60\"' "
        "</dev/null >/dev/null 2>&1 &); "
        "while [ ! -s d.txt ]; do sleep 0.05; done"
    )
    done = agentctl("run", "--env", "dm", "--", "sh", "-c", script, cwd=project)
    assert done.returncode == 0, done.stderr
    assert not (project / "d.txt").exists()
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 1
    seen = agentctl("run", "-q", "--env", "dm", "--", "cat", "d.txt", cwd=project)
    assert seen.stdout == "daemon\n"


def test_keep_running_waits_for_daemons_which_still_write_in_env(
    agentctl: Agentctl, project: Path
) -> None:
    script = "(setsid sh -c 'sleep 0.5; echo late > late.txt' </dev/null >/dev/null 2>&1 &)"
    done = agentctl("run", "--env", "kr", "--keep-running", "--", "sh", "-c", script, cwd=project)
    assert done.returncode == 0, done.stderr
    assert not (project / "late.txt").exists()
    seen = agentctl("run", "-q", "--env", "kr", "--", "cat", "late.txt", cwd=project)
    assert seen.stdout == "late\n"


def test_writes_outside_roots_fail_unless_allowed(
    agentctl: Agentctl, project: Path, disk_dir: Path
) -> None:
    home = disk_dir / "home"
    (home / ".cache").mkdir(parents=True)
    (home / ".bashrc").write_text("# mine\n")
    allowed = disk_dir / "allowed"
    allowed.mkdir()
    host_tmp_file = Path("/tmp") / f"ia-host-{os.getpid()}"
    host_tmp_file.write_text("host")
    try:
        script = textwrap.dedent(
            f"""\
            echo evil >> "$HOME/.bashrc" 2>/dev/null && echo bashrc-written
            echo ok > "$HOME/.cache/c" && echo cache-written
            echo ok > {allowed}/a && echo allow-written
            echo ok > /etc/ia-test 2>/dev/null && echo etc-written
            test -e {host_tmp_file} && echo host-tmp-visible
            echo private > /tmp/private && echo tmp-written
            true
            """
        )
        done = agentctl("run", "--env", "o", "--allow", str(allowed), "--", "sh", "-c", script,
                        cwd=project, env={"HOME": str(home)})
        assert done.returncode == 0, done.stderr
        lines = done.stdout.split()
        assert lines == ["cache-written", "allow-written", "tmp-written"]
        assert (home / ".bashrc").read_text() == "# mine\n"
        assert (home / ".cache" / "c").read_text() == "ok\n"
        assert (allowed / "a").read_text() == "ok\n"
        assert not Path("/tmp/private").exists()
        assert not Path("/etc/ia-test").exists()

        no_defaults = agentctl("run", "-q", "--env", "o", "--no-default-allows", "--", "sh", "-c",
                               'echo x > "$HOME/.cache/d" || echo refused',
                               cwd=project, env={"HOME": str(home)})
        assert no_defaults.stdout.strip() == "refused"
        assert not (home / ".cache" / "d").exists()
    finally:
        host_tmp_file.unlink()


def test_exit_codes_and_signals_propagate(agentctl: Agentctl, project: Path) -> None:
    assert agentctl("run", "-q", "--", "sh", "-c", "exit 7", cwd=project).returncode == 7
    killed = agentctl("run", "-q", "--", "sh", "-c", "kill -TERM $$", cwd=project)
    assert killed.returncode == 128 + signal.SIGTERM

    missing = agentctl("run", "-q", "--", "no-such-command-xyz", cwd=project)
    assert missing.returncode == 127
    assert missing.stderr.strip() == (
        "agentctl: no-such-command-xyz: command not found inside the env"
    )
    not_exec = agentctl("run", "-q", "--", "./README.md", cwd=project)
    assert not_exec.returncode == 126
    assert "Traceback" not in not_exec.stderr


def test_sigterm_to_agentctl_reaches_the_job(
    store_home: Path, project: Path
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "isolated_agent", "run", "-q", "--", "sh", "-c",
         "trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.05; done"],
        cwd=project, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "ISOLATED_AGENT_HOME": str(store_home)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 42
        assert proc.stdout.read() == "got-term\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_of_agentctl_ends_the_whole_job(store_home: Path, project: Path) -> None:
    marker = f"ia-orphan-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "isolated_agent", "run", "-q", "--", "sh", "-c",
         f"(setsid bash -c 'exec -a {marker} sleep 60' &); echo ready; sleep 60"],
        cwd=project, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "ISOLATED_AGENT_HOME": str(store_home)},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a job process outlived its launcher"
        time.sleep(0.05)


def test_two_managed_roots(agentctl: Agentctl, project: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep\n")
    before = (snapshot(project), snapshot(other))
    script = f"echo a >> README.md && echo b > {other}/new && rm {other}/keep.txt"
    done = agentctl("run", "--env", "two", "--root", str(project), "--root", str(other),
                    "--", "sh", "-c", script, cwd=project)
    assert done.returncode == 0, done.stderr
    assert (snapshot(project), snapshot(other)) == before
    seen = agentctl("run", "-q", "--env", "two", "--", "sh", "-c",
                    f"tail -1 README.md; cat {other}/new; ls {other}", cwd=project)
    assert seen.stdout == "a\nb\nnew\n"


def test_second_run_on_a_busy_env_is_refused(
    agentctl: Agentctl, store_home: Path, project: Path
) -> None:
    first = subprocess.Popen(
        [sys.executable, "-m", "isolated_agent", "run", "-q", "--env", "busy", "--",
         "sh", "-c", "echo ready; sleep 30"],
        cwd=project, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "ISOLATED_AGENT_HOME": str(store_home)},
    )
    try:
        assert first.stdout is not None
        assert first.stdout.readline() == "ready\n"
        second = agentctl("run", "--env", "busy", "--", "touch", "x", cwd=project)
        assert second.returncode == 1
        assert "env busy is in use by another agentctl process" in second.stderr
        assert agentctl("discard", "busy").returncode == 1
        assert json.loads(agentctl("env", "show", "busy", "--json").stdout)["in_use"] is True
    finally:
        first.terminate()
        first.wait(timeout=10)
    assert agentctl("run", "-q", "--env", "busy", "--", "true", cwd=project).returncode == 0


def test_isolation_failure_refuses_to_run_the_command(
    agentctl: Agentctl, project: Path, store_home: Path, tmp_path: Path
) -> None:
    assert agentctl("env", "create", "broken", "--root", str(project)).returncode == 0
    info = json.loads(agentctl("env", "show", "broken", "--json").stdout)
    work = Path(info["roots"][0]["work"])
    work.rmdir()
    work.write_text("a file where overlayfs needs a directory")
    allowed = tmp_path / "witness"
    allowed.mkdir()
    done = agentctl("run", "--env", "broken", "--allow", str(allowed), "--",
                    "touch", str(allowed / "ran"), cwd=project)
    assert done.returncode == 125
    assert "isolation failed at overlay mount of" in done.stderr
    assert "the command was not run" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (allowed / "ran").exists()


def test_bad_run_input(agentctl: Agentctl, project: Path, tmp_path: Path) -> None:
    no_cmd = agentctl("run", cwd=project)
    assert no_cmd.returncode == 2 and "no command given" in no_cmd.stderr
    missing_root = agentctl("run", "--root", str(tmp_path / "gone"), "--", "true")
    assert missing_root.returncode == 2 and "does not exist" in missing_root.stderr
    assert agentctl("env", "create", "r1", "--root", str(project)).returncode == 0
    other = tmp_path / "elsewhere"
    other.mkdir()
    mismatch = agentctl("run", "--env", "r1", "--root", str(other), "--", "true")
    assert mismatch.returncode == 2 and "manages" in mismatch.stderr
    bad_allow = agentctl("run", "--allow", str(tmp_path / "nope"), "--", "true", cwd=project)
    assert bad_allow.returncode == 2 and "--allow" in bad_allow.stderr
    inside_root = agentctl("run", "--allow", str(project / "src"), "--", "true", cwd=project)
    assert inside_root.returncode == 2 and "inside the managed root" in inside_root.stderr


def test_root_removed_since_env_creation(agentctl: Agentctl, tmp_path: Path) -> None:
    root = tmp_path / "temporary"
    root.mkdir()
    assert agentctl("env", "create", "gone", "--root", str(root)).returncode == 0
    root.rmdir()
    done = agentctl("run", "--env", "gone", "--", "true")
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_default_env_is_reused_per_directory(agentctl: Agentctl, project: Path) -> None:
    first = agentctl("run", "--", "sh", "-c", "echo 1 > count", cwd=project)
    assert "created env project-" in first.stderr
    second = agentctl("run", "--", "cat", "count", cwd=project)
    assert second.stdout == "1\n" and "created" not in second.stderr
    agentctl("env", "create", "another", "--root", str(project))
    ambiguous = agentctl("run", "--", "true", cwd=project)
    assert ambiguous.returncode == 2 and "pick one with --env" in ambiguous.stderr


@pytest.mark.parametrize(
    ("attempt", "expect"),
    [
        ("umount -l {root}", "refused"),
        ("mount -o remount,rw /", "refused"),
        ("mount -t tmpfs none {root}", "refused"),
        ("echo x > /proc/sys/kernel/hostname", "refused"),
        ("echo x > /proc/sysrq-trigger", "refused"),
        ("echo $$ > /sys/fs/cgroup/unified/cgroup.procs", "refused"),
        ("unshare -m true", "refused"),
        ("ls /proc/1/root{root} >/dev/null && echo x > /proc/1/root{root}/escaped", "refused"),
        ("kill -9 1; sleep 0.2; echo alive", "alive"),
    ],
)
def test_escape_attempts_fail(
    agentctl: Agentctl, project: Path, store_home: Path, attempt: str, expect: str
) -> None:
    before = snapshot(project)
    command = attempt.format(root=project, store=store_home)
    done = agentctl("run", "-q", "--env", "esc", "--", "sh", "-c",
                    f"({command}) 2>/dev/null || echo refused", cwd=project)
    assert done.stdout.strip().splitlines()[-1:] == [expect], (done.stdout, done.stderr)
    assert snapshot(project) == before
    assert not (project / "escaped").exists()


def test_store_is_hidden_from_the_job(agentctl: Agentctl, project: Path, disk_dir: Path) -> None:
    store = disk_dir / "store"
    script = f"ls -A {store}; touch {store}/catalog.sqlite 2>/dev/null && echo wrote; echo end"
    done = agentctl("run", "-q", "--", "sh", "-c", script, cwd=project,
                    env={"ISOLATED_AGENT_HOME": str(store)})
    assert done.stdout == "end\n", done.stderr
    assert (store / "catalog.sqlite").stat().st_size > 0


def test_job_gets_its_own_cgroup_v2_group_which_is_removed_after(
    agentctl: Agentctl, project: Path
) -> None:
    from isolated_agent.system.cgroup import own_v2_path, v2_mount_point

    mount = v2_mount_point()
    assert mount is not None, "these machines have a cgroup v2 hierarchy"
    runner_group = own_v2_path()
    done = agentctl("run", "-q", "--", "cat", "/proc/self/cgroup", cwd=project)
    assert done.returncode == 0, done.stderr
    job_group = next(line.split(":", 2)[2] for line in done.stdout.splitlines()
                     if line.startswith("0::"))
    assert os.path.basename(job_group).startswith("isolated-agent-")
    assert own_v2_path() == runner_group  # the caller was never moved
    assert not os.path.exists(os.path.join(mount, job_group.lstrip("/")))
    v1_groups = [line for line in done.stdout.splitlines() if not line.startswith("0::")]
    assert not any("isolated-agent" in line for line in v1_groups)


def test_unwritable_store_refuses_to_run(agentctl: Agentctl, project: Path, disk_dir: Path) -> None:
    blocker = disk_dir / "not-a-dir"
    blocker.write_text("")
    done = agentctl("run", "--allow", str(disk_dir), "--", "touch", str(disk_dir / "ran"),
                    cwd=project, env={"ISOLATED_AGENT_HOME": str(blocker / "store")})
    assert done.returncode == 1
    assert done.stderr.startswith("agentctl: cannot use the store")
    assert not (disk_dir / "ran").exists()
