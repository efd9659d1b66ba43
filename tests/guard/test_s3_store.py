"""The S3-compatible bucket against a real server (moto's, on 127.0.0.1): the blob-store
conformance suite of tests/review run against it, plus what only a bucket has — multipart,
write-once, no checksum headers, verified reads, the configuration and the commands."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from isolated_agent.backup import Backups, BlobStore
from isolated_agent.backup.config import BucketConfig, load
from isolated_agent.backup.s3 import S3BlobStore, WithLocalFallback
from isolated_agent.errors import BackupError, BlobCorrupt
from tests.guard.conftest import MotoServer, s3_store

# The conformance suite of every BlobStore, collected here against the S3 store: pytest
# resolves `blobs` from this module for them.
from tests.review.test_backup import (  # noqa: F401
    test_a_batch_publishes_at_its_end_and_nothing_when_it_fails,
    test_put_get_exists_list,
    test_put_refuses_data_that_does_not_match_its_digest,
)


@pytest.fixture(params=["s3", "s3-fallback"])
def blobs(
    request: pytest.FixtureRequest, moto_server: MotoServer, tmp_path: Path
) -> Iterator[BlobStore]:
    store = s3_store(moto_server, tmp_path / "spool", multipart_threshold=1 << 20,
                     part_size=5 << 20)
    if request.param == "s3":
        yield store
    else:
        from isolated_agent.backup import LocalBlobStore

        yield WithLocalFallback(store, LocalBlobStore(str(tmp_path / "local")))
    assert os.listdir(tmp_path / "spool") == [], "spooled temps left behind"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def objects(store: S3BlobStore) -> dict[str, dict[str, object]]:
    listed = store.client.list_objects_v2(Bucket=store.bucket)
    return {item["Key"]: item for item in listed.get("Contents", [])}


def test_layout_multipart_and_write_once(moto_server: MotoServer, tmp_path: Path) -> None:
    store = s3_store(moto_server, tmp_path / "spool", prefix="laptop/", part_size=5 << 20,
                     multipart_threshold=6 << 20)
    big = os.urandom((12 << 20) + 123)  # three parts
    path = tmp_path / "big"
    path.write_bytes(big)
    with open(path, "rb") as f:
        assert store.put(f) == sha(big)
    key = f"laptop/blobs/sha256/{sha(big)[:2]}/{sha(big)}"
    assert set(objects(store)) == {key}
    head = store.client.head_object(Bucket=store.bucket, Key=key)
    assert head["ContentLength"] == len(big)
    assert "-3" in head["ETag"], "a big blob goes up in parts"
    with store.get(sha(big)) as reader:
        assert reader.read() == big
    # Written once: a second put of the same content does not rewrite the object.
    modified = objects(store)[key]["LastModified"]
    with open(path, "rb") as f:
        store.put(f)
    store.put(io.BytesIO(b"small"))
    assert objects(store)[key]["LastModified"] == modified
    assert not store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads")


def test_an_existing_object_is_never_replaced(moto_server: MotoServer, tmp_path: Path) -> None:
    """If-None-Match: * — even a (damaged) object under the name stays as it is; and reads of
    it are refused because they are verified."""
    store = s3_store(moto_server, tmp_path / "spool")
    digest = sha(b"the real content")
    store.client.put_object(Bucket=store.bucket, Key=store.key_of(digest), Body=b"damaged")
    assert store.put(io.BytesIO(b"the real content")) == digest
    body = store.client.get_object(Bucket=store.bucket, Key=store.key_of(digest))["Body"].read()
    assert body == b"damaged"
    with pytest.raises(BlobCorrupt), store.get(digest) as reader:
        reader.read()


def test_servers_without_conditional_writes_still_get_each_blob_once(
    moto_server: MotoServer, tmp_path: Path
) -> None:
    store = s3_store(moto_server, tmp_path / "spool")

    # An old server: answers 501 NotImplemented to a conditional PUT.
    from botocore.exceptions import ClientError

    real_put = store.client.put_object
    calls: list[dict[str, object]] = []

    def put_object(**kwargs: object) -> object:
        calls.append(kwargs)
        if "IfNoneMatch" in kwargs:
            raise ClientError({"Error": {"Code": "NotImplemented", "Message": "no"},
                               "ResponseMetadata": {"HTTPStatusCode": 501}}, "PutObject")
        return real_put(**kwargs)

    store.client.put_object = put_object
    digest = store.put(io.BytesIO(b"one"))
    assert not store.conditional_writes
    store.put(io.BytesIO(b"one"))  # checked with HEAD first: not sent again
    assert [("IfNoneMatch" in c) for c in calls] == [True, False]
    with store.get(digest) as reader:
        assert reader.read() == b"one"


def test_no_checksum_headers_unless_required(moto_server: MotoServer, tmp_path: Path) -> None:
    store = s3_store(moto_server, tmp_path / "spool")
    sent: list[dict[str, str]] = []
    store.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers))
    )
    store.put(io.BytesIO(b"plain"))
    assert sent and not any(k.lower().startswith("x-amz-checksum") or
                            k.lower() == "x-amz-sdk-checksum-algorithm" for k in sent[0])


def test_unreachable_server_is_one_backup_error(tmp_path: Path) -> None:
    from tests.guard.conftest import free_port

    config = BucketConfig(type="s3", bucket="b", endpoint=f"http://127.0.0.1:{free_port()}",
                          access_key_id="x", secret_access_key="y")
    store = S3BlobStore(config, str(tmp_path / "spool"))
    with pytest.raises(BackupError, match="cannot .* the bucket s3://b/"):
        store.put(io.BytesIO(b"x"))
    with pytest.raises(BackupError, match="cannot"):
        store.exists(sha(b"x"))


def test_configuration_file_and_environment(tmp_path: Path) -> None:
    root = tmp_path / "backup"
    root.mkdir()
    assert load(str(root), {}).type == "local"
    (root / "config.toml").write_text(
        '[bucket]\ntype = "s3"\nbucket = "from-file"\nprefix = "/a/b/"\nregion = "eu-west-1"\n'
    )
    config = load(str(root), {})
    assert (config.type, config.bucket, config.prefix, config.region) == (
        "s3", "from-file", "a/b/", "eu-west-1")
    config = load(str(root), {"ISOLATED_AGENT_S3_BUCKET": "from-env",
                              "ISOLATED_AGENT_S3_ENDPOINT": "http://127.0.0.1:1"})
    assert (config.bucket, config.endpoint) == ("from-env", "http://127.0.0.1:1")
    assert load(str(root), {"ISOLATED_AGENT_BUCKET": "local"}).type == "local"
    (root / "config.toml").write_text('[bucket]\ntype = "s3"\nbuckett = "typo"\n')
    with pytest.raises(BackupError, match="unknown setting"):
        load(str(root), {})
    (root / "config.toml").write_text('[bucket]\ntype = "s3"\n')
    with pytest.raises(BackupError, match="needs a name"):
        load(str(root), {})


def test_commit_backups_go_to_the_configured_bucket(
    moto_server: MotoServer, tmp_path: Path, store_home: Path, project: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real commit with the S3 bucket configured by the environment: the replaced files are
    listed, verified and restored through it (and through the local fallback for the ones a
    commit moved into the local store)."""
    config = moto_server.config()
    S3BlobStore(config, str(tmp_path / "spool")).ensure_bucket()
    env = moto_server.environment(config)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import subprocess
    import sys

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "isolated_agent", *args], cwd=project,
                              capture_output=True, text=True, timeout=120)

    assert ctl("run", "-q", "--env", "e1", "--", "sh", "-c",
               "echo new > README.md; rm docs/guide.txt; ln -sf run.sh link").returncode == 0
    result = ctl("commit")
    assert result.returncode == 0, result.stderr
    backups = Backups.of_store(str(store_home))
    try:
        assert isinstance(backups.blobs, WithLocalFallback)
        events = backups.catalog.find()
        assert {os.path.basename(e.path) for e in events} >= {b"README.md", b"guide.txt", b"link"}
    finally:
        backups.close()
    verified = ctl("backup", "verify", "--json")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["ok"]
    (project / "README.md").unlink()
    restored = ctl("backup", "restore", "README.md")
    assert restored.returncode == 0, restored.stderr
    assert (project / "README.md").read_text() == "# demo\n"
    restored = ctl("backup", "restore", "link", "--force")
    assert restored.returncode == 0, restored.stderr
    assert os.readlink(project / "link") == "README.md"
