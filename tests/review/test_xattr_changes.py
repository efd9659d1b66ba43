"""A change to extended attributes or owner alone is a change: diff shows it, --json says so,
commit makes the host's match, and nothing of it is pruned as "unchanged" (issue 12)."""

from __future__ import annotations

import json
import os

import pytest

from tests.review.conftest import Workspace

JOB = r"""
import os
os.setxattr("README.md", "user.tag", b"x")
os.removexattr("README.md", "user.old")
os.setxattr("docs", "user.dir", b"after")
os.setxattr("run.sh", "user.same", b"1")
os.removexattr("run.sh", "user.same")
"""


def _data_xattrs(path: object) -> dict[str, bytes]:
    return {n: os.getxattr(path, n) for n in os.listxattr(path)}  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", ["kernel", "fuse"])
def test_an_xattr_only_change_is_shown_and_committed(ws: Workspace, engine: str) -> None:
    os.setxattr(ws.project / "README.md", "user.old", b"gone soon")
    os.setxattr(ws.project / "docs", "user.dir", b"before")
    done = ws.ctl("run", "-q", "--engine", engine, "--", "python3", "-c", JOB)
    assert done.returncode == 0, done.stderr

    assert ws.ctl("diff", "--name-status").stdout.splitlines() == ["M\tREADME.md", "M\tdocs/"]
    patch = ws.ctl("diff").stdout
    assert 'old xattr user.old "gone soon"\nnew xattr user.tag "x"' in patch, patch
    assert 'old xattr user.dir "before"\nnew xattr user.dir "after"' in patch, patch
    changes = {c["path"]: c for c in json.loads(ws.ctl("diff", "--json").stdout)["changes"]}
    assert changes["README.md"]["xattrs_changed"] and not changes["README.md"]["content_changed"]
    assert changes["docs"]["xattrs_changed"] and not changes["docs"]["mode_changed"]

    assert ws.ctl("commit").returncode == 0
    assert _data_xattrs(ws.project / "README.md") == {"user.tag": b"x"}
    assert _data_xattrs(ws.project / "docs") == {"user.dir": b"after"}
    assert ws.ctl("diff", "--name-status").stdout == ""


def test_an_uncommitted_xattr_change_stays_in_the_env(ws: Workspace) -> None:
    """Committing other paths prunes what was committed, never the xattr change left out."""
    ws.run("setfattr -n user.keep -v 1 docs && setfattr -n user.keep -v 2 README.md "
           "&& echo more >> src/main.py")
    assert ws.ctl("commit", str(ws.project / "src")).returncode == 0
    assert ws.ctl("diff", "--name-status").stdout.splitlines() == ["M\tREADME.md", "M\tdocs/"]


def test_an_owner_only_difference_is_shown_and_committed(ws: Workspace) -> None:
    """A job cannot give files away (it has no CAP_CHOWN), but the env's copy and the host's
    file can still differ in owner alone: the host chowned it after the env took it over.
    Commit would set the env's owner back: diff must say so."""
    ws.run("touch README.md && touch docs/x && rm docs/x")  # copied up, no change
    assert ws.ctl("diff", "--name-status").stdout == ""
    os.chown(ws.project / "README.md", 4242, 4343)
    os.chown(ws.project / "docs", -1, 4343)
    assert ws.ctl("diff", "--name-status").stdout.splitlines() == ["M\tREADME.md", "M\tdocs/"]
    patch = ws.ctl("diff").stdout
    assert "old owner 4242:4343\nnew owner 0:0" in patch, patch
    changes = {c["path"]: c for c in json.loads(ws.ctl("diff", "--json").stdout)["changes"]}
    assert changes["README.md"]["owner_changed"] and not changes["README.md"]["mode_changed"]
    assert (changes["docs"]["old"]["gid"], changes["docs"]["new"]["gid"]) == (4343, 0)
    assert ws.ctl("commit", "--force").returncode == 0
    readme, docs = (ws.project / "README.md").stat(), (ws.project / "docs").stat()
    assert (readme.st_uid, readme.st_gid, docs.st_gid) == (0, 0, 0)
    assert ws.ctl("diff", "--name-status").stdout == ""
