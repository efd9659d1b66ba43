"""Parse /proc/self/mountinfo (proc(5)): the one true list of what is mounted where."""

from __future__ import annotations

import re
from dataclasses import dataclass

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    device: str  # "major:minor" of the mounted filesystem (a FUSE mount's bdi is named so)
    root: str  # the directory of that filesystem mounted here ("/" unless a bind mount)
    mount_point: str
    options: frozenset[str]  # per-mount options: rw/ro, nosuid, nodev, noexec, *atime
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash as \ooo.
    raw = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)
    return raw.encode("latin-1", "surrogateescape").decode("utf-8", "surrogateescape")


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    device=fields[2],
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    options=frozenset(fields[5].split(",")),
                    fstype=fields[separator + 1],
                    source=_unescape(fields[separator + 2]),
                )
            )
    return entries


def mounts_under(prefix: str) -> list[MountEntry]:
    """Mounts at or below `prefix`, outermost first (the order the kernel lists them)."""
    base = prefix.rstrip("/")
    return [
        e
        for e in read_mountinfo()
        if e.mount_point == (base or "/") or e.mount_point.startswith(base + "/")
    ]
