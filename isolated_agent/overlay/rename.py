"""rename(2) over the merged view (DESIGN §5, items 6 to 10).

The plan, whatever the entries are made of:

1. check the merged view: the source exists; the target's kind fits (ENOTDIR, EISDIR), a target
   directory is empty in the *merged* view (ENOTEMPTY); RENAME_NOREPLACE wants no target,
   RENAME_EXCHANGE wants one;
2. make the source movable inside upper: a non-directory is copied up; a directory that shows
   lower entries (lower-only or mixed) is *materialized* — its lower entries copied up beneath
   it, children already modified in upper kept as they are, then marked opaque (the merged
   view is unchanged by every step, so a failure part-way is harmless). This is where the
   kernel gives up with EXDEV; agentfs does not;
3. a directory arriving at a name some lower layer shows must be opaque (else the lower entry
   would merge into it);
4. one renameat2 in upper: with RENAME_WHITEOUT when a lower layer shows something at the
   source name (the whiteout appears atomically with the move); over an upper whiteout at the
   target a directory is swapped in with RENAME_EXCHANGE (a directory cannot replace a
   non-directory), so the target's whiteout is cleared and the renamed entry is visible;
   RENAME_EXCHANGE of two entries is one RENAME_EXCHANGE in upper once both are there.
"""

from __future__ import annotations

import errno
import os

from isolated_agent.overlay.format import is_whiteout_stat, make_opaque_fd, make_whiteout_at
from isolated_agent.overlay.merge import Overlay, fstatat, oserror
from isolated_agent.overlay.node import Node
from isolated_agent.system import libc

RENAME_NOREPLACE = libc.RENAME_NOREPLACE
RENAME_EXCHANGE = libc.RENAME_EXCHANGE


def rename(
    ov: Overlay, parent: Node, name: bytes, new_parent: Node, new_name: bytes, flags: int = 0
) -> None:
    if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or (
        flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE
    ):
        raise oserror(errno.EINVAL)
    source = ov.held_lookup(parent, name)
    target: Node | None = None
    try:
        try:
            target = ov.held_lookup(new_parent, new_name)
        except FileNotFoundError:
            target = None
        if target is source:
            return  # two names of one file: rename(2) does nothing
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise oserror(errno.ENOENT, new_name)
            _exchange(ov, parent, name, source, new_parent, new_name, target)
            return
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise oserror(errno.EEXIST, new_name)
            if source.is_dir and not target.is_dir:
                raise oserror(errno.ENOTDIR, new_name)
            if not source.is_dir and target.is_dir:
                raise oserror(errno.EISDIR, new_name)
            if target.is_dir and not ov.is_empty_dir(target):
                raise oserror(errno.ENOTEMPTY, new_name)
        _move(ov, parent, name, source, new_parent, new_name, target)
    finally:
        ov.unref(source)
        if target is not None:
            ov.unref(target)


def _prepare(
    ov: Overlay, node: Node, parent: Node, name: bytes, dest: Node, dest_name: bytes
) -> None:
    """Steps 2 and 3: `node` (at parent/name) ends up wholly in upper, and opaque if it is a
    directory headed for a name a lower layer shows."""
    if not node.is_dir:
        ov.copy_up(node, via=(parent, name))
        return
    ov.materialize(node)
    assert node.upper is not None
    if not node.opaque and ov.lower_entry_exists(dest, dest_name):
        make_opaque_fd(node.upper)
        node.opaque = True


def _move(
    ov: Overlay,
    parent: Node,
    name: bytes,
    source: Node,
    new_parent: Node,
    new_name: bytes,
    target: Node | None,
) -> None:
    ov.ensure_upper(new_parent)
    ov.ensure_upper(parent)
    _prepare(ov, source, parent, name, new_parent, new_name)
    if target is not None and target.is_dir:
        ov.clear_whiteouts(target)  # empty in the merged view; its whiteouts must go first
    elif target is not None:
        ov.path_fd(target)  # while its name still reaches it: it may stay open, unlinked
    assert parent.upper is not None and new_parent.upper is not None
    leave_whiteout = ov.lower_entry_exists(parent, name)
    at_target = fstatat(new_parent.upper, new_name)
    ov.namespace_changed()
    if source.is_dir and at_target is not None and is_whiteout_stat(at_target):
        libc.renameat2(parent.upper, name, new_parent.upper, new_name, libc.RENAME_EXCHANGE)
        if not leave_whiteout:  # the target's whiteout landed at the source: not needed there
            os.unlink(name, dir_fd=parent.upper)
    else:
        _rename_leaving_whiteout(parent.upper, name, new_parent.upper, new_name, leave_whiteout)
    ov._remove_link(source, parent, name)
    if target is not None:
        ov._remove_link(target, new_parent, new_name)
    ov._add_link(source, new_parent, new_name)


def _rename_leaving_whiteout(
    old_dir: int, old: bytes, new_dir: int, new: bytes, whiteout: bool
) -> None:
    if not whiteout:
        libc.renameat2(old_dir, old, new_dir, new)
        return
    try:
        libc.renameat2(old_dir, old, new_dir, new, libc.RENAME_WHITEOUT)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
            raise
        # A filesystem without RENAME_WHITEOUT: rename, then whiteout (not atomic).
        libc.renameat2(old_dir, old, new_dir, new)
        make_whiteout_at(old_dir, old)


def _exchange(
    ov: Overlay,
    parent: Node,
    name: bytes,
    source: Node,
    new_parent: Node,
    new_name: bytes,
    target: Node,
) -> None:
    ov.ensure_upper(parent)
    ov.ensure_upper(new_parent)
    _prepare(ov, source, parent, name, new_parent, new_name)
    _prepare(ov, target, new_parent, new_name, parent, name)
    assert parent.upper is not None and new_parent.upper is not None
    ov.namespace_changed()
    libc.renameat2(parent.upper, name, new_parent.upper, new_name, libc.RENAME_EXCHANGE)
    ov._remove_link(source, parent, name)
    ov._remove_link(target, new_parent, new_name)
    ov._add_link(source, new_parent, new_name)
    ov._add_link(target, parent, name)
