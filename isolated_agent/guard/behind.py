"""Changes made behind the guard's mount, so that the kernel's caches of the mount follow them.

The guard lets the kernel keep entries, attributes, listings and file data for as long as it
likes (fs.py's cache contract): everything that changes through the mount the kernel learns
from its own requests. What does not go through the mount — a process that was already inside
DIR when the guard started (`guard start` names them), a hard link outside DIR, the backup
daemon restoring beside a file — would stay unseen. So every directory the kernel holds is
watched with inotify, and an event that the daemon did not cause itself becomes an
invalidation: the entry of a name created, removed or renamed there, the attributes of the
directory and of a file whose content or attributes changed (the kernel then asks again, sees
the new mtime and size, and drops the file's cached data itself: auto_inval_data).

Telling the daemon's own changes apart: the daemon answers one request at a time, and inotify
queues an event within the system call that causes it. So right after a request changed
something, the events queued are read at once (`settle`): those naming what the request
touched are the daemon's own (the kernel already knows) and are dropped; any other is
someone else's and is kept for `take`, which the serve loop calls whenever the descriptor is
readable, between requests.

Limits: a directory beyond `fs.inotify.max_user_watches` is not watched (logged once); on a
queue overflow (more than `fs.inotify.max_queued_events` changes between two requests) every
attribute the kernel holds is invalidated, but a name created behind the mount then may stay
unseen — in a cached listing, or where a lookup of it had failed — until the kernel drops
that entry (logged as a warning).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from isolated_agent.system import libc

log = logging.getLogger("guard")

_MASK = (libc.IN_CREATE | libc.IN_DELETE | libc.IN_MOVED_FROM | libc.IN_MOVED_TO
         | libc.IN_MODIFY | libc.IN_ATTRIB | libc.IN_ONLYDIR | libc.IN_EXCL_UNLINK)
NAMESPACE = libc.IN_CREATE | libc.IN_DELETE | libc.IN_MOVED_FROM | libc.IN_MOVED_TO

Place = tuple[int, bytes]  # (directory's inode number, name in it); b"": the directory itself


@dataclass(frozen=True)
class Change:
    directory: int  # inode number
    name: bytes  # b"": the directory itself
    namespace: bool  # a name appeared or went away (else: content or attributes changed)


class Watcher:
    def __init__(self) -> None:
        self.fd = libc.inotify_init()
        self._directory: dict[int, int] = {}  # wd -> inode number
        self._wd: dict[int, int] = {}  # inode number -> wd
        self._pending: list[Change] = []
        self.overflowed = False
        self._full = False

    def watch(self, number: int, proc_path: str) -> None:
        try:
            wd = libc.inotify_add_watch(self.fd, proc_path, _MASK)
        except OSError as e:
            if e.errno == errno.ENOSPC and not self._full:
                self._full = True
                log.warning("guard: fs.inotify.max_user_watches reached: changes made behind "
                            "the mount in further directories are not followed")
            return
        self._directory[wd] = number
        self._wd[number] = wd

    def unwatch(self, number: int) -> None:
        wd = self._wd.pop(number, None)
        if wd is not None:
            del self._directory[wd]
            with contextlib.suppress(OSError):  # gone with its directory already
                libc.inotify_rm_watch(self.fd, wd)

    def settle(self, touched: Iterable[Place]) -> None:
        """Right after the daemon changed `touched`: drop the events that are its own."""
        ours = set(touched)
        for change in self._read():
            if (change.directory, change.name) not in ours:
                self._pending.append(change)

    def take(self) -> list[Change]:
        """Every change made behind the mount since the last call."""
        changes = [*self._pending, *self._read()]
        self._pending.clear()
        return changes

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def _read(self) -> list[Change]:
        changes = []
        for wd, mask, name in libc.inotify_read(self.fd):
            if mask & libc.IN_Q_OVERFLOW:
                self.overflowed = True
                continue
            number = self._directory.get(wd)
            if mask & libc.IN_IGNORED:  # the directory is gone, or unwatched
                if number is not None:
                    del self._directory[wd]
                    self._wd.pop(number, None)
                continue
            if number is not None:
                changes.append(Change(number, name, bool(mask & NAMESPACE)))
        return changes
