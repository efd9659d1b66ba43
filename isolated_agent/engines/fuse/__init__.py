"""agentfs: the project's own overlay filesystem, on FUSE (pyfuse3 + trio). DESIGN §4.2, §5.

    operations.py  the pyfuse3 adapter (thin: requests in, overlay calls, replies out)
    inodes.py      the inode table: inode numbers, lookup counts, invariants
    cache.py       the kernel caching mode and its contract
    daemon.py      mount, serve, unmount; foreground or as a background daemon
    mount.py       mount-table helpers: unmount, recover a dead mount
    engine.py      the `fuse` engine of `agentctl run`
    __main__.py    the overlay-style command line (`python -m ...`, `agentfs`, mount.fuse3)

The overlay rules themselves live in `isolated_agent.overlay` and know nothing of FUSE.
Importing this package does not import pyfuse3; only the modules that serve do.
"""
