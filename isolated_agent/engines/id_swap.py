"""Root's job on a tree another user owns: that user and root trade places in the job's view.

A root job runs without capabilities, so it may write only where root's owner bits allow: in a
checkout of alice's (`sudo agentctl run`), a tarball extracted with its owners, or a CI runner's
checkout, every write would be "Permission denied" where the same command run natively works.
Giving the job CAP_DAC_OVERRIDE instead would let it read every user's files on the machine.

So, in the view of a root run over a root owned by uid U (group G), U and 0 trade places (and G
and 0): the job sees the tree as root's and writes it as its owner would, and what it creates
or copies up is stored as U's (G's) — the tree stays its owner's after `commit`. Only the
root's own owner is swapped; files of a third user stay theirs. The kernel engine gets this
from idmapped overlayfs layers (the maps below), agentfs by swapping at its FUSE boundary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_LAST_ID = 4294967294  # (uid_t)-1 is "no id"


@dataclass(frozen=True)
class IdSwap:
    owner_uid: int  # the tree owner's uid, never 0
    owner_gid: int  # the tree's group, or 0: groups stay as they are

    def swap_uid(self, uid: int) -> int:
        """The uid the job sees for `uid` on disk, and the uid stored for one the job gives: a
        swap is its own inverse."""
        return _swap(uid, self.owner_uid)

    def swap_gid(self, gid: int) -> int:
        return _swap(gid, self.owner_gid)

    def uid_map(self) -> str:
        """/proc/PID/uid_map of the user namespace of an idmapped mount: disk id -> seen id."""
        return _map(self.owner_uid)

    def gid_map(self) -> str:
        return _map(self.owner_gid)


def id_swap_for(root_path: str) -> IdSwap | None:
    """The swap of a run over `root_path`: only when root runs it and another user owns it."""
    if os.geteuid() != 0:
        return None  # a user's job is that user: the tree's owner bits are theirs or not
    st = os.stat(root_path)
    return IdSwap(st.st_uid, st.st_gid) if st.st_uid != 0 else None


def _swap(value: int, other: int) -> int:
    if other == 0:
        return value
    return other if value == 0 else 0 if value == other else value


def _map(other: int) -> str:
    """Lines `inside outside count`: `other` and 0 crossed, every other id to itself."""
    if other == 0:
        return f"0 0 {_LAST_ID + 1}\n"
    lines = [(0, other, 1), (other, 0, 1)]
    if other > 1:
        lines.append((1, 1, other - 1))
    if other < _LAST_ID:
        lines.append((other + 1, other + 1, _LAST_ID - other))
    return "".join(f"{a} {b} {n}\n" for a, b, n in sorted(lines))
