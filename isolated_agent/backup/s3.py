"""An S3-compatible bucket behind the `BlobStore` protocol (boto3).

Layout: `<prefix>blobs/sha256/<2 hex>/<64 hex>`, the same names as the local store; one object
is one blob, written once.

Rules (must):
- the key is the sha256 of the bytes actually sent. A regular file is hashed first (that names
  the key), then sent part by part while being hashed again; if the second hash differs (the
  file changed meanwhile) the upload is aborted before it becomes visible. Anything that is not
  a regular file is first spooled to a temp file under the local store's `tmp/` (hashed as it
  is written), so its bytes cannot change under the upload;
- write once: `If-None-Match: *` on every PUT and multipart completion, so an existing object
  is never replaced (a 412 means "already there", which is success: same name, same content).
  A server that does not support conditional writes (501/400 on the header) is remembered, and
  from then on the store checks for the object first (HEAD) and writes only when it is absent;
- blobs up to `multipart_threshold` go in one PUT from memory; bigger ones in parts of
  `part_size` (a few in flight at once), which the server shows only once completed. The
  transfer manager of boto3 is not used because it cannot send `If-None-Match`;
- checksums are sent and checked only when the server requires them
  (`request_checksum_calculation` / `response_checksum_validation` = "when_required"): many
  S3-compatible servers reject or mishandle the newer flexible checksums. Integrity is ours:
  every read is re-hashed against the blob's name (`VerifyingReader`);
- a batch spools its blobs locally and uploads them when it ends, and nothing if it fails, like
  the local store's batch.

Every failure becomes one `BackupError` line naming the bucket; the backup daemon retries.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import stat
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import TYPE_CHECKING, Any, BinaryIO

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from isolated_agent.backup.store import BlobStore, VerifyingReader, check_digest
from isolated_agent.errors import BackupError, BlobCorrupt

if TYPE_CHECKING:  # config.py makes the S3 store; this module needs only the type
    from isolated_agent.backup.config import BucketConfig

_CHUNK = 1 << 20
_PARALLEL_PARTS = 4
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_EXISTS = {"412", "PreconditionFailed"}
_CONDITIONAL_UNSUPPORTED = {"501", "NotImplemented"}
_Parts = list[dict[str, Any]]  # (a module-level name: the class has a method called list)


class BucketUnavailable(BackupError):
    """The bucket cannot be reached at all now (connection refused, timeouts, 5xx): every
    other request would fail the same way, so the daemon stops trying for this round."""


def make_client(config: BucketConfig) -> Any:
    """A boto3 S3 client for `config`: checksums only when required, path-style addressing
    for custom endpoints (most S3-compatible servers want it), modest timeouts."""
    session = boto3.session.Session(
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        aws_session_token=config.session_token,
        region_name=config.region or "us-east-1",
    )
    botocore_config = Config(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 2, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path"} if config.endpoint else {},
        max_pool_connections=_PARALLEL_PARTS * 2,
    )
    return session.client("s3", endpoint_url=config.endpoint, config=botocore_config)


class S3BlobStore:
    def __init__(self, config: BucketConfig, spool_dir: str, client: Any = None) -> None:
        if config.bucket is None:
            raise BackupError("an s3 bucket needs a name")
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix
        self.spool_dir = spool_dir
        self.where = config.describe()
        self.client = client if client is not None else make_client(config)
        self.conditional_writes = True  # until the server shows it cannot
        self._pending: dict[str, str] | None = None  # digest -> spooled temp, inside a batch
        os.makedirs(spool_dir, mode=0o700, exist_ok=True)

    def key_of(self, digest: str) -> str:
        check_digest(digest)
        return f"{self.prefix}blobs/sha256/{digest[:2]}/{digest}"

    # -- the protocol ---------------------------------------------------------------------

    def put(self, data: BinaryIO, digest: str | None = None) -> str:
        if digest is not None:
            check_digest(digest)
        fd, start, size, actual, temp = self._stable_source(data)
        try:
            if digest is not None and actual != digest:
                raise BlobCorrupt(f"data given as blob {digest[:12]} hashes to {actual[:12]}")
            if self._pending is not None:
                if actual not in self._pending and temp is not None:
                    self._pending[actual] = temp
                    temp = None  # the batch owns it now
                elif actual not in self._pending:
                    self._pending[actual] = self._spool_copy(fd, start, size)
                return actual
            self._upload(fd, start, size, actual)
            return actual
        finally:
            if fd != _fileno(data):
                os.close(fd)
            if temp is not None:
                _unlink_quietly(temp)

    def get(self, digest: str) -> BinaryIO:
        key = self.key_of(digest)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _code(e) in _NOT_FOUND:
                raise BackupError(
                    f"blob {digest[:12]} is missing from the bucket {self.where}"
                ) from None
            raise self._error("read", e) from e
        except BotoCoreError as e:
            raise self._error("read", e) from e
        body = _Body(response["Body"], self._error)
        return VerifyingReader(body, digest, self.where)  # type: ignore[arg-type,return-value]

    def exists(self, digest: str) -> bool:
        if self._pending is not None and digest in self._pending:
            return True
        return self.size_of(digest) is not None

    def list(self) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            pages = paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}blobs/sha256/")
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"].rsplit("/", 1)[-1]
                    with suppress(BackupError):
                        yield check_digest(name)
        except (ClientError, BotoCoreError) as e:
            raise self._error("list", e) from e

    @contextmanager
    def batch(self) -> Iterator[None]:
        if self._pending is not None:
            yield
            return
        self._pending = {}
        try:
            yield
            pending, self._pending = self._pending, None
            for digest, temp in list(pending.items()):
                fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    self._upload(fd, 0, os.fstat(fd).st_size, digest)
                finally:
                    os.close(fd)
                    _unlink_quietly(temp)
                    del pending[digest]
        finally:
            if self._pending is not None:
                pending, self._pending = self._pending, None
            for temp in pending.values():
                _unlink_quietly(temp)

    # -- beyond the protocol --------------------------------------------------------------

    def size_of(self, digest: str) -> int | None:
        """The stored size of a blob, or None when the bucket does not have it."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key_of(digest))
        except ClientError as e:
            if _code(e) in _NOT_FOUND:
                return None
            raise self._error("check", e) from e
        except BotoCoreError as e:
            raise self._error("check", e) from e
        return int(head["ContentLength"])

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests, first use of a private server)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if _code(e) not in _NOT_FOUND | {"NoSuchBucket"}:
                raise self._error("open", e) from e
        except BotoCoreError as e:
            raise self._error("open", e) from e
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as e:
            raise self._error("create", e) from e

    # -- writing --------------------------------------------------------------------------

    def _stable_source(self, data: BinaryIO) -> tuple[int, int, int, str, str | None]:
        """(fd, start offset, size, sha256, temp path or None): bytes that will not change
        while they are uploaded — a regular file as it is, anything else spooled."""
        try:
            fd = data.fileno()
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                start = os.lseek(fd, 0, os.SEEK_CUR)
                size = st.st_size - start
                return fd, start, size, _hash_range(fd, start, size), None
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            pass
        temp = self._temp_path()
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            digest = hashlib.sha256()
            size = 0
            while block := data.read(_CHUNK):
                digest.update(block)
                view = memoryview(block)
                while view:
                    view = view[os.write(fd, view):]
                size += len(block)
        except BaseException:
            os.close(fd)
            _unlink_quietly(temp)
            raise
        return fd, 0, size, digest.hexdigest(), temp

    def _spool_copy(self, fd: int, start: int, size: int) -> str:
        temp = self._temp_path()
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            offset = start
            while offset < start + size:
                block = os.pread(fd, min(_CHUNK, start + size - offset), offset)
                if not block:
                    break
                os.write(out, block)
                offset += len(block)
        except BaseException:
            _unlink_quietly(temp)
            raise
        finally:
            os.close(out)
        return temp

    def _temp_path(self) -> str:
        # Named like the local store's temps (pid first), so its sweep removes orphans.
        return os.path.join(self.spool_dir, f"{os.getpid()}-s3-{secrets.token_hex(8)}")

    def _upload(self, fd: int, start: int, size: int, digest: str) -> None:
        if not self.conditional_writes and self.size_of(digest) is not None:
            return
        try:
            if size <= self.config.multipart_threshold:
                body = _read_range(fd, start, size)
                if hashlib.sha256(body).hexdigest() != digest:
                    raise BackupError(f"blob {digest[:12]} changed while being uploaded")
                self._put_object(digest, body)
            else:
                self._put_multipart(fd, start, size, digest)
        except (ClientError, BotoCoreError) as e:
            raise self._error("write to", e) from e

    def _put_object(self, digest: str, body: bytes) -> None:
        key = self.key_of(digest)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": body,
                                "ContentLength": len(body)}
        if self.conditional_writes:
            try:
                self.client.put_object(**args, IfNoneMatch="*")
                return
            except ClientError as e:
                if _code(e) in _EXISTS:
                    return  # written once already: same name, same content
                if not _conditional_unsupported(e):
                    raise
                self.conditional_writes = False
            if self.size_of(digest) is not None:
                return
        self.client.put_object(**args)

    def _put_multipart(self, fd: int, start: int, size: int, digest: str) -> None:
        key = self.key_of(digest)
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            parts = self._send_parts(fd, start, size, digest, key, upload_id)
            self._complete(key, upload_id, parts, digest)
        except BaseException:
            with suppress(ClientError, BotoCoreError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                   UploadId=upload_id)
            raise

    def _send_parts(
        self, fd: int, start: int, size: int, digest: str, key: str, upload_id: str
    ) -> _Parts:
        """Read parts in order (hashing them), upload a few at a time."""
        hasher = hashlib.sha256()
        part_size = self.config.part_size
        parts: _Parts = []
        in_flight: deque[tuple[int, Future[Any]]] = deque()
        with ThreadPoolExecutor(max_workers=_PARALLEL_PARTS) as pool:
            number = 0
            offset = start
            while offset < start + size:
                number += 1
                body = _read_range(fd, offset, min(part_size, start + size - offset))
                hasher.update(body)
                offset += len(body)
                in_flight.append((number, pool.submit(
                    self.client.upload_part, Bucket=self.bucket, Key=key, UploadId=upload_id,
                    PartNumber=number, Body=body, ContentLength=len(body))))
                while len(in_flight) >= _PARALLEL_PARTS:
                    done_number, future = in_flight.popleft()
                    parts.append({"PartNumber": done_number, "ETag": future.result()["ETag"]})
            while in_flight:
                done_number, future = in_flight.popleft()
                parts.append({"PartNumber": done_number, "ETag": future.result()["ETag"]})
        if hasher.hexdigest() != digest:
            raise BackupError(f"blob {digest[:12]} changed while being uploaded")
        return parts

    def _complete(self, key: str, upload_id: str, parts: _Parts,
                  digest: str) -> None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id,
                                "MultipartUpload": {"Parts": parts}}
        if self.conditional_writes:
            try:
                self.client.complete_multipart_upload(**args, IfNoneMatch="*")
                return
            except ClientError as e:
                if _code(e) in _EXISTS:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                       UploadId=upload_id)
                    return
                if not _conditional_unsupported(e):
                    raise
                self.conditional_writes = False
            if self.size_of(digest) is not None:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                   UploadId=upload_id)
                return
        self.client.complete_multipart_upload(**args)

    def _error(self, action: str, e: Exception) -> BackupError:
        unavailable = not isinstance(e, ClientError)
        if isinstance(e, ClientError):
            error = e.response.get("Error", {})
            detail = f"{error.get('Code', '?')}: {error.get('Message', '')}".strip(": ")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            unavailable = int(status) >= 500 or error.get("Code") == "NoSuchBucket"
        else:
            detail = str(e)
        kind = BucketUnavailable if unavailable else BackupError
        return kind(f"cannot {action} the bucket {self.where}: {detail}")


