"""The bottom layer: thin wrappers over the kernel and the disk. Imports nothing else of the
project; everything else may import it.

    libc.py       the raw system calls Python does not wrap (ctypes; the only such module)
    fdpath.py     walking paths relative to directory descriptors, never following a link
    mountinfo.py  /proc/self/mountinfo, parsed
    cgroup.py     cgroup v2: where it is mounted, a job's own group, cleaning up stale ones
    durable.py    crash-safe writes (whole writes, fsync of the directory), process liveness
    sqlite.py     SQLite as every catalog uses it (WAL, transactions, schema versions)
    daemon.py     what a daemon does to itself first: detach, raise its descriptor limit
"""
