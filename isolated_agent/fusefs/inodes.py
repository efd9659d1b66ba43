"""The FUSE inode table: which object each inode number the kernel holds stands for.

One table serves every file system of ours. What an inode number stands for differs — a node
of an overlay (agentfs, the filter's views: `OverlayInodeTable`), a host file held by an
O_PATH fd (the guard: `guard/inodes.py`) — but the kernel's side of it does not: numbers,
lookup counts and their invariants live here once, and a kind of object only says what
binding and unbinding means for it (`_bound`, `_unbound`).

Invariants (a violation is a bug and asserts):

- inode 1 is the root, bound forever; the kernel's lookups of it are not counted;
- a lookup count changes only in `entry()` (called once for every entry reply the kernel
  accepts: lookup, create, mkdir, mknod, symlink, link, and each readdirplus entry but `.` and
  `..`) and in `forget()`; it never goes below zero;
- an object is bound to at most one number and a number to at most one object
  (`object.number` is the number, 0 while unbound); while its count is positive it stays
  bound; `forget` bringing the count to zero unbinds it, and so does `unused` for an object
  bound with no count (an answer that never reached the kernel);
- an object keeps its number for as long as it is bound.

Numbers are stable (`InodeNumbers`): derived from where a file was first seen,
`slot(st_dev) << 48 | st_ino`, so the same file gets the same number each time the kernel looks
it up again, which keeps `find`, `du`, `tar` and git's index happy. Where that number is taken
by another bound object (a hard link broken by copy-up, a recycled inode number), or does not
fit, a number from a separate counter range is used instead.
"""

from __future__ import annotations

import errno
import os
from typing import Generic, Protocol, TypeVar

from isolated_agent.overlay.merge import Overlay
from isolated_agent.overlay.node import Node

ROOT_INODE = 1
_INO_BITS = 48
_INO_MASK = (1 << _INO_BITS) - 1
_MAX_SLOT = (1 << 15) - 1
_FALLBACK_BASE = 1 << 63
_RANGE_STABLE_BITS = 39  # of an env view's 2^40 numbers (RangeInodeTable)


class InodeNumbers:
    """The numbering every inode table of ours uses: stable numbers from where a file was first
    seen, `slot(st_dev) << 48 | st_ino`, slots counted from `first_slot` in the order devices
    are met (0: the first device's files show their own st_ino); `stable` is None where that
    does not fit (a slot past 2^15, an st_ino of 0 or past 2^48, the root's 1). `spare` numbers
    come from a counter range of their own (from `spare_base`), for those and for a stable
    number another bound object holds."""

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


class Numbered(Protocol):
    number: int  # the inode number the kernel knows it by; 0 while unbound


T = TypeVar("T", bound=Numbered)


