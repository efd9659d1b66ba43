"""After a commit: take what was committed out of the env's layers, without changing its view.

Invariant: the view the env gives (upper ∪ host, DESIGN §3) is the same before and after every
single step here, so a crash half-way leaves a correct env and a redo simply carries on.

- a committed whiteout goes (the host no longer has the entry it hid);
- a committed file, symlink or node goes when the host shows through at its place (no upper
  directory above it hides the host), since the host now holds the same thing;
- an opaque directory loses its opaque mark when every host entry beneath it is either shadowed
  by the layer or was written by this commit — merging it with the host then changes nothing;
- a directory left empty, with the host's directory showing through, goes when it was committed
  or adds nothing (same permissions, owner and data xattrs as the host's);
- a file moved out of the layer whose place is still hidden from the host (its commit failed
  half-way under an opaque directory) is copied back from the host.
Everything else stays: uncommitted changes and entries the view still needs. A root with frozen
layers under its upper (DESIGN §11) is left as it is: its committed entries are redundant with
the host, but not removable, since what is beneath them is a layer, not the host.

The layer is walked through directory fds (with the host's directory beside it), so trees deeper
than PATH_MAX are pruned like any other.
"""

from __future__ import annotations

import contextlib
import os
import stat

from isolated_agent.env.apply import Op, copy_file, lstat_or_none, set_metadata
from isolated_agent.env.changeset import data_xattrs, join
from isolated_agent.env.selection import Selection
from isolated_agent.env.store import Env
from isolated_agent.overlay.format import (
    OPAQUE_XATTR,
    fd_path,
    is_opaque_dir,
    is_opaque_fd,
    is_whiteout,
)
from isolated_agent.system import fdpath

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
        if env_root.layers:
            # Taking an entry out of the upper would show the frozen layer's beneath it, not
            # the host's: the view stays right only if the upper stays as it is. The commit
            # made the host what the view shows, so the entries are merely redundant now.
            continue
        host_root = os.fsencode(env_root.path)
        pruner = _Pruner(env_root.index, host_root, selection, committed, blocked)
        upper_fd = os.open(env_root.upper, fdpath.DIR_READ)
        try:
            host_fd = os.open(host_root, fdpath.DIR_PATH)  # the root as configured
            try:
                pruner.visit(b"", upper_fd, host_fd, merged=True)
            finally:
                os.close(host_fd)
        finally:
            os.close(upper_fd)
    for op in moved:
        _restore_if_hidden(env, op)


