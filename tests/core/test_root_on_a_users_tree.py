"""Root's job on a tree another user owns (issue 12): `sudo agentctl run` in a user's checkout,
a tarball extracted with its owners, a CI runner's checkout.

The job has no capabilities, so without help every write there is "Permission denied" where
the same command natively works. In its view the tree's owner and root trade places
(engines/id_swap.py): the job writes the tree as its owner would, what it makes is stored as
the owner's, and nothing outside the tree changes hands.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from isolated_agent.engines.id_swap import IdSwap, id_swap_for
from tests.conftest import Agentctl

THIRD = 4242  # a third user's files: seen and kept as they are

# Who owns what in the view, then every kind of write: in files, new ones, modes, deletes of
# files (a third user's too: the directory is the job's) and directories, a rename.
SCRIPT = """
id -u
stat -c '%u:%g %n' . a.txt private private/key root.txt third.txt
echo more >> a.txt
echo new > new.txt
mkdir private/sub && echo deep > private/sub/f
chmod 0600 a.txt
cat private/key
echo x >> root.txt 2>/dev/null || echo root.txt refused
echo x >> third.txt 2>/dev/null || echo third.txt refused
cat "$1" 2>/dev/null || echo outside refused
rm third.txt && rm -r old && mkdir old && mv new.txt old/renamed.txt
"""


@pytest.fixture
def users_tree(disk_dir: Path, unprivileged_user: pwd.struct_passwd) -> Path:
    uid, gid = unprivileged_user.pw_uid, unprivileged_user.pw_gid
    disk_dir.chmod(0o755)
    project = disk_dir / "project"
    (project / "private").mkdir(parents=True)
    (project / "a.txt").write_text("a\n")
    (project / "private" / "key").write_text("key\n")
    (project / "root.txt").write_text("root's\n")
    (project / "third.txt").write_text("third's\n")
    (project / "old").mkdir()
    (project / "old" / "f").write_text("old\n")
    secret = disk_dir / "secret"  # the owner's file outside the tree: not the job's
    secret.write_text("secret\n")
    for path in (project, project / "a.txt", project / "private", project / "private" / "key",
                 project / "old", project / "old" / "f", secret):
        os.chown(path, uid, gid)
    os.chown(project / "third.txt", THIRD, THIRD)
    for path, mode in ((project / "private", 0o700), (project / "private" / "key", 0o600),
                       (secret, 0o600)):
        path.chmod(mode)
    return project


@pytest.mark.parametrize("engine", ["kernel", "fuse"])
def test_root_writes_a_users_tree_as_its_owner(
    engine: str, users_tree: Path, agentctl: Agentctl, unprivileged_user: pwd.struct_passwd
) -> None:
    uid, gid = unprivileged_user.pw_uid, unprivileged_user.pw_gid
    secret = users_tree.parent / "secret"
    done = agentctl("run", "--engine", engine, "--", "sh", "-c", SCRIPT, "-", str(secret),
                    cwd=users_tree)
    assert done.returncode == 0, done.stderr
    assert f"is {unprivileged_user.pw_name}'s: the job sees" in done.stderr
    assert done.stdout.splitlines() == [
        "0",
        "0:0 .", "0:0 a.txt", "0:0 private", "0:0 private/key", f"{uid}:{gid} root.txt",
        f"{THIRD}:{THIRD} third.txt",
        "key",
        "root.txt refused", "third.txt refused",  # as the owner: not theirs
        "outside refused",  # the owner's files elsewhere stay the owner's
    ]
    assert (users_tree / "a.txt").read_text() == "a\n"  # the host, until commit

    committed = agentctl("commit", cwd=users_tree)
    assert committed.returncode == 0, committed.stderr
    owners = {str(p.relative_to(users_tree)): (p.stat().st_uid, p.stat().st_gid, p.stat().st_mode
                                               & 0o7777)
              for p in users_tree.rglob("*")}
    assert owners == {
        "a.txt": (uid, gid, 0o600),
        "old": (uid, gid, 0o755),
        "old/renamed.txt": (uid, gid, 0o644),
        "private": (uid, gid, 0o700),
        "private/key": (uid, gid, 0o600),
        "private/sub": (uid, gid, 0o755),
        "private/sub/f": (uid, gid, 0o644),
        "root.txt": (0, 0, 0o644),
    }
    assert (users_tree / "a.txt").read_text() == "a\nmore\n"
    assert (users_tree / "old" / "renamed.txt").read_text() == "new\n"


def test_only_another_users_tree_is_swapped(users_tree: Path) -> None:
    assert id_swap_for(str(users_tree.parent)) is None  # root's own
    swap = id_swap_for(str(users_tree))
    assert swap is not None and swap.owner_uid == users_tree.stat().st_uid


@pytest.mark.unit
@pytest.mark.parametrize("owner", [1, 1000, 65534, 4294967294])
def test_the_swap_crosses_owner_and_root_and_keeps_every_other_id(owner: int) -> None:
    swap = IdSwap(owner, owner)
    assert swap.swap_uid(owner) == 0 and swap.swap_uid(0) == owner
    for other in {2, 999, 1001, 4294967293} - {owner}:
        assert swap.swap_uid(other) == other and swap.swap_gid(other) == other
    # The kernel's maps say the same, and cover every id once on each side.
    ranges = [tuple(map(int, line.split())) for line in swap.uid_map().splitlines()]
    assert sum(count for _, _, count in ranges) == 4294967295
    for disk, seen, count in ranges:
        assert all(swap.swap_uid(disk + i) == seen + i for i in {0, count - 1})
    for side in (0, 1):
        spans = sorted((r[side], r[side] + r[2]) for r in ranges)
        assert spans[0][0] == 0 and all(
            a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


@pytest.mark.unit
def test_no_group_swap_when_the_tree_is_roots_group() -> None:
    swap = IdSwap(1000, 0)
    assert swap.swap_gid(0) == 0 and swap.swap_gid(1000) == 1000
    assert swap.gid_map() == "0 0 4294967295\n"
