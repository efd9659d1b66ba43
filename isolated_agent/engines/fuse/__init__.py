"""agentfs: the project's own overlay filesystem, on FUSE (pyfuse3 + trio). DESIGN §4.2, §5.

    filesystem.py  agentfs as a model of the FUSE layer: requests in, overlay calls, answers out
    daemon.py      mount, serve, unmount; foreground or as a background daemon
    envmount.py    `agentctl mount`: an env's view at a path of the host, for a while
    engine.py      the `fuse` engine of `agentctl run`
    __main__.py    the overlay-style command line (`python -m ...`, `agentfs`, mount.fuse3)

The overlay rules themselves live in `isolated_agent.overlay` and know nothing of FUSE; the
inode table, cache modes, serve loop and mount-table helpers are the shared FUSE layer,
`isolated_agent.fusefs`.

Importing this package does not import pyfuse3; only the modules that serve do.
"""