class _Pruner:
    """Walks the upper layer through directory fds (one per level; trees can be deeper than
    PATH_MAX), with the host's directory beside it when there is one."""

    def __init__(
        self, root: int, host_root: bytes, selection: Selection, committed: set[Path],
        blocked: set[Path],
    ) -> None:
        self.root = root
        self.host_root = host_root
        self.selection = selection
        self.committed = committed
        self.blocked = blocked

    def visit(self, rel: bytes, upper_fd: int, host_fd: int | None, merged: bool) -> None:
        """`merged`: the host's entries in this directory show through in the view;
        `host_fd`: the host's directory here (None when the host has none)."""
        for name in [os.fsencode(n) for n in os.listdir(upper_fd)]:
            path = join(rel, name)
            if not self.selection.relevant(self.root, path):
                continue
            selected = (
                self.selection.matches(self.root, path)
                and (self.root, path) not in self.blocked
            )
            st = os.stat(name, dir_fd=upper_fd, follow_symlinks=False)
            host_st = None if host_fd is None else fdpath.lstat_at(host_fd, name)
            if is_whiteout(st):
                if selected or (merged and host_st is None):
                    _unlink_at(upper_fd, name)  # hides nothing any more
                continue
            if stat.S_ISDIR(st.st_mode):
                self._visit_dir(path, upper_fd, name, host_fd, host_st, st, merged, selected)
                continue
            if selected and merged:
                _unlink_at(upper_fd, name)

    def _visit_dir(
        self, path: bytes, upper_fd: int, name: bytes, host_fd: int | None,
        host_st: os.stat_result | None, st: os.stat_result, merged: bool, selected: bool,
    ) -> None:
        host_is_dir = host_st is not None and stat.S_ISDIR(host_st.st_mode)
        child = os.open(name, fdpath.DIR_READ | os.O_NOFOLLOW, dir_fd=upper_fd)
        host_child = None
        if host_is_dir and host_fd is not None:
            host_child = fdpath.open_dir_at(host_fd, name)
        try:
            opaque = is_opaque_fd(child)
            if (
                opaque and merged and host_child is not None and selected
                and self._covered(path, child, host_child)
            ):
                os.removexattr(fd_path(child), OPAQUE_XATTR)
                opaque = False
            child_merged = merged and not opaque and host_child is not None
            self.visit(path, child, host_child, child_merged)
            if not child_merged or host_st is None:
                return
            assert host_child is not None  # child_merged
            if (selected or self._adds_nothing(st, host_st, child, host_child)) \
                    and not os.listdir(child):
                with contextlib.suppress(OSError):
                    os.rmdir(name, dir_fd=upper_fd)
        finally:
            os.close(child)
            if host_child is not None:
                os.close(host_child)

    @staticmethod
    def _adds_nothing(st: os.stat_result, host_st: os.stat_result, upper_fd: int,
                      host_fd: int) -> bool:
        """An upper directory whose permissions, owner and data xattrs are the host's."""
        return (stat.S_IMODE(host_st.st_mode) == stat.S_IMODE(st.st_mode)
                and (host_st.st_uid, host_st.st_gid) == (st.st_uid, st.st_gid)
                and data_xattrs(os.fsencode(fd_path(upper_fd)))
                == data_xattrs(os.fsencode(fd_path(host_fd))))

    def _covered(self, path: bytes, upper_fd: int, host_fd: int) -> bool:
        """Is every host entry under the host dir `host_fd` shadowed by the layer (`upper_fd`)
        or written by this commit? Then merging the directory with the host changes
        nothing."""
        for name in fdpath.listdir_at(host_fd):
            child = join(path, name)
            upper_st = fdpath.lstat_at(upper_fd, name)
            host_st = fdpath.lstat_at(host_fd, name)
            if host_st is None:
                continue
            if upper_st is not None:
                if stat.S_ISDIR(upper_st.st_mode) and stat.S_ISDIR(host_st.st_mode):
                    with (fdpath.dir_at(upper_fd, name) as upper_child,
                          fdpath.dir_at(host_fd, name) as host_child):
                        if (
                            upper_child is not None and host_child is not None
                            and not is_opaque_fd(upper_child)
                            and not self._covered(child, upper_child, host_child)
                        ):
                            return False
                continue
            if (self.root, child) not in self.committed:
                return False
            if stat.S_ISDIR(host_st.st_mode) and not self._all_committed_at(host_fd, name, child):
                return False
        return True

    def _all_committed_at(self, parent_fd: int, name: bytes, path: bytes) -> bool:
        """Is every entry under the host directory `name` (in `parent_fd`) committed? (Not a
        directory, or gone: nothing under it.)"""
        with fdpath.dir_at(parent_fd, name) as host_fd:
            if host_fd is None:
                return True
            for child_name in fdpath.listdir_at(host_fd):
                child = join(path, child_name)
                if (self.root, child) not in self.committed:
                    return False
                if not self._all_committed_at(host_fd, child_name, child):
                    return False
        return True


def _unlink_at(dir_fd: int, name: bytes) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


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
        if not fdpath.is_dir(upper_dir):
            return  # no layer from here down: the host shows through
        if _is_opaque(upper_dir) or not fdpath.is_dir(host + b"/" + ancestor):
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
    fdpath.rename(temp, op.source)


def _is_opaque(path: bytes) -> bool:
    try:
        with fdpath.xattr_path(path) as short:
            return is_opaque_dir(short)
    except OSError:
        return False
