"""A job must not be able to plant a privileged program on the host through a commit.

The job chmods files setuid/setgid (or an entry in its layer carries file capabilities); a
commit run by root would make them root-owned privileged programs on the host. Commit clears
those bits by default, on every way a file reaches the host (moved out of the layer, copied,
hard-linked, a mode-only change, a host file that had the bit already) and says so; diff and
commit --dry-run warn; `commit --keep-setuid` keeps them. Setgid on a directory is ordinary
group inheritance and is kept.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Agentctl
from tests.review.conftest import Workspace
from tests.security.conftest import Hostile

CAPS = "security.capability"
# VFS_CAP_REVISION_2 with the effective flag; permitted = CAP_NET_BIND_SERVICE (bit 10).
CAP_VALUE = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)

JOB = """
    set -e
    printf '#!/bin/sh\\necho planted\\n' > planted && chmod 4755 planted
    chmod 2755 tool
    cp helper helper.new && echo edited >> helper.new && chmod 4755 helper.new
    mv helper.new helper
    printf 'x\\n' > linked && chmod 4711 linked && ln linked linked.2
    mkdir shared && chmod 2775 shared
    printf 'y\\n' > shared/inside && chmod 6755 shared/inside
    printf 'caps\\n' > capfile
    echo plain > plain.txt
