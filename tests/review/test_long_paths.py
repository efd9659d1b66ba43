"""Trees deeper than PATH_MAX: a job can build one (`mkdir d; cd d` in a loop) and diff, commit
(backup, journal, apply, prune) and recovery must handle it like any other — the kernel refuses
such paths, so every step reaches them through directory fds."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from isolated_agent.cli.main import invoke
from isolated_agent.env import apply as apply_module
from tests.review.conftest import Workspace

DEPTH = 20
NAMES = [(b"d%02d" % i).ljust(250, b"x") for i in range(DEPTH)]  # 20 * 251 bytes > PATH_MAX
CHAIN = b"/".join(NAMES)

MAKE_CHAIN = textwrap.dedent("""\
    import os
    for i in range(20):
        name = ("d%02d" % i).ljust(250, "x")
        os.makedirs(name, exist_ok=True)
        os.chdir(name)
    {body}
""")


def in_job(ws: Workspace, body: str) -> None:
    """Run python code at the bottom of the chain, inside a job."""
    result = ws.agentctl("run", "-q", "--env", "e1", "--", "python3", "-c",
                         MAKE_CHAIN.format(body=body), cwd=ws.project, timeout=120)
    assert result.returncode == 0, result.stderr


@contextmanager
def bottom(top: Path, create: bool = False) -> Iterator[int]:
    """An fd of the chain's bottom directory under `top`, reached one name at a time."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in NAMES:
            if create:
                _mkdir_at(fd, name)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _mkdir_at(fd: int, name: bytes) -> None:
    with suppress(FileExistsError):
        os.mkdir(name, dir_fd=fd)


def read_at(fd: int, name: str) -> bytes | None:
    try:
        file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    except FileNotFoundError:
        return None
    with os.fdopen(file_fd, "rb") as f:
        return f.read()


def write_at(fd: int, name: str, data: bytes) -> None:
    file_fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd)
    with os.fdopen(file_fd, "wb") as f:
        f.write(data)


def test_diff_and_commit_a_chain_deeper_than_path_max(ws: Workspace) -> None:
    assert len(os.fsencode(ws.project) + b"/" + CHAIN) > 4096
    in_job(ws, "open('bottom.txt', 'w').write('deep\\n')")

    stat = ws.ctl("diff", "--stat")
    assert stat.returncode == 0, stat.stderr
    assert "bottom.txt" in stat.stdout and "1 file changed, 1 insertion(+)" in stat.stdout
    patch = ws.ctl("diff")
    assert patch.returncode == 0, patch.stderr
    assert "+deep" in patch.stdout
    listed = ws.ctl("diff", "--name-status")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == DEPTH + 1
    as_json = ws.ctl("diff", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["changes"][-1]["path"].endswith("/bottom.txt")

    done = ws.ctl("commit")
    assert done.returncode == 0, done.stderr
    with bottom(ws.project) as fd:
        assert read_at(fd, "bottom.txt") == b"deep\n"
    assert ws.ctl("diff", "--name-status").stdout == ""
    assert os.listdir(ws.upper()) == []


def _host_chain(ws: Workspace) -> None:
    """The host has the chain too, with two files at the bottom."""
    with bottom(ws.project, create=True) as fd:
        write_at(fd, "keep.txt", b"old\n")
        write_at(fd, "gone.txt", b"to be deleted\n")


def test_commit_backs_up_what_it_replaces_deep_down(ws: Workspace) -> None:
    _host_chain(ws)
    in_job(ws, "open('keep.txt', 'a').write('new\\n'); os.unlink('gone.txt')")
    assert "keep.txt" in ws.ctl("diff", "--stat").stdout

    done = ws.ctl("commit")
    assert done.returncode == 0, done.stderr
    with bottom(ws.project) as fd:
        assert read_at(fd, "keep.txt") == b"old\nnew\n"
        assert read_at(fd, "gone.txt") is None
    deep = os.fsencode(ws.project) + b"/" + CHAIN + b"/"
    backups = ws.backups()
    try:
        saved = {e.path: e for e in backups.catalog.find(path=deep + b"keep.txt")}
        saved.update({e.path: e for e in backups.catalog.find(path=deep + b"gone.txt")})
        with backups.blobs.get(saved[deep + b"keep.txt"].sha256 or "") as blob:
            assert blob.read() == b"old\n"
        with backups.blobs.get(saved[deep + b"gone.txt"].sha256 or "") as blob:
            assert blob.read() == b"to be deleted\n"
    finally:
        backups.close()


class Crash(BaseException):
    """Stands for a SIGKILL: nothing after it runs, not even `except Exception` handlers."""


def test_a_commit_killed_deep_down_is_finished_by_the_next_command(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    _host_chain(ws)
    in_job(ws, "open('keep.txt', 'a').write('new\\n'); os.unlink('gone.txt');"
               " open('added.txt', 'w').write('added\\n')")
    real_run = apply_module.Applier.run
    ran: list[int] = []

    def run_then_crash(self: apply_module.Applier, op: apply_module.Op) -> None:
        if len(ran) == 2:
            raise Crash()
        ran.append(op.index)
        real_run(self, op)

    monkeypatch.setattr(apply_module.Applier, "run", run_then_crash)
    monkeypatch.chdir(ws.project)
    with pytest.raises(Crash):
        invoke(["commit"])
    monkeypatch.undo()
    journal = ws.upper().parent.parent.parent / "commit.journal"
    lines = journal.read_bytes().splitlines()
    plan = json.loads(lines[0])
    assert any(len(os.fsencode(op["host"])) > 4096 for op in plan["ops"])
    assert json.loads(lines[-1])["phase"] == "backed-up"

    resumed = ws.ctl("commit", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "finished the interrupted commit" in resumed.stderr
    assert not journal.exists()
    with bottom(ws.project) as fd:
        assert read_at(fd, "keep.txt") == b"old\nnew\n"
        assert read_at(fd, "gone.txt") is None
        assert read_at(fd, "added.txt") == b"added\n"
    assert ws.ctl("diff", "--name-status").stdout == ""
    backups = ws.backups()
    try:
        deep = os.fsencode(ws.project) + b"/" + CHAIN + b"/"
        assert backups.catalog.find(path=deep + b"keep.txt")
        assert backups.catalog.find(path=deep + b"gone.txt")
    finally:
        backups.close()