class _Body:
    """A botocore StreamingBody as a plain reader whose failures are BackupErrors."""

    def __init__(self, body: Any, error: Any) -> None:
        self._body = body
        self._error = error

    def read(self, size: int = -1) -> bytes:
        try:
            return bytes(self._body.read(None if size is None or size < 0 else size))
        except (BotoCoreError, OSError) as e:
            raise self._error("read", e) from e

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()


def _code(e: ClientError) -> str:
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code if code not in ("", "None") else str(status)


def _conditional_unsupported(e: ClientError) -> bool:
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = str(e.response.get("Error", {}).get("Message", ""))
    return _code(e) in _CONDITIONAL_UNSUPPORTED or status == 501 or (
        status == 400 and "if-none-match" in message.lower()
    )


def _fileno(data: BinaryIO) -> int | None:
    try:
        return data.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _hash_range(fd: int, start: int, size: int) -> str:
    digest = hashlib.sha256()
    offset = start
    while offset < start + size:
        block = os.pread(fd, min(_CHUNK, start + size - offset), offset)
        if not block:
            break
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def _read_range(fd: int, start: int, size: int) -> bytes:
    parts: list[bytes] = []
    offset = start
    while offset < start + size:
        block = os.pread(fd, start + size - offset, offset)
        if not block:
            break
        parts.append(block)
        offset += len(block)
    return b"".join(parts)


def _unlink_quietly(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)


class WithLocalFallback:
    """The configured bucket first, the local store behind it: blobs a commit moved into the
    local store (adopted, never copied) stay readable when an S3 bucket is configured."""

    def __init__(self, primary: S3BlobStore, local: BlobStore) -> None:
        self.primary = primary
        self.local = local
        self.where = primary.where

    def put(self, data: BinaryIO, digest: str | None = None) -> str:
        return self.primary.put(data, digest)

    def get(self, digest: str) -> BinaryIO:
        if not self.primary.exists(digest) and self.local.exists(digest):
            return self.local.get(digest)
        return self.primary.get(digest)

    def exists(self, digest: str) -> bool:
        return self.primary.exists(digest) or self.local.exists(digest)

    def list(self) -> Iterator[str]:
        yield from sorted(set(self.primary.list()) | set(self.local.list()))

    def batch(self) -> AbstractContextManager[None]:
        return self.primary.batch()

