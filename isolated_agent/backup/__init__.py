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

import io
import os
import sqlite3
import stat
from typing import BinaryIO

from isolated_agent.backup import config
from isolated_agent.backup.catalog import BackupCatalog, BackupEvent, GuardCatalog
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
            self.catalog = GuardCatalog(os.path.join(root, "catalog.sqlite"))
        except OSError as e:
            raise BackupError(f"cannot use the backup store at {root}: {e.strerror}") from e
        except sqlite3.Error as e:
            raise BackupError(
                f"cannot open the backup catalog {root}/catalog.sqlite: {e}; move it away"
            ) from e

    @classmethod
    def of_store(cls, home: str) -> Backups:
        return cls(os.path.join(home, "backup"))

    def open_staged(self, event: BackupEvent) -> BinaryIO:
        """The content of a guard event not uploaded yet, read from its staging dir. Raises
        BackupError when there is none (skipped, failed) or it cannot be reached now."""
        from isolated_agent.backup.staging import open_staging

        item = self.catalog.item(event.id)
        if item is None or item.staged_name is None:
            why = f" ({item.last_error})" if item is not None and item.last_error else ""
            raise BackupError(f"{os.fsdecode(event.path)} was not backed up{why}")
        guard = self.catalog.guard(item.guard_id)
        if guard is None:
            raise BackupError(f"guard {item.guard_id} of backup {event.id} is unknown")
        staging = open_staging(os.path.join(os.path.dirname(self.root), "run"), guard)
        try:
            st = staging.stat_item(item.staged_name)
            if st is None:
                raise BackupError(
                    f"the staged copy of backup {event.id} is gone ({item.state}); "
                    "`agentctl backup show` tells more")
            if stat.S_ISLNK(st.st_mode):
                return io.BytesIO(staging.read_link(item.staged_name))
            return os.fdopen(staging.open_item(item.staged_name), "rb")
        finally:
            staging.close()

    def close(self) -> None:
        self.catalog.close()