class InodeTable(Generic[T]):
    """Inode numbers and the objects they stand for, with the kernel's lookup counts."""

    def __init__(self, root: T, numbering: InodeNumbers) -> None:
        self.numbering = numbering
        self.root = root
        root.number = ROOT_INODE
        self._objects: dict[int, T] = {ROOT_INODE: root}
        self._counts: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, number: int) -> bool:
        return number in self._objects

    def get(self, number: int) -> T:
        """The object behind a number the kernel sent; ESTALE for a number it may not hold."""
        found = self._objects.get(number)
        if found is None:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return found

    def get_or_none(self, number: int) -> T | None:
        return self._objects.get(number)

    def numbers(self) -> list[int]:
        return list(self._objects)

    def bind(self, obj: T, stable: int | None) -> int:
        """`obj`'s number, binding it (with no lookup yet) if it has none: `stable` unless that
        is None or taken, else a spare one. `entry()` or `unused()` must follow."""
        if obj.number:
            return obj.number
        number = stable if stable is not None and stable not in self._objects \
            else self.numbering.spare()
        obj.number = number
        self._objects[number] = obj
        self._bound(obj)
        return number

    def entry(self, obj: T) -> int:
        """The kernel accepted an entry for the bound `obj`: count one more lookup."""
        number = obj.number
        assert self._objects.get(number) is obj, f"entry() for an unbound object ({number})"
        if number != ROOT_INODE:
            self._counts[number] = self._counts.get(number, 0) + 1
        return number

    def unused(self, obj: T) -> None:
        """`bind()` bound an object that the kernel did not take after all (a reply that could
        not be sent); drop the binding unless the kernel holds it."""
        number = obj.number
        if number and number != ROOT_INODE and not self._counts.get(number):
            self._unbind(number)

    def forget(self, number: int, count: int) -> bool:
        """The kernel gives back `count` lookups of `number`. True when it is unbound now."""
        if number == ROOT_INODE:
            return False
        current = self._counts.get(number, 0)
        assert current >= count, f"forget({number}, {count}) with only {current} lookups"
        if current > count:
            self._counts[number] = current - count
            return False
        self._counts.pop(number, None)
        self._unbind(number)
        return True

    def lookup_count(self, number: int) -> int:
        return self._counts.get(number, 0)

    def _unbind(self, number: int) -> None:
        obj = self._objects.pop(number)
        try:
            self._unbound(obj)
        finally:
            obj.number = 0

    # What binding means to a kind of object; the root is bound without these.
    def _bound(self, obj: T) -> None:
        """`obj` was just given its number."""

    def _unbound(self, obj: T) -> None:
        """`obj` is no longer known by its number (still in `obj.number` here)."""


class OverlayInodeTable(InodeTable[Node]):
    """The inode numbers of an overlay's nodes (agentfs's mount, the filter's host view). A
    bound node holds one reference for the kernel (`Overlay.ref`), dropped when it is unbound,
    which may release the node. A node's stable number comes from its *origin* — the
    `(st_dev, st_ino)` it was first seen with in a layer, kept across copy-up — with slots
    numbered upper's first, then each lower's, so a remount numbers the same files the same
    way; the number is also the st_ino the merged view reports."""

    def __init__(self, overlay: Overlay, first_slot: int = 1,
                 spare_base: int = _FALLBACK_BASE) -> None:
        """`first_slot=0` numbers the first layer's files (upper's) by their own st_ino: the
        filter mount's host view shows the host's inode numbers unchanged."""
        super().__init__(overlay.root, InodeNumbers(first_slot, spare_base))
        self.overlay = overlay
        for fd in (overlay.layers.upper, *overlay.layers.lowers):
            self.numbering.slot(os.fstat(fd).st_dev)

    def number(self, node: Node) -> int:
        """The inode number to report for `node`, binding one if it has none."""
        return node.number or self.bind(node, self._stable_number(node))

    def _bound(self, node: Node) -> None:
        self.overlay.ref(node)

    def _unbound(self, node: Node) -> None:
        self.overlay.unref(node)

    def _stable_number(self, node: Node) -> int:
        dev, ino = node.origin
        number = self.numbering.stable(dev, ino)
        if number is None:
            return _FALLBACK_BASE - 1 - (ino & _INO_MASK)  # still deterministic, below spares
        return number


class RangeInodeTable(OverlayInodeTable):
    """The inode numbers of a filter-mount env view: within `[base, base + 2^40)`, so that they
    never collide with the host view's or another env's, while sharing the root (inode 1).
    Derived from the origin like the others — `base + (slot << 32 | st_ino)` in the lower half
    of the range — so a file keeps its number across forget and lookup (two names of one file
    always show one st_ino); counted in the upper half where the origin does not fit there,
    and for a number another bound node holds."""

    def __init__(self, overlay: Overlay, base: int) -> None:
        super().__init__(overlay, spare_base=base + (1 << _RANGE_STABLE_BITS))
        self._base = base

    def _stable_number(self, node: Node) -> int:
        dev, ino = node.origin
        slot = self.numbering.slot(dev)
        if 0 < ino < (1 << 32) and slot < (1 << (_RANGE_STABLE_BITS - 32)):
            return self._base + (slot << 32 | ino)
        return self.numbering.spare()
