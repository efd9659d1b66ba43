"""Backups: every host entry a commit (or, later, the guard) replaces or deletes is saved here
first, and `agentctl backup restore` brings it back (DESIGN §7).

    store.py    the BlobStore protocol and the local, content-addressed implementation
    s3.py       an S3-compatible bucket behind the same protocol (boto3)
    config.py   which bucket: local (default) or S3, from config.toml and the environment
    catalog.py  the SQLite record of backup events
    capture.py  saving host entries (content + metadata) as events
    restore.py  bringing them back, verified, never overwriting without being told to
"""

from __future__ import annotations

import os
import sqlite3

from isolated_agent.backup import config
from isolated_agent.backup.catalog import BackupCatalog, BackupEvent
from isolated_agent.backup.store import BlobStore, LocalBlobStore
from isolated_agent.errors import BackupError

__all__ = ["BackupCatalog", "BackupEvent", "Backups", "BlobStore", "LocalBlobStore"]


class Backups:
    """The backup store of an agentctl store: blobs and their catalog, under `<home>/backup`."""

    def __init__(self, root: str, blobs: BlobStore | None = None) -> None:
        self.root = root
        try:
            os.makedirs(root, mode=0o700, exist_ok=True)
            self.local = LocalBlobStore(root)
            self.bucket = config.load(root)
            self.blobs: BlobStore = (
                blobs if blobs is not None else config.open_bucket(self.bucket, self.local)
            )
            self.catalog = BackupCatalog(os.path.join(root, "catalog.sqlite"))
        except OSError as e:
            raise BackupError(f"cannot use the backup store at {root}: {e.strerror}") from e
        except sqlite3.Error as e:
            raise BackupError(
                f"cannot open the backup catalog {root}/catalog.sqlite: {e}; move it away"
            ) from e

    @classmethod
    def of_store(cls, home: str) -> Backups:
        return cls(os.path.join(home, "backup"))

    def close(self) -> None:
        self.catalog.close()
