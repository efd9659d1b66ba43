"""Squash: an env's private frozen layers merged into one, so that a stack's depth stays bounded
(DESIGN §11).

Which layers: the top run of the env's stack that no other env's stack and no other env's
checkpoint names — a fork's parent layers stay as they are. The merged layer is a new one: no
layer is ever changed, and the env's own checkpoints keep naming the layers they named (their
space comes back when they go).

How: the merged layer holds the view those layers give on their own — per name the topmost
entry. Non-directories and whiteouts are hard-linked (layers never change, so sharing an inode
is safe; and a link keeps the inode's birth time, which commit's conflict check reads).
Directories are made anew, with the topmost one's attributes, opaque where the squashed layers
hide what is below them; a new directory is born now, so the take-over time it stands for (the
earliest birth among the entries it replaces) is kept in its `TAKEN_XATTR` (overlay/format.py).

Crash-safe as a freeze is (layers.py): built under `layers/.squashing-<env>-<id>`, made to
exist by the one catalog transaction that also points the env at it, then renamed into place;
a crash before the transaction leaves the env as it was (the half-built layer is removed when
the env's lock is next taken), after it as squashed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from dataclasses import dataclass

from isolated_agent.env.layers import SQUASHING, finish_rename
from isolated_agent.env.store import Env, Store
from isolated_agent.overlay.chains import entries_at, open_chain, root_chain
from isolated_agent.overlay.format import (
    OPAQUE_XATTR,
    TAKEN_XATTR,
    fd_path,
    make_opaque_fd,
    taken_time_ns,
)
from isolated_agent.system import fdpath
from isolated_agent.system.durable import fsync_dir, sync_filesystem

# A checkpoint that makes a stack deeper than this squashes the env's private layers (DESIGN
# §11): lookups of names no layer has cost one probe per layer, and the kernel engine's mount
# options name every layer.
SQUASH_DEPTH = 32

# The kernel's overlayfs frees a merged directory's listing at its last close and rebuilds it
# from every layer at the next open (ovl_cache_put), so listing-heavy work (git status, find)
# slows with depth: 1.19–1.26x at 32 layers. `run --engine kernel` squashes an env's private
# layers before it mounts a stack deeper than this (benchmarks/README-stack.md).
KERNEL_DEPTH = 8


@dataclass(frozen=True)
class Squashed:
    merged: tuple[str, ...]  # the layers merged, bottom first
    layer: str  # the layer that replaces them in the env's stack


def squash(store: Store, env: Env) -> Squashed | None:
    """Merge the env's private layers into one; None when it has fewer than two."""
    with store.lock(env, purpose="squash it"):
        return squash_locked(store, store.get(env.id))


def squash_locked(store: Store, env: Env) -> Squashed | None:
    shared = store.catalog.layers_used_by_others(env.id)
    private: list[str] = []
    for layer in reversed(env.layers):
        if layer in shared:
            break
        private.insert(0, layer)
    if len(private) < 2:
        return None
    layer_id = secrets.token_hex(6)
    layers_dir = os.path.join(store.home, "layers")
    pending = os.path.join(layers_dir, f"{SQUASHING}{env.id}-{layer_id}")
    os.makedirs(os.path.join(pending, "roots"), mode=0o700)
    for root in env.roots:
        sources = [os.open(store.layer_dir(layer, root.index), fdpath.DIR_READ)
                   for layer in reversed(private)]
        try:
            _merge_root(sources, os.path.join(pending, "roots", str(root.index)))
        finally:
            for fd in sources:
                os.close(fd)
    sync_filesystem(pending)  # the merged layer is on disk before the catalog names it
    stack = (*env.layers[: len(env.layers) - len(private)], layer_id)
    with store.catalog.transaction() as db:
        store.catalog.add_layer(db, layer_id, time.time())
        store.catalog.set_env_layers(db, env.id, stack)
    finish_rename(pending, os.path.join(layers_dir, layer_id))
    return Squashed(tuple(private), layer_id)


def _merge_root(roots: list[int], target: str) -> None:
    chain, cut = root_chain(roots)
    os.mkdir(target, 0o700)
    out = os.open(target, fdpath.DIR_READ)
    try:
        _merge(chain, out)
        _copy_dir_attributes(chain[0], out, opaque=cut, taken=None)
    finally:
        os.close(out)
    fsync_dir(os.path.dirname(target))


def _merge(chain: list[int], out: int) -> None:
    """Write into `out` the directory `chain` (the squashed layers' directories, top first)
    shows."""
    names = dict.fromkeys(name for fd in chain for name in fdpath.listdir_at(fd))
    for name in names:
        found = entries_at(chain, name)
        top_fd, top = chain[found[0][0]], found[0][1]
        if not stat.S_ISDIR(top.st_mode):
            os.link(name, name, src_dir_fd=top_fd, dst_dir_fd=out, follow_symlinks=False)
            continue
        children, cut = open_chain(chain, found, name)
        try:
            # The take-over it stands for: the earliest among the entries it replaces (those
            # it merges, and the one that cuts it short).
            replaced = found if cut is None else found[: cut + 1]
            times = [t for position, _ in replaced
                     if (t := taken_time_ns(fd_path(chain[position]).encode() + b"/" + name))
                     is not None]
            os.mkdir(name, 0o700, dir_fd=out)
            made = os.open(name, fdpath.DIR_READ | os.O_NOFOLLOW, dir_fd=out)
            try:
                _merge(children, made)
                _copy_dir_attributes(children[0], made, opaque=cut is not None,
                                     taken=min(times, default=None))
            finally:
                os.close(made)
        finally:
            for fd in children:
                os.close(fd)


def _copy_dir_attributes(source: int, target: int, *, opaque: bool, taken: int | None) -> None:
    """Owner, permission bits, times and xattrs of directory `source` onto `target`; the
    overlay's own markers are decided here, not copied."""
    src = fd_path(source)
    for name in os.listxattr(src):
        if name in (OPAQUE_XATTR, TAKEN_XATTR):
            continue
        with contextlib.suppress(OSError):  # a security label this filesystem will not take
            os.setxattr(fd_path(target), name, os.getxattr(src, name))
    if opaque:
        make_opaque_fd(target)
    if taken is not None:
        os.setxattr(fd_path(target), TAKEN_XATTR, str(taken).encode())
    st = os.fstat(source)
    os.fchown(target, st.st_uid, st.st_gid)
    os.fchmod(target, stat.S_IMODE(st.st_mode))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
