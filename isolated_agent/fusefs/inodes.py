"""The FUSE inode table: which node each inode number the kernel holds stands for.

Invariants (a violation is a bug and asserts):

- inode 1 is the overlay's root, bound forever; the kernel's lookups of it are not counted;
- a lookup count changes only in `entry()` (called once for every entry reply the kernel
  accepts: lookup, create, mkdir, mknod, symlink, link, and each readdirplus entry but `.` and
  `..`) and in `forget()`; it never goes below zero;
- while an inode's count is positive it is bound to exactly one node, and that node holds one
  reference for the kernel (`Overlay.ref`); when `forget` brings the count to zero the binding
  goes and the reference is dropped, which may release the node;
- a node keeps the number it got for as long as it is bound.

Inode numbers are stable: the number of a node is derived from its *origin* — the
`(st_dev, st_ino)` it was first seen with in a layer, kept across copy-up — as
`slot(st_dev) << 48 | st_ino`, where slots are numbered in the order devices are met (upper's
first, then each lower's, so a remount numbers the same files the same way). The same file
gets the same number each time the kernel looks it up again, which keeps `find`, `du`, `tar`
and git's index happy. When that number is taken by another live node (a lower hard link that
was broken by copy-up, a recycled inode number), or st_ino does not fit in 48 bits, a number
from a separate counter range (top bit set) is used instead. The number is also the st_ino
the merged view reports.
"""

from __future__ import annotations

import errno
import os

from isolated_agent.overlay.merge import Overlay
from isolated_agent.overlay.node import Node

ROOT_INODE = 1
_INO_BITS = 48
_INO_MASK = (1 << _INO_BITS) - 1
_MAX_SLOT = (1 << 15) - 1
_FALLBACK_BASE = 1 << 63
_RANGE_STABLE_BITS = 39  # of an env view's 2^40 numbers (RangeInodeTable)


class InodeNumbers:
    """The numbering every inode table of ours uses (this module's and the guard's): stable
    numbers from where a file was first seen, `slot(st_dev) << 48 | st_ino`, slots counted from
    `first_slot` in the order devices are met (0: the first device's files show their own
    st_ino); `stable` is None where that does not fit (a slot past 2^15, an st_ino of 0 or past
    2^48, the root's 1). `spare` numbers come from a counter range of their own (from
    `spare_base`), for those and for a stable number another live file holds."""

    def __init__(self, first_slot: int = 1, spare_base: int = _FALLBACK_BASE) -> None:
        self._first_slot = first_slot
        self._slots: dict[int, int] = {}
        self._next_spare = spare_base

    def slot(self, dev: int) -> int:
        slot = self._slots.get(dev)
        if slot is None:
            slot = self._slots[dev] = len(self._slots) + self._first_slot
        return slot

    def stable(self, dev: int, ino: int) -> int | None:
        slot = self.slot(dev)
        if slot > _MAX_SLOT or ino > _INO_MASK or ino == 0 or (slot << _INO_BITS | ino) == 1:
            return None
        return (slot << _INO_BITS) | ino

    def spare(self) -> int:
        number = self._next_spare
        self._next_spare += 1
        return number


class InodeTable:
    def __init__(self, overlay: Overlay, first_slot: int = 1,
                 spare_base: int = _FALLBACK_BASE) -> None:
        """`first_slot=0` numbers the first layer's files (upper's) by their own st_ino: the
        filter mount's host view shows the host's inode numbers unchanged."""
        self.overlay = overlay
        self.numbering = InodeNumbers(first_slot, spare_base)
        self._nodes: dict[int, Node] = {ROOT_INODE: overlay.root}
        self._counts: dict[int, int] = {}
        overlay.root.nodeid = ROOT_INODE
        for fd in (overlay.layers.upper, *overlay.layers.lowers):
            self.numbering.slot(os.fstat(fd).st_dev)

    def __len__(self) -> int:
        return len(self._nodes)

    def node(self, inode: int) -> Node:
        """The node behind a number the kernel sent; ESTALE for a number it may not hold."""
        node = self._nodes.get(inode)
        if node is None:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return node

    def number(self, node: Node) -> int:
        """The inode number to report for `node`, binding one (count 0) if it has none. The
        binding is dropped again by `unused()` unless an `entry()` follows."""
        if node.nodeid:
            return node.nodeid
        wanted = self._stable_number(node)
        if wanted in self._nodes:
            wanted = self.numbering.spare()
        node.nodeid = wanted
        self._nodes[wanted] = node
        self.overlay.ref(node)
        return wanted

    def entry(self, node: Node) -> int:
        """The kernel accepted an entry for `node`: count one more lookup."""
        inode = self.number(node)
        if inode != ROOT_INODE:
            self._counts[inode] = self._counts.get(inode, 0) + 1
        return inode

    def unused(self, node: Node) -> None:
        """`number()` bound a node that the kernel did not take after all (a reply that could
        not be sent); drop the binding unless the kernel holds it."""
        inode = node.nodeid
        if inode and inode != ROOT_INODE and not self._counts.get(inode):
            self._unbind(inode)

    def forget(self, inode: int, count: int) -> None:
        if inode == ROOT_INODE:
            return
        current = self._counts.get(inode, 0)
        assert current >= count, f"forget({inode}, {count}) with only {current} lookups"
        if current > count:
            self._counts[inode] = current - count
            return
        self._counts.pop(inode, None)
        self._unbind(inode)

    def lookup_count(self, inode: int) -> int:
        return self._counts.get(inode, 0)

    def _unbind(self, inode: int) -> None:
        node = self._nodes.pop(inode)
        node.nodeid = 0
        self.overlay.unref(node)

    def _stable_number(self, node: Node) -> int:
        dev, ino = node.origin
        number = self.numbering.stable(dev, ino)
        if number is None:
            return _FALLBACK_BASE - 1 - (ino & _INO_MASK)  # still deterministic, below spares
        return number


class RangeInodeTable(InodeTable):
    """The inode numbers of a filter-mount env view: within `[base, base + 2^40)`, so that they
    never collide with the host view's or another env's, while sharing the root (inode 1).
    Derived from the origin like the others — `base + (slot << 32 | st_ino)` in the lower half
    of the range — so a file keeps its number across forget and lookup (two names of one file
    always show one st_ino); counted in the upper half where the origin does not fit there,
    and for a number another live node holds."""

    def __init__(self, overlay: Overlay, base: int) -> None:
        super().__init__(overlay, spare_base=base + (1 << _RANGE_STABLE_BITS))
        self._base = base

    def _stable_number(self, node: Node) -> int:
        dev, ino = node.origin
        slot = self.numbering.slot(dev)
        if 0 < ino < (1 << 32) and slot < (1 << (_RANGE_STABLE_BITS - 32)):
            return self._base + (slot << 32 | ino)
        return self.numbering.spare()
