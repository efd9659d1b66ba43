"""The FUSE layer shared by agentfs (`engines/fuse`), the filter (`engines/filter`) and the
guard (`guard`): each of the three is a model (`model.FileSystem`) that never imports pyfuse3,
served by the one adapter.

    model.py      what a file system is to the FUSE layer: the FileSystem protocol, plain types
    adapter.py    the one pyfuse3.Operations: requests in, model calls, replies out
    handles.py    open files and directories by handle number
    replies.py    the one place an exception becomes an errno; stat results as replies
    inodes.py     the one inode table (numbering, lookup counts, invariants) and its overlay kind
    cache.py      the declared kernel-caching modes and their contract
    fastloop.py   the faster wait for the next request (one worker task; awake through a burst)
    wakeup.py     where the kernel wakes a daemon for a request (the price of a request)
    accounting.py requests counted per kind for the benchmarks ($AGENTFS_REQUESTS)
    serve.py      the serve loop: trio, stop signals, profiling
    mount.py      the mount table: is it mounted, unmount (even a dead one), read-ahead
    daemon_log.py how a daemon's log says a request failed on a bug, and who reads it

Importing this package does not import pyfuse3; only the modules that serve do.
"""
