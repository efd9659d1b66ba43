"""Blob stores: where backed-up content lives, addressed by its sha256 (DESIGN §7).

Callers see only the small `BlobStore` protocol (put, get, exists, list, batch), so an
S3-compatible bucket can stand behind it later without touching them.

Format of the local store (a directory, by default `<store home>/backup`):

    blobs/sha256/<2 hex>/<64 hex>   one blob: the content whose sha256 is its name; mode 0444
    tmp/<pid>-<random>              a blob being written

Write ordering (must):
1. a blob is written under tmp/, hashed as it is written;
2. its data is flushed: fsync of the file, or one syncfs for all the files of a batch;
3. it is renamed to its final name (if that name exists already the temp is dropped: same name,
   same content; blobs are written once and never rewritten);
4. the directory is flushed (fsync, or syncfs for a batch).
So a final name always holds complete content, and a crash leaves at most temp files, which
`sweep_temps` removes once their writer is gone. Every read is verified: the reader re-hashes
what it returns and raises `BlobCorrupt` at the end of the data on a mismatch.

Adopted blobs (local store only, `adopt`): a complete file already on the store's filesystem —
a host file a commit replaces, hashed beforehand and checked untouched since — is renamed to
its final name directly (RENAME_NOREPLACE: an existing blob wins) and made read-only. Its path
may be longer than PATH_MAX (`fdpath.at`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import BinaryIO, Protocol

from isolated_agent.errors import BackupError, BlobCorrupt, store_full
from isolated_agent.system import fdpath, libc
from isolated_agent.system.durable import fsync_dir, process_alive

_DIGEST = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
_KERNEL_COPY_FROM = 8 << 20  # blobs at least this large are copied by the kernel
_KERNEL_COPY_STEP = 32 << 20


class BlobStore(Protocol):
    def put(self, data: BinaryIO, digest: str | None = None) -> str:
        """Store everything `data` yields; return its sha256. With `digest`, refuse (BlobCorrupt)
        data that does not hash to it."""
        ...

    def get(self, digest: str) -> BinaryIO:
        """A reader of the blob that raises BlobCorrupt at its end if the content is damaged."""
        ...

    def exists(self, digest: str) -> bool: ...

    def list(self) -> Iterator[str]: ...

    def batch(self) -> AbstractContextManager[None]:
        """Puts inside the block may become durable and visible only when it ends."""
        ...


def check_digest(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise BackupError(f"{digest!r} is not a sha256 digest (64 lowercase hex digits)")
    return digest


class VerifyingReader:
    """Reads a blob, hashing as it goes; at end of data the hash must equal the blob's name."""

    def __init__(self, file: BinaryIO, digest: str, where: str) -> None:
        self._file = file
        self._digest = digest
        self._where = where
        self._hash = hashlib.sha256()
        self._checked = False

    def read(self, size: int = -1) -> bytes:
        if size == 0:
            return b""
        data = self._file.read(size)
        self._hash.update(data)
        if not data or size < 0:  # end of data: the whole blob has gone through the hash
            self._check()
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        count = self._file.readinto(buffer)  # type: ignore[attr-defined]
        if count:
            self._hash.update(memoryview(buffer)[:count])
        else:
            self._check()
        return int(count or 0)

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        actual = self._hash.hexdigest()
        if actual != self._digest:
            raise BlobCorrupt(
                f"blob {self._digest[:12]} in {self._where} is corrupt (its content hashes to "
                f"{actual[:12]}); it cannot be restored — run `agentctl backup verify`"
            )

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> VerifyingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalBlobStore:
    """The embedded default: a directory on the local disk (zero setup)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.blob_dir = os.path.join(root, "blobs", "sha256")
        self.tmp_dir = os.path.join(root, "tmp")
        try:
            os.makedirs(self.blob_dir, mode=0o700, exist_ok=True)
            os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise BackupError(f"cannot use the backup store at {root}: {e.strerror}") from e
        self._fanout_made: set[str] = set()
        self._pending: dict[str, str] | None = None  # digest -> temp path, inside a batch
        self._buffer = bytearray(_CHUNK)  # reused: allocating 1 MiB per small blob costs more

    def path_of(self, digest: str) -> str:
        check_digest(digest)
        return os.path.join(self.blob_dir, digest[:2], digest)

    # -- the protocol ---------------------------------------------------------------------

    def put(self, data: BinaryIO, digest: str | None = None) -> str:
        if digest is not None:
            check_digest(digest)
        temp = os.path.join(self.tmp_dir, f"{os.getpid()}-{secrets.token_hex(8)}")
        try:
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        except OSError as e:
            raise self._write_error(e) from e
        try:
            actual = _store_data(data, fd, self._buffer)
            if self._pending is None:
                os.fsync(fd)
        except OSError as e:
            os.close(fd)
            _unlink_quietly(temp)
            raise self._write_error(e) from e
        except BaseException:
            os.close(fd)
            _unlink_quietly(temp)
            raise
        os.close(fd)
        if digest is not None and actual != digest:
            _unlink_quietly(temp)
            raise BlobCorrupt(f"data given as blob {digest[:12]} hashes to {actual[:12]}")
        if self._pending is not None:
            if actual in self._pending or os.path.exists(self.path_of(actual)):
                _unlink_quietly(temp)
            else:
                self._pending[actual] = temp
            return actual
        try:
            self._publish(temp, actual)
            fsync_dir(os.path.dirname(self.path_of(actual)))
        except OSError as e:
            _unlink_quietly(temp)
            raise self._write_error(e) from e
        return actual

    def get(self, digest: str) -> BinaryIO:
        path = self.path_of(digest)
        try:
            file = open(path, "rb")  # noqa: SIM115 - handed to the caller, who closes it
        except FileNotFoundError:
            raise BackupError(
                f"blob {digest[:12]} is missing from the backup store {self.root}"
            ) from None
        except OSError as e:
            raise BackupError(f"cannot read blob {digest[:12]}: {e.strerror}") from e
        return VerifyingReader(file, digest, self.root)  # type: ignore[return-value]

    def exists(self, digest: str) -> bool:
        if self._pending is not None and digest in self._pending:
            return True
        return os.path.exists(self.path_of(digest))

    def list(self) -> Iterator[str]:
        try:
            fanouts = sorted(os.listdir(self.blob_dir))
        except FileNotFoundError:
            return
        for fanout in fanouts:
            for name in sorted(os.listdir(os.path.join(self.blob_dir, fanout))):
                if _DIGEST.fullmatch(name):
                    yield name

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Puts inside the block share two syncfs barriers instead of two fsyncs each; their
        blobs appear (complete and flushed) when the block ends, and not at all if it fails."""
        if self._pending is not None:
            yield
            return
        self._pending = {}
        try:
            yield
            pending = self._pending
            self._pending = None
            if pending:
                try:
                    self._sync()  # data of every temp on disk before any is named
                    for digest, temp in pending.items():
                        self._publish(temp, digest)
                    self._sync()  # and the names too
                except OSError as e:
                    raise self._write_error(e) from e
        finally:
            if self._pending is not None:
                pending, self._pending = self._pending, None
            else:
                pending = {}
            for temp in pending.values():
                _unlink_quietly(temp)
            # blobs whose rename did not happen (an error mid-publish) leave their temps behind
            # only until the next sweep.

    # -- beyond the protocol: the local store only ----------------------------------------

    def adopt(self, path: bytes, digest: str) -> None:
        """Make the existing file `path` (on this store's filesystem) the blob `digest`, by
        renaming it — no copy. The caller vouches that its content hashes to `digest` (the
        commit hashed it and checked it is untouched since). If that blob exists already the
        file is simply removed: blobs are written once."""
        final = self.path_of(digest)
        fanout = os.path.dirname(final)
        if fanout not in self._fanout_made:
            os.makedirs(fanout, mode=0o700, exist_ok=True)
            self._fanout_made.add(fanout)
        try:
            fdpath.renameat2(path, os.fsencode(final), libc.RENAME_NOREPLACE)
        except FileExistsError:
            fdpath.unlink(path)
            return
        os.chmod(final, 0o444)

    def same_filesystem(self, path: str) -> bool:
        return os.stat(path).st_dev == os.stat(self.blob_dir).st_dev

    # -- upkeep ---------------------------------------------------------------------------

    def size_of(self, digest: str) -> int:
        return os.lstat(self.path_of(digest)).st_size

    def sweep_temps(self) -> int:
        """Remove temp files whose writing process is gone; returns how many."""
        removed = 0
        for name in os.listdir(self.tmp_dir):
            pid_text = name.split("-", 1)[0]
            if pid_text.isdigit() and process_alive(int(pid_text)):
                continue
            _unlink_quietly(os.path.join(self.tmp_dir, name))
            removed += 1
        return removed

    def _publish(self, temp: str, digest: str) -> None:
        final = self.path_of(digest)
        fanout = os.path.dirname(final)
        if fanout not in self._fanout_made:
            os.makedirs(fanout, mode=0o700, exist_ok=True)
            self._fanout_made.add(fanout)
        if os.path.exists(final):
            _unlink_quietly(temp)  # written once: an existing blob is never replaced
            return
        os.rename(temp, final)

    def _sync(self) -> None:
        fd = os.open(self.tmp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            libc.syncfs(fd)
        finally:
            os.close(fd)

    def _write_error(self, e: OSError) -> BackupError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return BackupError(store_full("the backup store", self.root, str(e.strerror)))
        return BackupError(f"cannot write to the backup store at {self.root}: {e.strerror}")


def _store_data(data: BinaryIO, fd: int, buffer: bytearray) -> str:
    """Write everything `data` yields to `fd`; return the sha256 of what was written."""
    try:
        source = data.fileno()
        start = os.lseek(source, 0, os.SEEK_CUR)
        big = os.fstat(source).st_size - start >= _KERNEL_COPY_FROM
    except (AttributeError, OSError, ValueError):
        big = False
    if big:
        try:
            return _copy_in_kernel_hashing(source, fd)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            os.ftruncate(fd, 0)  # this kernel or filesystem cannot: start over in user space
            os.lseek(fd, 0, os.SEEK_SET)
            os.lseek(source, start, os.SEEK_SET)
    return _copy_hashing(data, fd, buffer)


def _copy_in_kernel_hashing(source: int, fd: int) -> str:
    """Large blobs: the kernel copies (copy_file_range, no trip through user space) while this
    thread hashes what has been copied so far — the hash is of the blob itself, so name and
    content agree even if the source changes meanwhile."""
    digest = hashlib.sha256()
    copied = hashed = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        step = pool.submit(os.copy_file_range, source, fd, _KERNEL_COPY_STEP)
        while True:
            count = step.result()
            if count == 0:
                break
            copied += count
            step = pool.submit(os.copy_file_range, source, fd, _KERNEL_COPY_STEP)
            while hashed < copied:
                block = os.pread(fd, min(_CHUNK, copied - hashed), hashed)
                if not block:
                    raise OSError(errno.EIO, "short read of a blob being written")
                digest.update(block)
                hashed += len(block)
    return digest.hexdigest()


def _copy_hashing(data: BinaryIO, fd: int, buffer: bytearray) -> str:
    digest = hashlib.sha256()
    view = memoryview(buffer)
    readinto = getattr(data, "readinto", None)
    while True:
        if readinto is not None:
            count = readinto(buffer)
            if not count:
                break
            chunk = view[:count]
        else:
            block = data.read(_CHUNK)
            if not block:
                break
            chunk = memoryview(block)
        digest.update(chunk)
        while chunk:
            written = os.write(fd, chunk)
            chunk = chunk[written:]
    return digest.hexdigest()



def _unlink_quietly(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)
