"""Guard mode (`agentctl guard DIR`): a FUSE filter mounted in place over DIR that passes all
I/O through and, before a delete or an overwrite returns, stages the old content for the backup
daemon (DESIGN §7).

    fs.py        the pass-through model (fusefs) that stages before it destroys
    inodes.py    what a guard inode is: an O_PATH fd keyed by (st_dev, st_ino), on fusefs's table
    behind.py    changes made behind the mount (inotify): what the guard's caches must forget
    stage.py     staging one entry before it is destroyed: hard link or copy, then the record
    policy.py    what is not backed up (--exclude, --max-size), and why
    bypass.py    the ways around a guard (processes already inside DIR, other mounts of it)
    mount.py     the guard daemon's life: open DIR, mount over it, serve, unmount

Built on `isolated_agent.fusefs` (the FUSE layer) and `isolated_agent.backup` (the staging
format, the catalog, the blob stores); `isolated_agent.backupd` uploads what it stages.
"""
