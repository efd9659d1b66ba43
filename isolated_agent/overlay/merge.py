"""The merged view: the overlay rules of DESIGN §5 over an upper layer and lower layers.

This module is the whole overlay; a FUSE adapter (or a test) drives it. It never imports a FUSE
library, raises `OSError` with the errno a caller should see, and reaches every layer object
through descriptors (`Layers`, `Node`). It is not thread-safe: one operation at a time.

Rules, in the order of DESIGN §5:

1. new entries go to upper (parents copied up first, with their lower modes and times);
2. copy-up on write intent only: open for writing or with O_TRUNC, setattr, xattr changes,
   link; read-only access never copies up (`copy_up`, module `copyup`);
3. removing an entry that a lower layer shows leaves a whiteout; removing an upper-only entry
   removes it; rmdir of a directory whose *merged* listing is not empty is ENOTEMPTY;
4. a create over a whiteout replaces the whiteout atomically (built in the work dir and
   renamed over it), so it is a fresh entry; a directory made there is opaque;
5. listing = upper ∪ lowers − whiteouts, each name once, first layer wins (`listdir`);
6. to 9. rename: see `rename.py`;
10. link, symlink, mknod, xattrs (the overlay's own `user.overlay.*` are hidden) pass through;
11. fail closed: every failure is an OSError to the caller, and upper is left as it was.

Identity: two lookups that reach the same topmost object return the same `Node` (the index is
keyed by `(st_dev, st_ino)`), so hard links and cached handles agree. A node keeps its `origin`
(the identity it was first seen with) across copy-up, which is what makes inode numbers stable.

Caches, valid because the overlay is the only writer of its layers while in use (the same
contract as the kernel caching mode, `fusefs/cache.py`): a directory's merged listing and
the nodes its names resolved to are kept until the namespace changes — any create, remove or
rename anywhere bumps `generation`, which drops them all (children are held weakly: a cache
never keeps a node alive). A node's fd for reading (or for reading and writing: `writer`) is
kept for the next request, at most `MAX_READERS` of them (fewer under a low RLIMIT_NOFILE), and
dropped when the node is copied up. Non-directories' O_PATH fds are opened on demand and at
most `max_path_fds` stay open.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import stat
import weakref
from collections import OrderedDict
from collections.abc import Callable

from isolated_agent.overlay.copyup import (
    FaultHook,
    copy_up_object,
    open_for_reading,
    remove_temp,
    set_owner,
    temp_name,
)
from isolated_agent.overlay.format import (
    fd_path,
    is_opaque_fd,
    is_private_xattr,
    is_whiteout_stat,
    make_opaque_fd,
    make_whiteout_at,
)
from isolated_agent.overlay.layers import Layers
from isolated_agent.overlay.node import Key, Node
from isolated_agent.system import libc

_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# Flags that made sense to the caller's open(2) but not to our reopen of a resolved object.
_REOPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_APPEND
NAME_MAX = 255
MAX_READERS = 1024

# Told when a name stops meaning what the kernel may have cached for it (the adapter turns
# this into a cache invalidation): (parent, name).
StaleEntryHook = Callable[[Node, bytes], None]


def oserror(code: int, name: bytes | None = None) -> OSError:
    return OSError(code, os.strerror(code), os.fsdecode(name) if name is not None else None)


def fstatat(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino)


class Overlay:
    def __init__(self, layers: Layers, fault: FaultHook | None = None) -> None:
        self.layers = layers
        self.fault = fault
        self.on_stale_entry: StaleEntryHook | None = None
        self.index: dict[Key, Node] = {}
        self.origins: dict[Key, Key] = {}  # upper object made by a copy-up -> its origin
        self.euid, self.egid = os.geteuid(), os.getegid()
        self.generation = 0  # bumped by every change of the namespace: see the caches above
        self.change_mark = 0  # bumped by every change at all (`changed`)
        self._readers: OrderedDict[Node, None] = OrderedDict()
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_readers = max(16, min(MAX_READERS, soft_limit // 8))
        self.max_path_fds = max(64, soft_limit // 4)
        self._path_fds: OrderedDict[Node, None] = OrderedDict()
        self.root = self._make_root()

    def _make_root(self) -> Node:
        upper = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.layers.upper)
        opaque = is_opaque_fd(upper)
        lowers = []
        if not opaque:  # the root merges every lower root, as the kernel's does
            for fd in self.layers.lowers:
                lowers.append(os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd))
        st = os.fstat(upper)
        root = Node(stat.S_IFDIR, upper, lowers, _key(st), opaque)
        root.refs = 1  # never released
        self.index[root.key] = root
        return root

    def close(self) -> None:
        for node in list(self.index.values()):
            node.close_fds()
        self.index.clear()

    # -- lifetime -------------------------------------------------------------------------------

    def ref(self, node: Node) -> None:
        assert not node.released, f"reference to a released node {node!r}"
        node.refs += 1

    def unref(self, node: Node) -> None:
        stack = [node]
        while stack:
            current = stack.pop()
            current.refs -= 1
            assert current.refs >= 0, f"negative reference count on {current!r}"
            if current.refs == 0:
                stack.extend(self._release(current))

    def _release(self, node: Node) -> list[Node]:
        """Close a node; return the parents whose references it held."""
        if node is self.root:
            return []
        node.released = True
        self._readers.pop(node, None)
        self._path_fds.pop(node, None)
        if self.index.get(node.key) is node:
            del self.index[node.key]
        node.close_fds()
        parents = [parent for parent, _ in node.links]
        node.links = []
        return parents

    def _add_link(self, node: Node, parent: Node, name: bytes) -> None:
        if node is self.root:
            return
        for p, n in node.links:
            if p is parent and n == name:
                return
        node.links.append((parent, name))
        parent.refs += 1

    def _remove_link(self, node: Node, parent: Node, name: bytes) -> None:
        for i, (p, n) in enumerate(node.links):
            if p is parent and n == name:
                del node.links[i]
                self.unref(parent)
                return

    # -- lookup ---------------------------------------------------------------------------------

    def lookup(self, parent: Node, name: bytes) -> Node:
        """The node `name` shows in directory `parent`; FileNotFoundError when none."""
        if parent.cache_generation == self.generation:
            known = parent.children.get(name)
            node = known() if known is not None else None
            if node is not None and not node.released:
                return node  # its link to parent is there: links change with the namespace
        else:
            self._reset_cache(parent)
        node = self._resolve(parent, name)
        self._add_link(node, parent, name)
        parent.children[name] = weakref.ref(node)
        return node

    def _reset_cache(self, directory: Node) -> None:
        directory.cache_generation = self.generation
        directory.listing = None
        directory.children = {}

    def freeze_upper(self, new_upper: int) -> None:
        """The upper layer became a frozen one (a live checkpoint, env/stack.py): from now on
        `new_upper` (an O_PATH fd of an empty directory) is the upper, and the old upper the
        topmost lower. The view does not change. Every node that lived in the old upper shows
        it as its lower object from now on, so the next change to it copies it up into the new
        one; no fd that could write into the frozen layer stays open (the readers go)."""
        old = self.layers.upper
        self.layers.upper = new_upper
        self.layers.lowers = (old, *self.layers.lowers)
        for node in list(self.index.values()):
            self._drop_reader(node)
            if node.is_dir:
                if node.upper is not None:
                    node.lowers = [node.upper] if node.opaque else [node.upper, *node.lowers]
                    node.upper = None
                    node.opaque = False
            elif node.home_upper:
                if node.upper is not None:
                    node.lowers = [node.upper]
                    node.upper = None
                node.home_upper = False
        self.root.upper = os.open(".", _PATH_FLAGS, dir_fd=new_upper)
        self.namespace_changed()

    def namespace_changed(self) -> None:
        """Some name now means something else: every cached listing and lookup is stale."""
        self.generation += 1
        self.change_mark += 1

    def changed(self) -> None:
        """Something may have changed (data, attributes): no stat taken before is current."""
        self.change_mark += 1

    def held_lookup(self, parent: Node, name: bytes) -> Node:
        """`lookup`, with a reference the caller must drop (`unref`): a node an operation
        works on must not be released under it (by a child letting go of its link)."""
        node = self.lookup(parent, name)
        self.ref(node)
        return node

    def parent_of(self, node: Node) -> Node:
        return node.links[0][0] if node.links else self.root

    def _resolve(self, parent: Node, name: bytes) -> Node:
        if not parent.is_dir:
            raise oserror(errno.ENOTDIR, name)
        if len(name) > NAME_MAX:
            raise oserror(errno.ENAMETOOLONG, name)
        if self.fault is not None:
            self.fault("lookup", name)
        if parent.upper is not None:
            st = fstatat(parent.upper, name)
            if st is not None:
                if is_whiteout_stat(st):
                    raise oserror(errno.ENOENT, name)
                return self._upper_node(parent, name, st)
        for i, lower in enumerate(parent.lowers):
            st = fstatat(lower, name)
            if st is None:
                continue
            if is_whiteout_stat(st):
                raise oserror(errno.ENOENT, name)
            existing = self.index.get(_key(st))
            if existing is not None:
                return existing
            if not stat.S_ISDIR(st.st_mode):
                return self._new(st, None, [])  # its fd opens when needed (path_fd)
            fd = os.open(name, _PATH_FLAGS, dir_fd=lower)
            deeper = parent.lowers[i + 1 :]
            lowers = [fd]
            if deeper and not is_opaque_fd(fd):
                lowers += self._lower_dirs(deeper, name)
            return self._new(st, None, lowers)
        raise oserror(errno.ENOENT, name)

    def _upper_node(self, parent: Node, name: bytes, st: os.stat_result) -> Node:
        existing = self.index.get(_key(st))
        if existing is not None:
            return existing
        if not stat.S_ISDIR(st.st_mode):
            return self._new(st, None, [], home_upper=True)
        fd = os.open(name, _PATH_FLAGS, dir_fd=parent.upper)
        opaque = is_opaque_fd(fd)
        lowers = [] if opaque else self._lower_dirs(parent.lowers, name)
        return self._new(st, fd, lowers, opaque)

    def _lower_dirs(self, lower_fds: list[int], name: bytes) -> list[int]:
        """The lower directories merged under `name`: down to the first non-directory,
        whiteout or opaque directory."""
        result: list[int] = []
        for i, lower in enumerate(lower_fds):
            st = fstatat(lower, name)
            if st is None:
                continue
            if not stat.S_ISDIR(st.st_mode):
                break
            fd = os.open(name, _PATH_FLAGS, dir_fd=lower)
            result.append(fd)
            if i + 1 < len(lower_fds) and is_opaque_fd(fd):
                break
        return result

    def _new(
        self,
        st: os.stat_result,
        upper: int | None,
        lowers: list[int],
        opaque: bool = False,
        home_upper: bool = False,
    ) -> Node:
        key = _key(st)
        node = Node(stat.S_IFMT(st.st_mode), upper, lowers, key, opaque, self.origins.get(key, key))
        node.home_upper = home_upper or upper is not None
        node.fresh, node.fresh_mark = st, self.change_mark
        self.index[key] = node
        return node

    # -- descriptors of non-directories -----------------------------------------------------

    def path_fd(self, node: Node) -> int:
        """The O_PATH fd of the entry's topmost object, opened through one of its names if
        it is closed. A non-directory's fd is one of at most `max_path_fds` kept open."""
        if node.is_dir:
            return node.fd
        if node.upper is not None or node.lowers:
            if node in self._path_fds:
                self._path_fds.move_to_end(node)
            return node.fd
        fd = self._reopen(node)
        if node.home_upper:
            node.upper = fd
        else:
            node.lowers = [fd]
        self._path_fds[node] = None
        while len(self._path_fds) > self.max_path_fds:
            oldest = next(iter(self._path_fds))
            if oldest is node:
                break
            self._close_path_fd(oldest)
        return fd

    def _reopen(self, node: Node) -> int:
        for parent, name in node.links:
            candidates = [parent.upper] if node.home_upper else parent.lowers
            for layer in candidates:
                if layer is None:
                    continue
                st = fstatat(layer, name)
                if st is not None and _key(st) == node.key:
                    return os.open(name, _PATH_FLAGS, dir_fd=layer)
                if st is not None:
                    break  # another object has that name: look no deeper
        raise oserror(errno.ESTALE)  # no name reaches it any more (an unlinked file)

    def _close_path_fd(self, node: Node) -> None:
        self._path_fds.pop(node, None)
        if not node.links:
            return  # could not be reopened: keep it (an unlinked file still open)
        for fd in ([node.upper] if node.upper is not None else []) + node.lowers:
            with contextlib.suppress(OSError):
                os.close(fd)
        node.upper = None
        node.lowers = []

    def lower_entry_exists(self, parent: Node, name: bytes) -> bool:
        """Whether a lower layer shows something at `name` under `parent`: then removing or
        moving away the entry there needs a whiteout, and a directory put there must be
        opaque."""
        for lower in parent.lowers:
            st = fstatat(lower, name)
            if st is not None:
                return not is_whiteout_stat(st)
        return False

    # -- reading --------------------------------------------------------------------------------

    def getattr(self, node: Node) -> tuple[os.stat_result, int]:
        """The attributes the merged view shows, and the link count to report: 1 for a
        directory merged from several layers (as the kernel's overlayfs; `find` and friends
        read it as "unknown")."""
        if node.fresh is not None and node.fresh_mark == self.change_mark:
            st = node.fresh
        else:
            st = os.fstat(self.path_fd(node))
        node.fresh = None
        layers = len(node.lowers) + (node.upper is not None)
        nlink = 1 if node.is_dir and layers > 1 else st.st_nlink
        return st, nlink

    def listdir(self, node: Node) -> list[bytes]:
        """Upper ∪ lowers − whiteouts, each name once, upper's first (without . and ..)."""
        if not node.is_dir:
            raise oserror(errno.ENOTDIR)
        if node.cache_generation != self.generation:
            self._reset_cache(node)
        if node.listing is None:
            node.listing = self._merged_listing(node)
        return node.listing

    def _merged_listing(self, node: Node) -> list[bytes]:
        layers = ([node.upper] if node.upper is not None else []) + node.lowers
        names: dict[bytes, None] = {}
        hidden: set[bytes] = set()
        for fd in layers:
            for name, is_whiteout in _scan(fd):
                if name in names or name in hidden:
                    continue
                if is_whiteout:
                    hidden.add(name)
                else:
                    names[name] = None
        return list(names)

    def is_empty_dir(self, node: Node) -> bool:
        return not self.listdir(node)

    def readlink(self, node: Node) -> bytes:
        if node.file_type != stat.S_IFLNK:
            raise oserror(errno.EINVAL)
        return os.readlink(b"", dir_fd=self.path_fd(node))

    def open(self, node: Node, flags: int, via: tuple[Node, bytes] | None = None) -> int:
        """A real fd for reading/writing the entry; copies up on write intent first."""
        if node.is_dir:
            raise oserror(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self.copy_up(node, with_data=not flags & os.O_TRUNC, via=via)
        if not node.in_upper:  # read-only, not copied up: the lower file, never written
            return open_for_reading(self.path_fd(node))
        return os.open(fd_path(self.path_fd(node)), (flags & ~_REOPEN_DROP) | os.O_CLOEXEC)

    def reader(self, node: Node) -> int:
        """A shared fd of the entry as it is now (follows copy-up): for reads that do not
        need a descriptor of their own."""
        if node.reader is None:
            return self._keep_reader(node, open_for_reading(self.path_fd(node)))
        self._readers.move_to_end(node)
        return node.reader

    def writer(self, node: Node) -> int:
        """A shared O_RDWR fd of the entry in upper (copied up first): for writes that arrive
        without a descriptor of their own (agentfs in the kernel's no-open mode). It serves
        as the node's reader too until it is dropped."""
        if node.reader_writes and node.reader is not None:
            self._readers.move_to_end(node)
            return node.reader
        self.copy_up(node)
        self._drop_reader(node)
        fd = self._keep_reader(node, _open_for_writing(fd_path(self.path_fd(node))))
        node.reader_writes = True
        return fd

    def _keep_reader(self, node: Node, fd: int) -> int:
        node.reader = fd
        self._readers[node] = None
        if len(self._readers) > self.max_readers:
            oldest, _ = self._readers.popitem(last=False)
            self._drop_reader(oldest)
        return fd

    def _drop_reader(self, node: Node) -> None:
        if node.reader is not None:
            with contextlib.suppress(OSError):
                os.close(node.reader)
            node.reader = None
            node.reader_writes = False
        self._readers.pop(node, None)

    def fsync_dir(self, node: Node) -> None:
        """fsync a directory's upper part (the only part the overlay writes)."""
        if node.upper is None:
            return
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.upper)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.layers.upper)

    # -- xattrs ---------------------------------------------------------------------------------

    def getxattr(self, node: Node, name: bytes) -> bytes:
        if is_private_xattr(name):
            raise oserror(errno.ENODATA)
        path, follow = self._xattr_path(node)
        return os.getxattr(path, name, follow_symlinks=follow)

    def listxattr(self, node: Node) -> list[bytes]:
        path, follow = self._xattr_path(node)
        names = os.listxattr(path, follow_symlinks=follow)
        return [os.fsencode(n) for n in names if not is_private_xattr(n)]

    def setxattr(self, node: Node, name: bytes, value: bytes, flags: int = 0) -> None:
        if is_private_xattr(name):
            raise oserror(errno.EPERM)
        self.copy_up(node)
        self.changed()
        path, follow = self._xattr_path(node)
        os.setxattr(path, name, value, flags, follow_symlinks=follow)

    def removexattr(self, node: Node, name: bytes) -> None:
        if is_private_xattr(name):
            raise oserror(errno.EPERM)
        if not node.in_upper:
            self.getxattr(node, name)  # ENODATA: fail before copying anything up
        self.copy_up(node)
        self.changed()
        path, follow = self._xattr_path(node)
        os.removexattr(path, name, follow_symlinks=follow)

    def _xattr_path(self, node: Node) -> tuple[str, bool]:
        """The object itself (through its fd's magic link, which must be followed); a symlink
        through its parent directory, so the link itself is not followed."""
        if node.file_type != stat.S_IFLNK:
            return fd_path(self.path_fd(node)), True
        parent, name = self._any_link(node)
        layer_fd = self._layer_dir_holding(parent, name)
        return fd_path(layer_fd) + "/" + os.fsdecode(name), False

    def _layer_dir_holding(self, parent: Node, name: bytes) -> int:
        for fd in ([parent.upper] if parent.upper is not None else []) + parent.lowers:
            if fstatat(fd, name) is not None:
                return fd
        raise oserror(errno.ENOENT, name)

    # -- copy-up --------------------------------------------------------------------------------

    def _any_link(self, node: Node) -> tuple[Node, bytes]:
        if not node.links:
            raise oserror(errno.ESTALE)  # unlinked, or its last name moved away: unreachable
        return node.links[0]

    def ensure_upper(self, directory: Node) -> None:
        """Copy up `directory` and every ancestor not in upper yet, outermost first."""
        chain = []
        current = directory
        while current.upper is None:
            chain.append(current)
            current = self._any_link(current)[0]
        for node in reversed(chain):
            self.copy_up(node)

    def copy_up(
        self, node: Node, with_data: bool = True, via: tuple[Node, bytes] | None = None
    ) -> None:
        """Put `node` in upper (at `via` or any name it is known by). A directory is copied
        alone, and stays merged with its lowers."""
        if node.in_upper:
            return
        if via is None and not node.links and not node.is_dir:
            self._copy_up_unnamed(node)
            return
        parent, name = via if via is not None else self._any_link(node)
        self.ensure_upper(parent)
        assert parent.upper is not None
        existing = fstatat(parent.upper, name)
        if existing is not None and not is_whiteout_stat(existing):
            # Already there: a directory rename copied it up beneath a node the kernel knew.
            fd = os.open(name, _PATH_FLAGS, dir_fd=parent.upper)
        else:
            source = self.path_fd(node)
            st = os.fstat(source)
            parent_st = os.fstat(parent.upper)
            fd = copy_up_object(source, st, self.layers.work, parent.upper, name,
                                with_data=with_data, fault=self.fault)
            _restore_times(parent.upper, parent_st)  # the kernel keeps the parent's times too
        self._adopt_upper(node, fd)
        if not node.is_dir:
            # Other names of a lower hard link still show the lower file: the link is broken
            # by copy-up, as in the kernel's overlayfs without an index.
            for other_parent, other_name in list(node.links):
                if other_parent is parent and other_name == name:
                    continue
                self._remove_link(node, other_parent, other_name)
                self.namespace_changed()
                if self.on_stale_entry is not None:
                    self.on_stale_entry(other_parent, other_name)

    def _copy_up_unnamed(self, node: Node) -> None:
        """Copy up a file no name reaches any more: deleted from the view while still open
        for writing. agentfs in handle-free mode sees no open, so nothing copied it up then;
        its first write does now, to a copy that has no name either (made in the work dir,
        then unlinked: the kernel's overlayfs writes to its copy in that case too)."""
        source = self.path_fd(node)
        name = temp_name()
        fd = copy_up_object(source, os.fstat(source), self.layers.work, self.layers.work, name,
                            fault=self.fault)
        os.unlink(name, dir_fd=self.layers.work)
        self._adopt_upper(node, fd)

    def _adopt_upper(self, node: Node, fd: int) -> None:
        self.changed()
        self._drop_reader(node)
        node.upper = fd
        if not node.is_dir:
            for lower in node.lowers:
                os.close(lower)
            node.lowers = []
            node.home_upper = True
            self._path_fds[node] = None
        new_key = _key(os.fstat(fd))
        if self.index.get(node.key) is node:
            del self.index[node.key]
        node.key = new_key
        self.index[new_key] = node
        self.origins[new_key] = node.origin

    def materialize(self, directory: Node) -> None:
        """Make a directory self-contained in upper: copy up every entry its lowers show
        (recursively), then mark it opaque and stop merging. The merged view is the same
        before and after each step, so a failure part-way leaves a correct (bigger) upper."""
        self.ensure_upper(directory)
        if not directory.lowers:
            return
        for name in self.listdir(directory):
            child = self.held_lookup(directory, name)
            try:
                if child.is_dir:
                    self.materialize(child)
                elif not child.in_upper:
                    self.copy_up(child, via=(directory, name))
            finally:
                self.unref(child)
        assert directory.upper is not None
        make_opaque_fd(directory.upper)
        directory.opaque = True
        self.clear_whiteouts(directory)
        for fd in directory.lowers:
            os.close(fd)
        directory.lowers = []

    def clear_whiteouts(self, directory: Node) -> None:
        """Remove the whiteouts in a directory's upper part (they hide nothing once it is
        opaque or about to be removed)."""
        if directory.upper is None:
            return
        for name, is_whiteout in _scan(directory.upper):
            if is_whiteout:
                os.unlink(name, dir_fd=directory.upper)

    # -- creating -------------------------------------------------------------------------------

    def create(
        self, parent: Node, name: bytes, mode: int, flags: int, owner: tuple[int, int] | None
    ) -> tuple[Node, int]:
        fds: list[int] = []
        open_flags = (flags & ~(os.O_APPEND | os.O_NOFOLLOW)) | os.O_CREAT | os.O_EXCL
        open_flags |= os.O_CLOEXEC

        def make(dir_fd: int, entry: bytes) -> None:
            fds.append(os.open(entry, open_flags, stat.S_IMODE(mode), dir_fd=dir_fd))

        try:
            node = self._create_entry(parent, name, stat.S_IFREG, mode, owner, make)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return node, fds[0]

    def mkdir(self, parent: Node, name: bytes, mode: int, owner: tuple[int, int] | None) -> Node:
        return self._create_entry(
            parent, name, stat.S_IFDIR, mode, owner,
            lambda dir_fd, entry: os.mkdir(entry, stat.S_IMODE(mode), dir_fd=dir_fd),
        )

    def mknod(
        self, parent: Node, name: bytes, mode: int, rdev: int, owner: tuple[int, int] | None
    ) -> Node:
        if stat.S_ISCHR(mode) and rdev == 0:
            raise oserror(errno.EPERM, name)  # that would be a whiteout, not a file
        return self._create_entry(
            parent, name, stat.S_IFMT(mode) or stat.S_IFREG, mode, owner,
            lambda dir_fd, entry: os.mknod(entry, mode, rdev, dir_fd=dir_fd),
        )

    def symlink(
        self, parent: Node, name: bytes, target: bytes, owner: tuple[int, int] | None
    ) -> Node:
        return self._create_entry(
            parent, name, stat.S_IFLNK, 0o777, owner,
            lambda dir_fd, entry: os.symlink(target, entry, dir_fd=dir_fd),
        )

    def link(self, node: Node, parent: Node, name: bytes) -> Node:
        if node.is_dir:
            raise oserror(errno.EPERM, name)
        self._check_free(parent, name)
        self.copy_up(node)  # write intent: the new name must share the upper object
        source = fd_path(self.path_fd(node))
        self._place(parent, name, lambda dir_fd, entry: os.link(
            source, entry, dst_dir_fd=dir_fd, follow_symlinks=True))
        self._add_link(node, parent, name)
        return node

    def _check_free(self, parent: Node, name: bytes) -> None:
        try:
            self._resolve(parent, name)
        except FileNotFoundError:
            return
        raise oserror(errno.EEXIST, name)

    def _create_entry(
        self,
        parent: Node,
        name: bytes,
        file_type: int,
        mode: int,
        owner: tuple[int, int] | None,
        make: Callable[[int, bytes], None],
    ) -> Node:
        self._check_free(parent, name)
        uid, gid = owner if owner is not None else (self.euid, self.egid)
        parent_st = os.fstat(parent.fd)
        if parent_st.st_mode & stat.S_ISGID:  # BSD group semantics of a setgid directory
            gid = parent_st.st_gid
            if file_type == stat.S_IFDIR:
                mode |= stat.S_ISGID
        special = stat.S_IMODE(mode) & 0o7000

        def build(dir_fd: int, entry: bytes) -> None:
            make(dir_fd, entry)
            set_owner(dir_fd, entry, uid, gid)
            if special and file_type != stat.S_IFLNK:  # chown clears set-id bits: restore
                os.chmod(entry, stat.S_IMODE(mode), dir_fd=dir_fd)

        self._place(parent, name, build, opaque_dir=file_type == stat.S_IFDIR)
        node = self._resolve(parent, name)
        self._add_link(node, parent, name)
        return node

    def _place(
        self,
        parent: Node,
        name: bytes,
        build: Callable[[int, bytes], None],
        opaque_dir: bool = False,
    ) -> None:
        """Make a new upper entry at `name`: directly when the name is free in upper; over a
        whiteout, built in the work dir and swapped in atomically, so the old lower entry
        never shows again (a directory made there is opaque)."""
        self.ensure_upper(parent)
        assert parent.upper is not None
        self.namespace_changed()
        parent_fd = parent.upper
        current = fstatat(parent_fd, name)
        if current is None:
            build(parent_fd, name)
            return
        if not is_whiteout_stat(current):
            raise oserror(errno.EEXIST, name)
        work = self.layers.work
        tmp = temp_name()
        made = False
        try:
            build(work, tmp)
            made = True
            st = os.stat(tmp, dir_fd=work, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if opaque_dir:
                    tmp_fd = os.open(tmp, _PATH_FLAGS, dir_fd=work)
                    try:
                        make_opaque_fd(tmp_fd)
                    finally:
                        os.close(tmp_fd)
                # A directory cannot replace a non-directory: swap, then drop the whiteout.
                libc.renameat2(work, tmp, parent_fd, name, libc.RENAME_EXCHANGE)
                made = False
                os.unlink(tmp, dir_fd=work)
            else:
                libc.renameat2(work, tmp, parent_fd, name)
                made = False
        finally:
            if made:
                remove_temp(work, tmp)

    # -- removing -------------------------------------------------------------------------------

    def unlink(self, parent: Node, name: bytes) -> None:
        node = self.held_lookup(parent, name)
        try:
            if node.is_dir:
                raise oserror(errno.EISDIR, name)
            # Opened while a name still reaches it: an open, unlinked file stays answerable.
            last_name = os.fstat(self.path_fd(node)).st_nlink == 1 and node.in_upper
            self._remove(parent, name, node)
            if last_name:
                self.origins.pop(node.key, None)
        finally:
            self.unref(node)

    def rmdir(self, parent: Node, name: bytes) -> None:
        node = self.held_lookup(parent, name)
        try:
            if not node.is_dir:
                raise oserror(errno.ENOTDIR, name)
            if not self.is_empty_dir(node):
                raise oserror(errno.ENOTEMPTY, name)
            self.clear_whiteouts(node)
            self._remove(parent, name, node)
        finally:
            self.unref(node)

    def _remove(self, parent: Node, name: bytes, node: Node) -> None:
        needs_whiteout = self.lower_entry_exists(parent, name)
        self.ensure_upper(parent)
        assert parent.upper is not None
        self.namespace_changed()
        in_upper = fstatat(parent.upper, name) is not None
        if not needs_whiteout:
            if node.is_dir:
                os.rmdir(name, dir_fd=parent.upper)
            else:
                os.unlink(name, dir_fd=parent.upper)
        elif not in_upper:
            make_whiteout_at(parent.upper, name)
        else:  # swap a whiteout in for the upper entry, atomically
            work = self.layers.work
            tmp = temp_name()
            make_whiteout_at(work, tmp)
            try:
                libc.renameat2(work, tmp, parent.upper, name, libc.RENAME_EXCHANGE)
            except BaseException:
                remove_temp(work, tmp)
                raise
            remove_temp(work, tmp)  # the old entry (an empty dir, or a file name)
        self._remove_link(node, parent, name)

    # -- changing attributes --------------------------------------------------------------------

    def setattr(
        self,
        node: Node,
        size: int | None = None,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        self.copy_up(node, with_data=size != 0)
        self.changed()
        is_link = node.file_type == stat.S_IFLNK
        path = fd_path(self.path_fd(node))
        if size is not None:
            if node.is_dir:
                raise oserror(errno.EISDIR)
            os.truncate(path, size)
        if uid is not None or gid is not None:
            target, dir_fd = self._metadata_target(node)
            os.chown(target, -1 if uid is None else uid, -1 if gid is None else gid,
                     dir_fd=dir_fd, follow_symlinks=not is_link)
        if mode is not None and not is_link:
            os.chmod(path, stat.S_IMODE(mode))
        if atime_ns is not None or mtime_ns is not None:
            st = os.fstat(self.path_fd(node))
            times = (st.st_atime_ns if atime_ns is None else atime_ns,
                     st.st_mtime_ns if mtime_ns is None else mtime_ns)
            target, dir_fd = self._metadata_target(node)
            os.utime(target, ns=times, dir_fd=dir_fd, follow_symlinks=not is_link)

    def _metadata_target(self, node: Node) -> tuple[str | bytes, int | None]:
        """Where chown/utime must aim: the object itself, or a symlink through its parent."""
        if node.file_type != stat.S_IFLNK:
            return fd_path(self.path_fd(node)), None
        parent, name = self._any_link(node)
        assert parent.upper is not None
        return name, parent.upper


def _scan(dir_fd: int) -> list[tuple[bytes, bool]]:
    """(name, is_whiteout) for each entry of a layer directory."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    result = []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                whiteout = False
                if not (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)
                        or entry.is_symlink()):
                    st = entry.stat(follow_symlinks=False)
                    whiteout = is_whiteout_stat(st)
                result.append((os.fsencode(entry.name), whiteout))
    finally:
        os.close(fd)
    return result


def _restore_times(dir_fd: int, st: os.stat_result) -> None:
    with contextlib.suppress(OSError):  # best effort, as the kernel's
        os.utime(fd_path(dir_fd), ns=(st.st_atime_ns, st.st_mtime_ns))


def _open_for_writing(path: str) -> int:
    """An O_RDWR fd of the upper file at `path`. The kernel checked the job's right to write
    before the write came here; but a file the job created read-only (git's 0444 objects) can
    be written only through the descriptor that created it, which the kernel's no-open mode
    does not give us: a daemon that is not root, owning the upper file, opens it with u+w
    for the moment of the open."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        os.chmod(path, mode | stat.S_IWUSR)
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        finally:
            os.chmod(path, mode)
