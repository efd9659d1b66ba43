"""The FUSE layer shared by agentfs (`engines/fuse`), the filter (`engines/filter`) and the
guard (`guard`): what all three mount on.

    replies.py    the one place an exception becomes an errno; stat results as replies
    inodes.py     the inode table of overlay-backed mounts: numbering, lookup counts, invariants
    cache.py      the declared kernel-caching modes and their contract
    fastloop.py   the faster wait for the next request (one worker task)
    serve.py      the serve loop: trio, stop signals, profiling
    mount.py      the mount table: is it mounted, unmount (even a dead one), read-ahead
    daemon_log.py how a daemon's log says a request failed on a bug, and who reads it

Importing this package does not import pyfuse3; only the modules that serve do.
"""
