"""A node: one entry of the merged view, and the layer objects behind it.

A node holds O_PATH file descriptors, never paths: the object in upper (when there is one) and,
for a directory, every lower directory merged under it (top first); for a non-directory, the
one lower file it shows until it is copied up. Descriptors follow their objects through
renames, so a node stays valid when it or an ancestor moves; and nothing here resolves a path
through a mount that might sit over a layer.

A directory holds its descriptors for life. A non-directory's one descriptor is opened only
when needed and may be closed again (`Overlay.path_fd`, a bounded LRU): the kernel keeps
nodes for as long as it likes, and a tree can have more files than a process may open fds.
`home_upper` says where such a node lives while its descriptor is closed; it is reopened
through one of its links and checked against its `key`.

Lifetime. A node is alive while `refs > 0`; its owners each hold one reference:

- the kernel, while it knows the node (the FUSE inode table holds one reference while the
  kernel's lookup count is positive);
- each of its children's links: a child remembers the `(parent, name)` pairs it is reachable
  through (needed to copy it up later), and every such pair holds its parent alive;
- each open file or directory handle.

When the last reference goes, the node closes its descriptors, leaves the identity index and
drops its own links (which may in turn release its parents). A released node is never used
again: its `released` flag is checked where a stale one could otherwise slip through.
"""

from __future__ import annotations

import contextlib
import os
import stat
import weakref

# (st_dev, st_ino) of a layer object: what makes two lookups reach "the same file".
Key = tuple[int, int]


class Node:
    __slots__ = (
        "file_type",
        "upper",
        "lowers",
        "opaque",
        "key",
        "origin",
        "links",
        "refs",
        "number",
        "released",
        "reader",
        "reader_writes",
        "listing",
        "children",
        "cache_generation",
        "fresh",
        "fresh_mark",
        "home_upper",
        "__weakref__",
    )

    def __init__(
        self,
        file_type: int,
        upper: int | None,
        lowers: list[int],
        key: Key,
        opaque: bool = False,
        origin: Key | None = None,
    ) -> None:
        self.file_type = file_type  # stat.S_IFMT bits; never changes for a node
        self.upper = upper  # O_PATH fd of the object in upper, or None (not copied up)
        self.lowers = lowers  # dirs: merged lower dirs, top first; others: [lower file] or []
        self.opaque = opaque  # dirs: upper dir is opaque (no lower merged under it)
        self.key = key  # identity of the topmost object (re-keyed on copy-up)
        self.origin = origin or key  # identity it was first seen with: its stable number
        self.links: list[tuple[Node, bytes]] = []  # (parent, name) pairs it is known by
        self.refs = 0
        self.number = 0  # the inode number the FUSE inode table gave it; 0 while unbound
        self.released = False
        # Caches (see Overlay): an fd of the topmost object — O_RDONLY, or O_RDWR on the
        # upper object once `Overlay.writer` made it (`reader_writes`); for a directory, its
        # merged listing and the nodes its names resolved to, valid while the overlay's
        # namespace generation is `cache_generation`.
        self.reader: int | None = None
        self.reader_writes = False
        self.listing: list[bytes] | None = None
        self.children: dict[bytes, weakref.ref[Node]] = {}
        self.cache_generation = -1
        # The stat that found this node, good for its first getattr while nothing changed.
        self.fresh: os.stat_result | None = None
        self.fresh_mark = -1
        self.home_upper = upper is not None  # non-directories: lives in upper

    @property
    def is_dir(self) -> bool:
        return self.file_type == stat.S_IFDIR

    @property
    def upper_only(self) -> bool:
        """Nothing of it shows a lower layer: a file that lives in upper, a directory in upper
        merged with no lower one. Only this overlay's own operations change it."""
        if self.is_dir:
            return self.upper is not None and not self.lowers
        return self.home_upper

    @property
    def fd(self) -> int:
        """The topmost object of a directory, or of a non-directory whose fd is open (use
        `Overlay.path_fd` for those): what the merged view shows for this entry."""
        if self.upper is not None:
            return self.upper
        return self.lowers[0]

    @property
    def in_upper(self) -> bool:
        return self.upper is not None or (not self.is_dir and self.home_upper)

    @property
    def merged(self) -> bool:
        """A directory that shows lower entries (lower-only or upper+lower)."""
        return self.is_dir and bool(self.lowers)

    def close_fds(self) -> None:
        for fd in ([self.upper] if self.upper is not None else []) + self.lowers + (
            [self.reader] if self.reader is not None else []
        ):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.upper = None
        self.lowers = []
        self.reader = None
        self.reader_writes = False
        self.listing = None
        self.children = {}

    def __repr__(self) -> str:
        name = self.links[0][1] if self.links else b"?"
        where = "upper" if self.upper is not None else "lower"
        return f"<Node {name!r} {where} type={self.file_type:o} refs={self.refs}>"
