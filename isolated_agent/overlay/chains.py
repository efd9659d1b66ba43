"""A directory of a stack of layers, merged as overlayfs merges middle layers (DESIGN §3, §11),
for the code that reads frozen stacks directly: the changeset (env/changeset.py) and squash
(env/squash.py). agentfs keeps the same rule on its nodes (merge.py, `_lower_dirs`).

A directory of the view is a *chain*: the layers' directories at its path, top first — the
topmost entry of its name, then the same-named directories of the layers below, down to the
first opaque one (included) or the first whiteout or non-directory (not included). A name in
it is its topmost entry. A chain cut short (by an opaque directory, or by a lower whiteout or
non-directory) hides whatever lies below it: the host, or the layers under a squashed run.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from isolated_agent.overlay.format import is_opaque_fd
from isolated_agent.system import fdpath

Found = list[tuple[int, os.stat_result]]  # (position in the chain, the entry's lstat), top first


def root_chain(roots: list[int]) -> tuple[list[int], bool]:
    """The layers' root directories (top first) that merge: down to the first opaque one;
    and whether one cut it short."""
    for i, fd in enumerate(roots):
        if is_opaque_fd(fd):
            return roots[: i + 1], True
    return roots, False


def entries_at(chain: Sequence[int], name: bytes) -> Found:
    """Every entry the chain's directories hold at `name`, top first."""
    return [(i, st) for i, fd in enumerate(chain)
            if (st := fdpath.lstat_at(fd, name)) is not None]


def open_chain(chain: Sequence[int], found: Found, name: bytes) -> tuple[list[int], int | None]:
    """The chain of directory `name`, whose topmost entry (`found[0]`) is a directory: fds of
    the directories it merges, top first, opened for reading (the caller closes them); and the
    index in `found` of the entry that cuts it short — an opaque directory, or a lower whiteout
    or non-directory — or None when it goes on below `chain`."""
    opened: list[int] = []
    try:
        for i, (position, st) in enumerate(found):
            if not stat.S_ISDIR(st.st_mode):
                return opened, i
            opened.append(os.open(name, fdpath.DIR_READ | os.O_NOFOLLOW,
                                  dir_fd=chain[position]))
            if is_opaque_fd(opened[-1]):
                return opened, i
        return opened, None
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
