"""After a commit: take what was committed out of the env's layers, without changing its view.

Invariant: the view the env gives (upper ∪ host, DESIGN §3) is the same before and after every
single step here, so a crash half-way leaves a correct env and a redo simply carries on.

- a committed whiteout goes (the host no longer has the entry it hid);
- a committed file, symlink or node goes when the host shows through at its place (no upper
  directory above it hides the host), since the host now holds the same thing;
- an opaque directory loses its opaque mark when every host entry beneath it is either shadowed
  by the layer or was written by this commit — merging it with the host then changes nothing;
- a directory left empty, with the host's directory showing through, goes when it was committed
  or adds nothing (same permissions as the host's);
- a file moved out of the layer whose place is still hidden from the host (its commit failed
  half-way under an opaque directory) is copied back from the host.
Everything else stays: uncommitted changes and entries the view still needs.
"""

from __future__ import annotations

import contextlib
import os
import stat

from isolated_agent.env.apply import Op, copy_file, lstat_or_none, set_metadata
from isolated_agent.env.changeset import join
from isolated_agent.env.selection import Selection
from isolated_agent.env.store import Env
from isolated_agent.overlay.format import OPAQUE_XATTR, is_opaque_dir, is_whiteout

Path = tuple[int, bytes]  # (root index, path relative to the root)


def prune(
    env: Env,
    selection: Selection,
    committed: set[Path],
    failed: set[Path],
    moved: list[Op],
) -> None:
    blocked: set[Path] = set()
    for root, rel in failed:
        parts = rel.split(b"/")
        for depth in range(len(parts) + 1):
            blocked.add((root, b"/".join(parts[:depth])))
    for env_root in env.roots:
        pruner = _Pruner(env_root.index, os.fsencode(env_root.path), selection, committed, blocked)
        pruner.visit(b"", os.fsencode(env_root.upper), merged=True)
    for op in moved:
        _restore_if_hidden(env, op)


class _Pruner:
    def __init__(
        self, root: int, host_root: bytes, selection: Selection, committed: set[Path],
        blocked: set[Path],
    ) -> None:
        self.root = root
        self.host_root = host_root
        self.selection = selection
        self.committed = committed
        self.blocked = blocked

    def visit(self, rel: bytes, upper_dir: bytes, merged: bool) -> None:
        """`merged`: the host's entries in this directory show through in the view."""
        with os.scandir(upper_dir) as it:
            entries = list(it)
        for entry in entries:
            path = join(rel, entry.name)
            if not self.selection.relevant(self.root, path):
                continue
            selected = (
                self.selection.matches(self.root, path)
                and (self.root, path) not in self.blocked
            )
            upper_path = entry.path
            st = entry.stat(follow_symlinks=False)
            host_path = self.host_root + b"/" + path
            if is_whiteout(st):
                if selected or (merged and lstat_or_none(host_path) is None):
                    _unlink(upper_path)  # hides nothing any more
                continue
            if stat.S_ISDIR(st.st_mode):
                self._visit_dir(path, upper_path, host_path, st, merged, selected)
                continue
            if selected and merged:
                _unlink(upper_path)

    def _visit_dir(
        self, path: bytes, upper_path: bytes, host_path: bytes, st: os.stat_result,
        merged: bool, selected: bool,
    ) -> None:
        host_st = lstat_or_none(host_path)
        host_is_dir = host_st is not None and stat.S_ISDIR(host_st.st_mode)
        opaque = is_opaque_dir(upper_path)
        if (
            opaque and merged and host_is_dir and selected
            and self._covered(path, upper_path, host_path)
        ):
            os.removexattr(upper_path, OPAQUE_XATTR, follow_symlinks=False)
            opaque = False
        child_merged = merged and not opaque and host_is_dir
        self.visit(path, upper_path, child_merged)
        if not child_merged or host_st is None:
            return
        same_perms = stat.S_IMODE(host_st.st_mode) == stat.S_IMODE(st.st_mode)
        if (selected or same_perms) and not os.listdir(upper_path):
            with contextlib.suppress(OSError):
                os.rmdir(upper_path)

    def _covered(self, path: bytes, upper_dir: bytes, host_dir: bytes) -> bool:
        """Is every host entry under `host_dir` shadowed by the layer or written by this
        commit? Then merging the directory with the host changes nothing."""
        for name in os.listdir(host_dir):
            child = join(path, name)
            upper_child = upper_dir + b"/" + name
            host_child = host_dir + b"/" + name
            upper_st = lstat_or_none(upper_child)
            host_st = lstat_or_none(host_child)
            if host_st is None:
                continue
            if upper_st is not None:
                if (
                    stat.S_ISDIR(upper_st.st_mode) and stat.S_ISDIR(host_st.st_mode)
                    and not is_opaque_dir(upper_child)
                    and not self._covered(child, upper_child, host_child)
                ):
                    return False
                continue
            if (self.root, child) not in self.committed:
                return False
            if stat.S_ISDIR(host_st.st_mode) and not self._all_committed(child, host_child):
                return False
        return True

    def _all_committed(self, path: bytes, host_dir: bytes) -> bool:
        for name in os.listdir(host_dir):
            child = join(path, name)
            if (self.root, child) not in self.committed:
                return False
            host_child = host_dir + b"/" + name
            is_dir = os.path.isdir(host_child) and not os.path.islink(host_child)
            if is_dir and not self._all_committed(child, host_child):
                return False
        return True


def _restore_if_hidden(env: Env, op: Op) -> None:
    """A file moved out of the layer must still be in the view: if an upper directory above
    it still hides the host, put a copy back."""
    assert op.source is not None
    if lstat_or_none(op.source) is not None:
        return
    root = env.roots[op.root]
    upper = os.fsencode(root.upper)
    host = os.fsencode(root.path)
    parts = op.rel.split(b"/")
    for depth in range(1, len(parts)):
        ancestor = b"/".join(parts[:depth])
        upper_dir = upper + b"/" + ancestor
        if not os.path.isdir(upper_dir):
            return  # no layer from here down: the host shows through
        if is_opaque_dir(upper_dir) or not os.path.isdir(host + b"/" + ancestor):
            break
    else:
        return
    host_st = lstat_or_none(op.host)
    if host_st is None or not stat.S_ISREG(host_st.st_mode):
        return
    temp = op.source + b".agentctl-restore"
    copy_file(op.host, temp, host_st.st_mode)
    set_metadata(
        op.host, temp, host_st.st_mode, host_st.st_uid, host_st.st_gid, host_st.st_atime_ns,
        host_st.st_mtime_ns, keep_privileges=True,  # the host's file as it is, into the env
    )
    os.rename(temp, op.source)


def _unlink(path: bytes) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
