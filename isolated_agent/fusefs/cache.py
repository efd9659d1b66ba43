"""Kernel caching: one declared mode per mount, and the contract that makes it correct.

`exclusive` (the default)
    Contract: while mounted, agentfs is the only writer of its upper and work dirs (an env
    mount holds the env's lock, so no run, discard or commit can touch them), and the lower is
    not changed behind the mount (the rule the kernel's overlayfs states too; changes made
    anyway are seen once the kernel drops its cache, at the latest on the next mount).
    Consequences: the kernel may cache positive and negative entries, attributes and file
    data for a long time (`TIMEOUT`); files are opened with keep_cache, so a second read of a
    file never reaches the daemon. Everything the kernel asks for that changes the view, it
    updates its own caches for (the dentry a rename moved, the inode a setattr changed). What
    agentfs changes on its own initiative it invalidates explicitly:
      - the other names of a lower hard link that a copy-up broke (`invalidate_entry`);
    and nothing else needs it: copy-up keeps data and attributes; a directory rename keeps
    every inode number (children are re-pointed to their copies in place); whiteouts and
    opaque markers are never visible.
    With the pyfuse3 of packaging/pyfuse3 this mode is also handle-free
    (engines/fuse/filesystem.py): the kernel opens files and directories without asking and
    caches every listing, so a second pass over a tree sends no request at all. The one
    visible difference: an open for writing copies up at its first write or truncate, not at
    the open (an open that writes nothing copies nothing up).
    Writeback caching stays off: with it, an error writing to upper (ENOSPC) would surface at
    close() instead of write(), and the kernel would take over mtime — a weaker fail-closed
    story than the kernel overlayfs gives.

`none`
    Contract: none needed. Timeouts are zero and page-cache data is dropped on every open:
    every access asks the daemon. For debugging, and for lowers that change under the mount.
"""

from __future__ import annotations

from dataclasses import dataclass

TIMEOUT = 24 * 3600.0


@dataclass(frozen=True)
class CacheMode:
    name: str
    entry_timeout: float
    attr_timeout: float
    negative_timeout: float  # 0: a failed lookup is not remembered
    keep_cache: bool
    writeback: bool


EXCLUSIVE = CacheMode("exclusive", TIMEOUT, TIMEOUT, TIMEOUT, keep_cache=True, writeback=False)
NONE = CacheMode("none", 0.0, 0.0, 0.0, keep_cache=False, writeback=False)

MODES = {mode.name: mode for mode in (EXCLUSIVE, NONE)}
