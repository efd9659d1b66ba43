"""Which bucket backups go to: the local directory (the default) or an S3-compatible bucket.

Read from `<store>/backup/config.toml`, then overridden by the environment:

    [bucket]
    type = "s3"                      # or "local" (the default)
    bucket = "my-backups"
    endpoint = "https://s3.example.net"   # omit for AWS itself
    region = "eu-west-1"
    prefix = "laptop/"               # key prefix inside the bucket (optional)
    multipart_threshold = 67108864   # bytes; bigger blobs go up in parts
    part_size = 16777216
    # access_key_id / secret_access_key may be given here, but the usual AWS places
    # (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws) are better.

    environment                      overrides
    ISOLATED_AGENT_BUCKET            type ("local" or "s3")
    ISOLATED_AGENT_S3_BUCKET         bucket (setting it alone selects type s3)
    ISOLATED_AGENT_S3_ENDPOINT       endpoint
    ISOLATED_AGENT_S3_REGION         region (else AWS_REGION / AWS_DEFAULT_REGION)
    ISOLATED_AGENT_S3_PREFIX         prefix

Credentials never need to be in the file: boto3 finds them in the environment (AWS_*) or the
AWS config files.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from isolated_agent.backup.store import BlobStore, LocalBlobStore
from isolated_agent.errors import BackupError

CONFIG_NAME = "config.toml"
DEFAULT_MULTIPART_THRESHOLD = 64 << 20
DEFAULT_PART_SIZE = 16 << 20
MIN_PART_SIZE = 5 << 20  # S3's own lower limit for every part but the last


@dataclass(frozen=True)
class BucketConfig:
    type: str = "local"
    bucket: str | None = None
    endpoint: str | None = None
    region: str | None = None
    prefix: str = ""
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    part_size: int = DEFAULT_PART_SIZE

    def describe(self) -> str:
        if self.type == "local":
            return "local directory"
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"


def load(backup_root: str, environ: Mapping[str, str] | None = None) -> BucketConfig:
    """The bucket configuration of the backup store at `backup_root`."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = os.path.join(backup_root, CONFIG_NAME)
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        document = {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BackupError(f"cannot read the bucket configuration {path}: {e}") from e
    section = document.get("bucket", {})
    if not isinstance(section, dict):
        raise BackupError(f"{path}: [bucket] must be a table")
    values.update(section)
    overrides = {
        "type": env.get("ISOLATED_AGENT_BUCKET"),
        "bucket": env.get("ISOLATED_AGENT_S3_BUCKET"),
        "endpoint": env.get("ISOLATED_AGENT_S3_ENDPOINT"),
        "region": env.get("ISOLATED_AGENT_S3_REGION"),
        "prefix": env.get("ISOLATED_AGENT_S3_PREFIX"),
    }
    for key, value in overrides.items():
        if value:
            values[key] = value
    if env.get("ISOLATED_AGENT_S3_BUCKET") and not env.get("ISOLATED_AGENT_BUCKET"):
        values["type"] = "s3"
    if not values.get("region"):
        values["region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    return _validated(values, path)


def _validated(values: dict[str, Any], path: str) -> BucketConfig:
    known = set(BucketConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise BackupError(f"{path}: unknown setting(s) in [bucket]: {', '.join(unknown)}")
    kind = str(values.get("type", "local"))
    if kind not in ("local", "s3"):
        raise BackupError(f"bucket type {kind!r} is not one of: local, s3")
    if kind == "s3" and not values.get("bucket"):
        raise BackupError(
            "an s3 bucket needs a name: set bucket = \"...\" in "
            f"{path} or ISOLATED_AGENT_S3_BUCKET"
        )
    prefix = str(values.get("prefix") or "").strip("/")
    part_size = int(values.get("part_size", DEFAULT_PART_SIZE))
    if part_size < MIN_PART_SIZE:
        raise BackupError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
    return BucketConfig(
        type=kind,
        bucket=values.get("bucket"),
        endpoint=values.get("endpoint") or None,
        region=values.get("region") or None,
        prefix=prefix + "/" if prefix else "",
        access_key_id=values.get("access_key_id"),
        secret_access_key=values.get("secret_access_key"),
        session_token=values.get("session_token"),
        multipart_threshold=max(int(values.get("multipart_threshold",
                                               DEFAULT_MULTIPART_THRESHOLD)), 1),
        part_size=part_size,
    )


def open_bucket(config: BucketConfig, local: BlobStore) -> BlobStore:
    """The blob store `config` names; an S3 bucket keeps the local store as its fallback."""
    if config.type == "local":
        return local
    from isolated_agent.backup.s3 import S3BlobStore, WithLocalFallback  # boto3 is slow to load

    assert isinstance(local, LocalBlobStore)
    return WithLocalFallback(S3BlobStore(config, local.tmp_dir), local)
