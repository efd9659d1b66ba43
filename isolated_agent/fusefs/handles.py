"""Open files and directories by handle number: what a model keeps between OPEN and RELEASE."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Handles(Generic[T]):
    """Handle numbers start at 1 and are never reused while the mount lives: 0 is no handle
    (handle-free requests name the inode in its place), and a late request for a released
    handle fails (KeyError, a bug: answered EIO) instead of reaching another file."""

    def __init__(self) -> None:
        self._open: dict[int, T] = {}
        self._next = 1

    def add(self, value: T) -> int:
        handle = self._next
        self._next += 1
        self._open[handle] = value
        return handle

    def __getitem__(self, handle: int) -> T:
        return self._open[handle]

    def get(self, handle: int | None) -> T | None:
        return None if handle is None else self._open.get(handle)

    def pop(self, handle: int) -> T:
        return self._open.pop(handle)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._open.values()))

    def clear(self) -> None:
        self._open.clear()
