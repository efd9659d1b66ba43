"""The filter mount's file system: one agentfs mount over a managed root, a view per process.
A `FileSystem` model (fusefs/model.py), served by the one FUSE adapter (fusefs/adapter.py).

Every request that names something is served in the view of the process that sent it
(`Identity.view_of`): the host's (pass-through to the real files) or the env of the job the
process belongs to; a process that cannot be placed with certainty is refused (EACCES), never
given the host view. Each view is an `Overlay`: the host's has the root itself as its only
layer (its "upper"), an env's has the env's upper over the root. All layers were opened before
the mount covered the root, so nothing here ever resolves a path through its own mount.

The hard part is the kernel's caches, which are per mount, not per process: a dentry, an
inode's attributes and its page cache are shared by every process. So inode numbers and cache
lifetimes are decided per *name* (DESIGN §4.2, issue 5):

- a name that every view resolves to the same object (no env has touched it), or to a
  directory in every view, is *shared*: one inode number (the host's), with the host's
  attributes, cached for long — host and jobs alike walk it at kernel speed (its children are
  still decided name by name, so a directory an env created entries in stays shared; it shows
  the host's times and link count to the env too);
- a name that some view resolves differently *diverges*: each view gets its own inode number
  for it (the host's own, or one from the env's private range), and nothing about the name is
  cached, so every access revalidates and gets its own view's answer;
- below an env's private inode only that env's processes ever arrive (every other view parts
  at the diverged name). What there is upper-only — a tree the env made, like a venv, or
  copied up whole — changes only by the env's own requests, which the kernel sees: it is
  cached for long, as on agentfs's env mount (`private_policy`). What still shows host files
  (a private directory merged with the host's) is asked each time. A directory the host makes
  later at the path of one the env made is therefore not merged into the env's view while
  the kernel keeps its entries (the commit merges them as always).

Listings follow the same rule (`_listed_alike`): a directory that every view lists alike — a
shared one no env has a copy of in its upper, or an env's upper-only one — is listed once for
all (the kernel keeps the listing, FOPEN_CACHE_DIR), until a change to it by any view, which
the kernel sees, drops it; any other directory is listed for each open, in the caller's view.

Names start shared and diverge when an env first changes them. Changes that go through a
shared inode would leak through the shared kernel caches, so an env process that tries one
(open for writing, truncate, chmod/chown/utimes, xattrs, link, or renaming it away) on a shared
inode gets ESTALE once, after the name is marked *forced* (diverged for that env) and its cached
entry dropped: the kernel's path-based system calls then retry with a fresh lookup
(LOOKUP_REVAL), which now returns the env's own inode, and the change happens there. fd-based
calls on a shared inode (fchmod on a read-only fd) have no retry: they fail with ESTALE, never
leak. The root cannot diverge: an env's chmod or utimes of the root itself stays in its upper
(a commit carries it) but its view keeps showing the host's attributes of the root.

Changes the host makes are seen by every env that has not diverged the name (lower layer
semantics), and drop the env overlays' caches.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from isolated_agent.engines.filter.identity import Identity, Unclassifiable
from isolated_agent.fusefs.handles import Handles
from isolated_agent.fusefs.inodes import ROOT_INODE, OverlayInodeTable, RangeInodeTable
from isolated_agent.fusefs.model import (
    Attributes,
    Caller,
    Changes,
    Kernel,
    Listed,
    Opened,
    Policy,
    counted_entry,
    listed_entry,
)
from isolated_agent.overlay.copyup import FaultHook
from isolated_agent.overlay.layers import Layers
from isolated_agent.overlay.merge import Overlay
from isolated_agent.overlay.node import Key, Node
from isolated_agent.overlay.rename import RENAME_EXCHANGE, rename

log = logging.getLogger("agentfs.filter")

LONG = 24 * 3600.0  # cache lifetime of what every view sees alike (invalidated explicitly)

# Env views number their private inodes in [2^62, 2^62 + 2^61): 2^40 numbers per view.
_PRIVATE_BASE = 1 << 62
_PRIVATE_END = _PRIVATE_BASE + (1 << 61)
_VIEW_SHIFT = 40


@dataclass(frozen=True)
class Lifetime:
    """How long the kernel may keep a name and its attributes."""

    entry_timeout: float
    attr_timeout: float


CACHED = Lifetime(LONG, LONG)  # the same object in every view (or a directory in every view)
PER_VIEW = Lifetime(0.0, 0.0)  # resolves differently in some view


def private_policy(node: Node) -> Lifetime:
    """An env's private inode, or the names under a private directory `node`: only that env's
    processes reach them (every other view resolves the name where the views part to an
    inode of its own). Upper-only (made or copied up by the env, merged with nothing of the
    host's), only the env's own requests change them, and the kernel sees those: it may cache
    them as long as it likes. Anything that still shows the host's files changes with the
    host's, so it is asked each time."""
    return CACHED if node.upper_only else PER_VIEW


def _estale() -> OSError:
    return OSError(errno.ESTALE, os.strerror(errno.ESTALE))


def _eacces() -> OSError:
    return OSError(errno.EACCES, os.strerror(errno.EACCES))


@dataclass
class View:
    """One way of seeing the root: the host's, or one env's."""

    key: str | None  # env id; None: the host
    overlay: Overlay
    inodes: OverlayInodeTable
    # env views: host node of a shared inode -> this view's node for it, valid in one epoch
    shadows: dict[Node, Node] = field(default_factory=dict)
    shadows_epoch: int = -1
    # env views: (key of a shared parent directory, name) that must have a private inode
    forced: set[tuple[Key, bytes]] = field(default_factory=set)

    @property
    def is_host(self) -> bool:
        return self.key is None


@dataclass
class _Handle:
    view: View
    node: Node
    fd: int | None  # its own fd when opened for writing; None: reads use the node's reader


@dataclass
class _DirHandle:
    view: View
    node: Node
    kernel_inode: int


class FilterFileSystem:
    # No NFS export: the kernel never asks for "..". Handles: the filter must see opens.
    policy = Policy(handle_free=False, dot_lookup=False)

    def __init__(self, root_fd: int, identity: Identity, kernel: Kernel,
                 fault: FaultHook | None = None, keep_listings: bool = False) -> None:
        """`keep_listings`: whether OPENDIR may ask the kernel to keep a listing (the pyfuse3
        of packaging/pyfuse3: `replies.listing_cache_supported`)."""
        self.root_fd = root_fd
        self.kernel = kernel
        self.keep_listings = keep_listings
        self.identity = identity
        self.fault = fault
        work = os.dup(root_fd)  # never used: the host view has no lower to copy up from
        host_overlay = Overlay(Layers(upper=os.dup(root_fd), work=work, lowers=()), fault)
        self.host = View(None, host_overlay, OverlayInodeTable(host_overlay, first_slot=0))
        self.envs: dict[str, View] = {}
        self._by_index: dict[int, View] = {}
        self._next_index = 0
        self.epoch = 0  # bumped by every namespace change in any view: shadows go stale
        self._files: Handles[_Handle] = Handles()
        self._dirs: Handles[_DirHandle] = Handles()
        self._buffer = bytearray(1 << 20)
        host_overlay.on_stale_entry = self._host_stale_entry

    # -- envs -----------------------------------------------------------------------------------

    def add_env(self, env_id: str, upper: str, work: str, frozen: Sequence[str] = ()) -> None:
        """Serve env `env_id` (its upper and work dirs, and its frozen layers top first, by
        path: they are in the store, never under the root) to the processes the identity
        places in it."""
        if env_id in self.envs:
            return
        layers = Layers.open(upper, work, frozen, lower_fds=[self.root_fd])
        overlay = Overlay(layers, self.fault)
        index = self._next_index
        self._next_index += 1
        base = _PRIVATE_BASE + (index << _VIEW_SHIFT)
        view = View(env_id, overlay, RangeInodeTable(overlay, base))
        overlay.on_stale_entry = lambda parent, name: self._env_stale_entry(view, parent, name)
        self.envs[env_id] = view
        self._by_index[index] = view
        self._namespace_changed(None)
        self._invalidate_changed_names(view)

    def remove_env(self, env_id: str) -> None:
        """Stop serving an env (its jobs have ended). Inodes the kernel still holds for it
        answer ESTALE; names it diverged revalidate to the host's answer."""
        view = self.envs.pop(env_id, None)
        if view is None:
            return
        for index, candidate in list(self._by_index.items()):
            if candidate is view:
                del self._by_index[index]
        for handle in self._files:
            if handle.view is view and handle.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(handle.fd)
                handle.fd = None
        view.overlay.close()
        view.overlay.layers.close()
        self._namespace_changed(None)

    def _invalidate_changed_names(self, view: View) -> None:
        """A new env: what the kernel cached as the same in every view was decided without
        it, and its layers may already hold changes (a second run in an env, a checkpoint).
        Drop the cached entry of every name its upper or a frozen layer has."""
        layers = view.overlay.layers
        for layer in (layers.upper, *layers.lowers[:-1]):  # the last lower is the root
            self._invalidate_names_of(layer)

    def _invalidate_names_of(self, layer: int) -> None:
        for directory, dirnames, filenames, _ in os.fwalk(".", dir_fd=layer):
            host = self.host.overlay.root
            for name in os.fsencode(directory).split(b"/")[1:]:
                found = _lookup_or_none(self.host.overlay, host, name)
                if found is None:
                    break
                host = found
            else:
                if host.number or host is self.host.overlay.root:
                    inode = host.number or ROOT_INODE
                    for entry in (*dirnames, *filenames):
                        self.kernel.invalidate_entry(inode, os.fsencode(entry))
                continue
            dirnames.clear()  # the host has nothing here: the kernel cached nothing below

    # -- which view, which node -----------------------------------------------------------------

    def _view(self, caller: Caller) -> View:
        if not self.envs:
            return self.host
        try:
            key = self.identity.view_of(caller.pid)
        except Unclassifiable as e:
            log.warning("refused a request from pid %d: %s", caller.pid, e)
            raise _eacces() from None
        if key is None:
            return self.host
        view = self.envs.get(key)
        if view is None:  # registered as a job, but its env is gone: never the host view
            raise _eacces()
        return view

    def _owner(self, inode: int) -> View:
        """The view whose table numbered `inode`: an env's private range, else the host."""
        if _PRIVATE_BASE <= inode < _PRIVATE_END:
            view = self._by_index.get((inode - _PRIVATE_BASE) >> _VIEW_SHIFT)
            if view is None:
                raise _estale()
            return view
        return self.host

    def _node(self, view: View, inode: int) -> Node:
        """`view`'s node behind kernel inode `inode`; ESTALE when that inode shows another
        view's object (a stale dentry: path-based calls retry with a fresh lookup)."""
        owner = self._owner(inode)
        if owner is view:
            return view.inodes.get(inode)
        if owner.is_host:
            return self._shadow(view, self.host.inodes.get(inode))
        raise _estale()

    def _shadow(self, view: View, target: Node) -> Node:
        """An env view's node for a shared host node, found by walking down from its nearest
        ancestor already known in the env view (the root at worst), each step checked to be
        shared still; ESTALE if the env no longer sees it as shared."""
        root = self.host.overlay.root
        if target is root:
            return view.overlay.root
        self._expire_shadows(view)
        chain: list[Node] = []
        ancestor = target
        while ancestor is not root and ancestor not in view.shadows:
            if not ancestor.links or len(chain) > 4096:
                raise _estale()  # detached (unlinked while open), or no end to it
            chain.append(ancestor)
            ancestor = ancestor.links[0][0]
        host_node = ancestor
        node = view.overlay.root if ancestor is root else view.shadows[ancestor]
        for host_child in reversed(chain):
            name = host_child.links[0][1]
            child = _lookup_or_none(view.overlay, node, name)
            if _lookup_or_none(self.host.overlay, host_node, name) is not host_child or (
                not self._same(view, host_node, name, host_child, child)
            ):
                raise _estale()
            assert child is not None
            self._remember_shadow(view, host_child, child)
            host_node, node = host_child, child
        return node

    def _remember_shadow(self, view: View, host: Node, node: Node) -> None:
        """Keep `node` (and with it its parents) alive while it stands for `host`: the
        kernel holds the host's inode, not this view's node. The new reference is taken
        before stale shadows are let go: `node` may be one of them, held by nothing else."""
        view.overlay.ref(node)
        self._expire_shadows(view)
        if host in view.shadows:
            view.overlay.unref(node)  # remembered already in this epoch: held once is enough
        else:
            view.shadows[host] = node

    def _expire_shadows(self, view: View) -> None:
        if view.shadows_epoch == self.epoch:
            return
        shadows = list(view.shadows.values())
        view.shadows.clear()
        view.shadows_epoch = self.epoch
        for node in shadows:
            if not node.released:
                view.overlay.unref(node)

    def _same(
        self, view: View, host_parent: Node, name: bytes, host: Node | None, other: Node | None
    ) -> bool:
        """Whether an env view may share the host's inode for `name` under a shared dir."""
        if (host_parent.key, name) in view.forced:
            return False
        if host is None or other is None:
            return host is None and other is None
        if other.key == host.key:
            return True  # the very same object: the env never touched it
        if not (host.is_dir and other.is_dir):
            return False
        # A directory in both: shared unless the env's copy differs in what the host's
        # attributes would misreport (an earlier run changed its mode or owner).
        mine, theirs = self.host.overlay.getattr(host)[0], view.overlay.getattr(other)[0]
        return (mine.st_mode, mine.st_uid, mine.st_gid) == (
            theirs.st_mode, theirs.st_uid, theirs.st_gid)

    def _policy(
        self, host_parent: Node, name: bytes, host: Node | None, decided: View | None = None
    ) -> Lifetime:
        """How long the kernel may cache `name` under a shared directory: decided over every
        env view (but `decided`, known to share it), since a cached entry answers any
        process."""
        for view in self.envs.values():
            if view is decided:
                continue
            try:
                parent = self._shadow(view, host_parent)
            except OSError:
                continue  # this env does not reach the directory through the shared inode
            other = _lookup_or_none(view.overlay, parent, name)
            if not self._same(view, host_parent, name, host, other):
                return PER_VIEW
        return CACHED

    def _policy_of(self, inode: int) -> Lifetime:
        """The cache policy of an inode the kernel holds (for attribute replies)."""
        if not self._owner(inode).is_host:
            return PER_VIEW
        host = self.host.inodes.get(inode)
        if not self.envs or host is self.host.overlay.root:
            return CACHED
        if not host.links:
            return PER_VIEW  # detached (unlinked while open): ask each time
        parent, name = host.links[0]
        return self._policy(parent, name, host)

    # -- replies --------------------------------------------------------------------------------

    def _attributes(self, view: View, node: Node, inode: int, policy: Lifetime) -> Attributes:
        st, nlink = view.overlay.getattr(node)
        return Attributes(inode, st, policy.entry_timeout, policy.attr_timeout, nlink)

    def _attributes_of(self, inode: int, view: View, node: Node) -> Attributes:
        """The attributes of kernel inode `inode` as `view` may see them: a shared inode shows
        the host's (its one set of cached attributes serves every view; a directory an env
        merely created entries in shows the host's times), a private one the view's own."""
        if self._owner(inode).is_host:
            return self._attributes(self.host, self.host.inodes.get(inode), inode,
                                    self._policy_of(inode))
        return self._attributes(view, node, inode, private_policy(node))

    def _entry(self, view: View, node: Node, policy: Lifetime) -> Attributes:
        """An entry reply numbered by `view`'s table; the lookup count goes up once the reply
        is certain."""
        inode = view.inodes.number(node)
        return counted_entry(view.inodes, node,
                             lambda: self._attributes(view, node, inode, policy))

    def _resolve_entry(
        self, view: View, parent_inode: int, name: bytes
    ) -> tuple[View, Node | None, Lifetime]:
        """Who answers for `name` in `parent_inode`, as `view` sees it: (the view whose
        table numbers the answer, the node or None, the cache policy)."""
        owner = self._owner(parent_inode)
        if not owner.is_host:  # a private directory: everything below it is private too
            if owner is not view:
                raise _estale()
            parent = view.inodes.get(parent_inode)
            return view, _lookup_or_none(view.overlay, parent, name), private_policy(parent)
        host_parent = self.host.inodes.get(parent_inode)
        host = _lookup_or_none(self.host.overlay, host_parent, name)
        if view.is_host:
            return self.host, host, self._policy(host_parent, name, host)
        parent = self._shadow(view, host_parent)
        other = _lookup_or_none(view.overlay, parent, name)
        if not self._same(view, host_parent, name, host, other):
            return view, other, PER_VIEW
        if host is not None and other is not None:
            self._remember_shadow(view, host, other)
        return self.host, host, self._policy(host_parent, name, host, decided=view)

    # -- keeping the kernel's caches honest -----------------------------------------------------

    def _namespace_changed(self, by: View | None) -> None:
        self.epoch += 1
        if by is not None and by.is_host:  # the envs' lower changed under them
            for view in self.envs.values():
                view.overlay.namespace_changed()

    def _data_changed(self, by: View) -> None:
        if by.is_host:
            for view in self.envs.values():
                view.overlay.changed()

    def _host_stale_entry(self, parent: Node, name: bytes) -> None:
        if parent.number:
            self.kernel.invalidate_entry(parent.number, name)

    def _env_stale_entry(self, view: View, parent: Node, name: bytes) -> None:
        """An env's change made `name` mean something else (a broken hard link): its cached
        entry, whichever inode shows it to the kernel, must go."""
        inode = parent.number or self._shared_inode_of(view, parent)
        if inode:
            self.kernel.invalidate_entry(inode, name)

    def _shared_inode_of(self, view: View, node: Node) -> int:
        if node is view.overlay.root:
            return ROOT_INODE
        if view.shadows_epoch == self.epoch:
            for host, shadow in view.shadows.items():
                if shadow is node:
                    return host.number
        return 0

    def _diverge(self, view: View, inode: int) -> OSError:
        """`view` is about to change the object behind shared inode `inode`: give the env its
        own inode for every name of it, and answer ESTALE so that the system call retries with
        a fresh lookup (see the module docstring)."""
        for parent, name in self.host.inodes.get(inode).links:
            self._force(view, parent, name)
        return _estale()

    def _diverge_name(self, view: View, parent_inode: int, name: bytes) -> bool:
        """Before an env renames `name` away: if the kernel shows it through a shared inode,
        force it private (and answer ESTALE, by the caller). True when it did."""
        if view.is_host or not self._owner(parent_inode).is_host:
            return False
        host_parent = self.host.inodes.get(parent_inode)
        host = _lookup_or_none(self.host.overlay, host_parent, name)
        other = _lookup_or_none(view.overlay, self._shadow(view, host_parent), name)
        if other is None or not self._same(view, host_parent, name, host, other):
            return False
        self._force(view, host_parent, name)
        return True

    def _force(self, view: View, host_parent: Node, name: bytes) -> None:
        """From now on `view` gets its own inode for `name`; the kernel's cached entry goes."""
        view.forced.add((host_parent.key, name))
        if host_parent.number:
            self.kernel.invalidate_entry(host_parent.number, name)
        self._namespace_changed(view)

    def _changes_shared(self, view: View, inode: int) -> bool:
        """Whether an env is about to change the object behind a shared inode (whose data,
        attributes and page cache every view shares in the kernel). The root cannot become
        private: an env's change to its attributes stays in the env's upper, unseen."""
        return not view.is_host and self._owner(inode).is_host and inode != ROOT_INODE

    # -- lookups and attributes -----------------------------------------------------------------

    def lookup(self, parent_inode: int, name: bytes, caller: Caller) -> Attributes:
        view = self._view(caller)
        owner, node, policy = self._resolve_entry(view, parent_inode, name)
        if node is None:
            if policy is CACHED:
                return Attributes.negative(LONG)  # remembered as missing, for every view alike
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return self._entry(owner, node, policy)

    def forget(self, inode: int, count: int) -> bool:
        try:
            table = self._owner(inode).inodes
        except OSError:
            return True  # an env view that is gone: its inodes went with it
        return table.forget(inode, count)

    def getattr(self, inode: int, caller: Caller) -> Attributes:
        view = self._view(caller)
        return self._attributes_of(inode, view, self._node(view, inode))

    def setattr(self, inode: int, changes: Changes, fh: int | None,
                caller: Caller) -> Attributes:
        handle = self._files.get(fh)
        if handle is not None:  # ftruncate: the handle knows its view
            view, node = handle.view, handle.node
        else:
            view = self._view(caller)
            node = self._node(view, inode)
            if self._changes_shared(view, inode):
                raise self._diverge(view, inode)
        view.overlay.setattr(node, size=changes.size, mode=changes.mode, uid=changes.uid,
                             gid=changes.gid, atime_ns=changes.atime_ns,
                             mtime_ns=changes.mtime_ns)
        self._data_changed(view)
        return self._attributes_of(inode, view, node)

    def readlink(self, inode: int, caller: Caller) -> bytes:
        view = self._view(caller)
        return view.overlay.readlink(self._node(view, inode))

    def statfs(self, caller: Caller) -> os.statvfs_result:
        return os.statvfs(self.root_fd)

    # -- creating and removing ------------------------------------------------------------------

    def _parent(self, view: View, inode: int) -> Node:
        node = self._node(view, inode)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return node

    def _created(self, view: View, parent_inode: int, name: bytes, node: Node) -> Attributes:
        """The entry for something `view` just made at `name`."""
        self._namespace_changed(view)
        parent_owner = self._owner(parent_inode)
        if view.is_host and parent_owner.is_host:
            policy = self._policy(self.host.inodes.get(parent_inode), name, node)
            return self._entry(self.host, node, policy)
        if parent_owner.is_host:  # a name where the views part
            return self._entry(view, node, PER_VIEW)
        return self._entry(view, node, private_policy(self._node(view, parent_inode)))

    def _create_with(
        self, parent_inode: int, name: bytes, caller: Caller,
        make: Callable[[Overlay, Node, tuple[int, int]], Node],
    ) -> Attributes:
        view = self._view(caller)
        parent = self._parent(view, parent_inode)
        node = make(view.overlay, parent, (caller.uid, caller.gid))
        return self._created(view, parent_inode, name, node)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
              caller: Caller) -> Attributes:
        return self._create_with(parent, name, caller,
                                 lambda ov, p, owner: ov.mknod(p, name, mode, rdev, owner))

    def mkdir(self, parent: int, name: bytes, mode: int, caller: Caller) -> Attributes:
        return self._create_with(parent, name, caller,
                                 lambda ov, p, owner: ov.mkdir(p, name, mode, owner))

    def symlink(self, parent: int, name: bytes, target: bytes, caller: Caller) -> Attributes:
        return self._create_with(parent, name, caller,
                                 lambda ov, p, owner: ov.symlink(p, name, target, owner))

    def link(self, inode: int, new_parent: int, new_name: bytes, caller: Caller) -> Attributes:
        view = self._view(caller)
        node = self._node(view, inode)
        if self._changes_shared(view, inode):
            raise self._diverge(view, inode)
        parent = self._parent(view, new_parent)
        return self._created(view, new_parent, new_name,
                             view.overlay.link(node, parent, new_name))

    def unlink(self, parent: int, name: bytes, caller: Caller) -> None:
        view = self._view(caller)
        view.overlay.unlink(self._parent(view, parent), name)
        self._namespace_changed(view)

    def rmdir(self, parent: int, name: bytes, caller: Caller) -> None:
        view = self._view(caller)
        view.overlay.rmdir(self._parent(view, parent), name)
        self._namespace_changed(view)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int, caller: Caller) -> None:
        view = self._view(caller)
        # The kernel moves the source's dentry (both, for an exchange): it must not be one
        # that other views share.
        moved = self._diverge_name(view, old_parent, old_name)
        if flags & RENAME_EXCHANGE:
            moved = self._diverge_name(view, new_parent, new_name) or moved
        if moved:
            raise _estale()
        rename(view.overlay, self._parent(view, old_parent), old_name,
               self._parent(view, new_parent), new_name, flags)
        self._namespace_changed(view)
        if view.is_host and self.envs:
            # The moved dentry keeps the source's cache lifetime; if an env sees something
            # else at the new name, the kernel must ask again.
            self.kernel.invalidate_entry(new_parent, new_name)

    # -- files ----------------------------------------------------------------------------------

    def _opened(self, view: View, node: Node, fd: int | None, private: bool) -> Opened:
        handle = self._files.add(_Handle(view, node, fd))
        view.overlay.ref(node)
        # The page cache belongs to the kernel inode: keep it across opens unless the inode
        # is an env's private view of a host file the host may change behind it.
        return Opened(handle, keep_cache=not (private and not node.in_upper))

    def open(self, inode: int, flags: int, caller: Caller) -> Opened:
        view = self._view(caller)
        node = self._node(view, inode)
        private = not view.is_host and not self._owner(inode).is_host
        if flags & os.O_ACCMODE == os.O_RDONLY and not flags & os.O_TRUNC:
            # Nothing to open yet: the kernel checked the permissions, and a second open of a
            # file is usually served from the page cache; the first READ opens the reader.
            return self._opened(view, node, None, private)
        if self._changes_shared(view, inode):
            raise self._diverge(view, inode)
        fd = view.overlay.open(node, flags)
        self._data_changed(view)
        return self._opened(view, node, fd, private)

    def create(self, parent: int, name: bytes, mode: int, flags: int,
               caller: Caller) -> tuple[Opened, Attributes]:
        view = self._view(caller)
        directory = self._parent(view, parent)
        node, fd = view.overlay.create(directory, name, mode, flags, (caller.uid, caller.gid))
        try:
            attributes = self._created(view, parent, name, node)
        except BaseException:
            os.close(fd)
            raise
        return self._opened(view, node, fd, not view.is_host), attributes

    def read(self, fh: int, offset: int, size: int) -> memoryview:
        handle = self._files[fh]
        fd = handle.fd if handle.fd is not None else handle.view.overlay.reader(handle.node)
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        view = memoryview(self._buffer)[:size]
        return view[: os.preadv(fd, [view], offset)]

    def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self._files[fh]
        if handle.fd is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        written = os.pwrite(handle.fd, data, offset)
        handle.view.overlay.changed()
        self._data_changed(handle.view)
        return written

    def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._files[fh]
        if handle.fd is not None:
            (os.fdatasync if datasync else os.fsync)(handle.fd)

    def release(self, fh: int) -> None:
        handle = self._files.pop(fh)
        try:
            if handle.fd is not None:
                os.close(handle.fd)
        finally:
            if not handle.node.released:
                handle.view.overlay.unref(handle.node)

    # -- directories ----------------------------------------------------------------------------

    def opendir(self, inode: int, caller: Caller) -> Opened:
        view = self._view(caller)
        node = self._parent(view, inode)
        handle = self._dirs.add(_DirHandle(view, node, inode))
        view.overlay.ref(node)
        alike = self.keep_listings and self._listed_alike(inode)
        return Opened(handle, keep_cache=alike, cache_readdir=alike)

    def _listed_alike(self, inode: int) -> bool:
        """Whether every process that can list directory `inode` gets the same listing (the
        same names, numbered alike), so that the kernel may keep it for all (FOPEN_CACHE_DIR).

        A shared directory is listed alike when every env sees the host's directory itself
        there, with no copy of it in its upper or a frozen layer (its names are then the
        host's, and each is shared: nothing under it diverged) and no env forced a name of it
        private. An env's private directory is listed only by that env;
        when it is upper-only, only the env's own requests change it. Whatever changes a
        listing later reaches the kernel through this inode (a create, unlink or rename in it,
        by any view), which drops the kept listing; an env's first change under a directory
        copies the directory up first, so the next OPENDIR answers "not alike"."""
        owner = self._owner(inode)
        if not owner.is_host:
            return owner.inodes.get(inode).upper_only
        host = self.host.inodes.get(inode)
        for view in self.envs.values():
            try:
                node = self._shadow(view, host)
            except OSError:
                return False
            if node.key != host.key or any(key == host.key for key, _ in view.forced):
                return False
        return True

    def listing(self, fh: int) -> Sequence[bytes]:
        handle = self._dirs[fh]
        return [b".", b"..", *handle.view.overlay.listdir(handle.node)]

    def listed(self, fh: int, name: bytes) -> Listed | None:
        """Each listed name is numbered and kept by the same per-name rules as a lookup."""
        handle = self._dirs[fh]
        view, directory = handle.view, handle.node
        if name in (b".", b".."):  # not linked by the kernel: type and number only
            inode = handle.kernel_inode if name == b"." else self._parent_inode(handle)
            return Listed(self._attributes(view, directory, inode, PER_VIEW))
        try:
            owner, node, policy = self._resolve_entry(view, handle.kernel_inode, name)
        except OSError:
            return None
        if node is None:
            return None  # removed since the listing was taken
        inode = owner.inodes.number(node)
        return listed_entry(owner.inodes, node,
                            lambda: self._attributes(owner, node, inode, policy))

    def _parent_inode(self, handle: _DirHandle) -> int:
        """The number `..` shows in a listing (the kernel itself never asks for it)."""
        view, inode = handle.view, handle.kernel_inode
        if self._owner(inode).is_host:
            parent = self.host.overlay.parent_of(self.host.inodes.get(inode))
            number = self.host.inodes.number(parent)
            self.host.inodes.unused(parent)
            return number
        parent = view.overlay.parent_of(handle.node)
        return parent.number or self._shared_inode_of(view, parent) or inode

    def releasedir(self, fh: int) -> None:
        handle = self._dirs.pop(fh)
        if not handle.node.released:
            handle.view.overlay.unref(handle.node)

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self._dirs[fh]
        handle.view.overlay.fsync_dir(handle.node)

    # -- xattrs ---------------------------------------------------------------------------------

    def getxattr(self, inode: int, name: bytes, caller: Caller) -> bytes:
        view = self._view(caller)
        return view.overlay.getxattr(self._node(view, inode), name)

    def listxattr(self, inode: int, caller: Caller) -> Sequence[bytes]:
        view = self._view(caller)
        return view.overlay.listxattr(self._node(view, inode))

    def _xattr_target(self, inode: int, caller: Caller) -> tuple[View, Node]:
        view = self._view(caller)
        node = self._node(view, inode)
        if self._changes_shared(view, inode):
            raise self._diverge(view, inode)
        return view, node

    def setxattr(self, inode: int, name: bytes, value: bytes, caller: Caller) -> None:
        view, node = self._xattr_target(inode, caller)
        view.overlay.setxattr(node, name, value)

    def removexattr(self, inode: int, name: bytes, caller: Caller) -> None:
        view, node = self._xattr_target(inode, caller)
        view.overlay.removexattr(node, name)

    # -- end ------------------------------------------------------------------------------------

    def close(self) -> None:
        """After the session ended: close everything."""
        for handle in self._files:
            if handle.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(handle.fd)
        self._files.clear()
        self._dirs.clear()
        for view in [self.host, *self.envs.values()]:
            view.overlay.close()
            view.overlay.layers.close()


def _lookup_or_none(overlay: Overlay, parent: Node, name: bytes) -> Node | None:
    try:
        return overlay.lookup(parent, name)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
