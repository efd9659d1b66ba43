"""Guard mode (`agentctl guard DIR`): a FUSE filter mounted in place over DIR that passes all
I/O through and, before a delete or an overwrite returns, stages the old content for the backup
daemon (DESIGN §7).

    staging.py   the staging dir on DIR's filesystem: items, sidecars, reconcile
    policy.py    what is not backed up (--exclude, --max-size), and why
    fs.py        the pyfuse3 pass-through operations that stage before they destroy
    inodes.py    the guard's inode table (O_PATH fds keyed by (st_dev, st_ino))
    mount.py     the guard daemon's life: open DIR, mount over it, serve, unmount
"""