"""
PRIVILEGED = ["capfile", "helper", "linked", "linked.2", "planted", "shared/inside", "tool"]


@pytest.fixture
def ws(project: Path, agentctl: Agentctl, store_home: Path, tmp_path: Path) -> Workspace:
    return Workspace(project, agentctl, store_home, tmp_path)


@pytest.fixture(params=["store-on-host-fs", "store-on-own-fs"])
def ws_placed(request: pytest.FixtureRequest, ws: Workspace) -> Iterator[Workspace]:
    """The store (and so the env's layer) on the project's filesystem, where commit moves
    files out of the layer, or on a tmpfs of its own, where it copies them."""
    if request.param == "store-on-own-fs":
        ws.store_home.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "store", str(ws.store_home)],
                       check=True)
        try:
            yield ws
        finally:
            subprocess.run(["umount", "-l", str(ws.store_home)], check=True)
    else:
        yield ws


def _prepare(ws: Workspace) -> None:
    (ws.project / "tool").write_text("#!/bin/sh\necho tool\n")
    (ws.project / "tool").chmod(0o755)
    (ws.project / "helper").write_text("#!/bin/sh\necho helper\n")
    (ws.project / "helper").chmod(0o4755)  # the project's own setuid helper
    ws.run(JOB)
    # A job cannot set file capabilities (it has no CAP_SETFCAP): plant them in its layer as a
    # layer made elsewhere could carry them.
    os.setxattr(ws.upper() / "capfile", CAPS, CAP_VALUE)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _has_caps(path: Path) -> bool:
    try:
        os.getxattr(path, CAPS, follow_symlinks=False)
    except OSError:
        return False
    return True


def test_commit_clears_setuid_setgid_and_capabilities(ws_placed: Workspace) -> None:
    ws = ws_placed
    _prepare(ws)

    diff = ws.ctl("diff")
    assert diff.returncode == 0, diff.stderr
    assert "new mode 104755" in diff.stdout or "new file mode 104755" in diff.stdout
    warned = [line for line in diff.stderr.splitlines() if "warning" in line]
    for name in PRIVILEGED:
        assert any(f" {name}:" in line for line in warned), (name, diff.stderr)
    assert not any("plain.txt" in line or " shared:" in line for line in warned), diff.stderr
    assert "(mode 104755)" in diff.stderr and "--keep-setuid" in diff.stderr

    stat_only = ws.ctl("diff", "--stat")
    assert stat_only.returncode == 0 and "planted:" in stat_only.stderr

    listed = ws.ctl("diff", "--json")
    assert listed.returncode == 0, listed.stderr
    by_path = {c["path"]: c for c in json.loads(listed.stdout)["changes"]}
    assert by_path["planted"]["privileges"] == ["setuid"]
    assert by_path["shared/inside"]["privileges"] == ["setuid", "setgid"]
    assert by_path["capfile"]["privileges"] == ["capabilities"]
    assert by_path["shared"]["privileges"] == [] and by_path["plain.txt"]["privileges"] == []

    dry = ws.ctl("commit", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert all(f"/{name}:" in dry.stderr for name in PRIVILEGED), dry.stderr
    assert _mode(ws.project / "helper") == 0o4755  # a dry run changes nothing

    done = ws.ctl("commit")
    assert done.returncode == 0, done.stderr
    for name in PRIVILEGED:
        assert any(
            line.startswith("agentctl: cleared") and line.split(" on ", 1)[1].startswith(
                str(ws.project / name) + " ")
            for line in done.stderr.splitlines()
        ), (name, done.stderr)
    assert "your file had it too" in next(
        line for line in done.stderr.splitlines() if f"{ws.project}/helper " in line)

    assert _mode(ws.project / "planted") == 0o755
    assert _mode(ws.project / "tool") == 0o755  # a mode-only change
    assert _mode(ws.project / "helper") == 0o755  # the host's own setuid file, edited
    assert (ws.project / "helper").read_text().endswith("edited\n")
    assert _mode(ws.project / "linked") == _mode(ws.project / "linked.2") == 0o711
    assert os.stat(ws.project / "linked").st_ino == os.stat(ws.project / "linked.2").st_ino
    assert _mode(ws.project / "shared") == 0o2775  # group inheritance stays
    assert _mode(ws.project / "shared" / "inside") == 0o755
    assert (ws.project / "capfile").read_text() == "caps\n"
    assert not _has_caps(ws.project / "capfile")
    assert _mode(ws.project / "plain.txt") == 0o644
    # The env shows what the host now has: nothing left to commit.
    assert ws.ctl("diff", "--name-status").stdout == ""


def test_commit_json_reports_what_it_cleared(ws: Workspace) -> None:
    _prepare(ws)
    done = ws.ctl("commit", "--json", str(ws.project / "planted"), str(ws.project / "plain.txt"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["privileges"] == [
        {"path": str(ws.project / "planted"), "privileges": ["setuid"], "cleared": True,
         "host_had": []},
    ]
    assert _mode(ws.project / "planted") == 0o755


def test_keep_setuid_keeps_them(ws_placed: Workspace) -> None:
    ws = ws_placed
    _prepare(ws)
    done = ws.ctl("commit", "--keep-setuid")
    assert done.returncode == 0, done.stderr
    assert "kept setuid on " + str(ws.project / "planted") in done.stderr
    assert _mode(ws.project / "planted") == 0o4755
    assert _mode(ws.project / "tool") == 0o2755
    assert _mode(ws.project / "helper") == 0o4755
    assert _mode(ws.project / "linked") == _mode(ws.project / "linked.2") == 0o4711
    assert _mode(ws.project / "shared" / "inside") == 0o6755
    assert os.getxattr(ws.project / "capfile", CAPS) == CAP_VALUE
    assert ws.ctl("diff", "--name-status").stdout == ""


def test_a_new_link_to_the_hosts_setuid_file_is_a_plain_copy(ws: Workspace) -> None:
    """A hard link made in the env to the project's own setuid program would put another name
    of that privileged inode on the host: commit writes a cleared copy instead."""
    helper = ws.project / "helper"
    helper.write_text("#!/bin/sh\necho helper\n")
    helper.chmod(0o4755)
    ws.run("ln helper helper.alias")
    done = ws.ctl("commit")
    assert done.returncode == 0, done.stderr
    assert "cleared setuid on " + str(ws.project / "helper.alias") in done.stderr
    alias = ws.project / "helper.alias"
    assert _mode(alias) == 0o755 and alias.read_text() == helper.read_text()
    assert os.stat(alias).st_ino != os.stat(helper).st_ino
    assert _mode(helper) == 0o4755  # the host's own file, not part of the change, is untouched


def test_a_job_cannot_make_a_device_node(hostile: Hostile) -> None:
    """A device node in the layer would reach the host with a root commit (a /dev/mem of its
    own): no engine lets a job make one, so there is none to commit."""
    script = r"""
import os, stat
for name, kind, device in (("mem", stat.S_IFCHR, os.makedev(1, 1)),
                           ("disk", stat.S_IFBLK, os.makedev(8, 0))):
    try:
        os.mknod(name, 0o666 | kind, device)
        print(name, "made")
    except OSError as e:
        print(name, "refused", e.errno)
"""
    result = hostile.run("python3", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["mem refused 1", "disk refused 1"], result.stdout
    assert not (hostile.project / "mem").exists() and not (hostile.project / "disk").exists()
