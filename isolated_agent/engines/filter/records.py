"""Where filter daemons are found: one record per root in the store (`run/filters/<digest>.json`)
naming the daemon's pid, its control socket and its log. Read by the CLI and the launcher, which
must not pay for importing the daemon (pyfuse3, trio) to find one.

A record is written by its daemon only (`write_record`), mode 0600 whatever the umask — the
daemon runs with umask 0, since the kernel hands it modes already masked — through a temp file
renamed into place, so a reader never sees half a record."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass


@dataclass
class FilterRecord:
    root: str
    pid: int
    socket: str
    log: str
    on_demand: bool


def records_dir(run_dir: str) -> str:
    path = os.path.join(run_dir, "filters")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _digest(root: str) -> str:
    return hashlib.sha256(os.fsencode(root)).hexdigest()[:16]


def record_path(run_dir: str, root: str) -> str:
    return os.path.join(records_dir(run_dir), f"{_digest(root)}.json")


def socket_path(run_dir: str, root: str) -> str:
    return os.path.join(records_dir(run_dir), f"{_digest(root)}.sock")


def write_record(record: FilterRecord, path: str) -> None:
    """Publish `record` at `path`, readable and writable by its owner only."""
    temporary = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)  # left by a daemon that died writing it
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask took away
        with os.fdopen(os.dup(fd), "w") as f:
            json.dump(asdict(record), f)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def read_record(run_dir: str, root: str) -> FilterRecord | None:
    return _load(record_path(run_dir, root))


def all_records(run_dir: str) -> list[FilterRecord]:
    found = []
    for name in sorted(os.listdir(records_dir(run_dir))):
        if name.endswith(".json"):
            record = _load(os.path.join(records_dir(run_dir), name))
            if record is not None:
                found.append(record)
    return found


def _load(path: str) -> FilterRecord | None:
    try:
        with open(path) as f:
            return FilterRecord(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
