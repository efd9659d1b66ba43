"""What the guard does not back up, and why: `--exclude GLOB` and `--max-size SIZE`.

A GLOB is matched (fnmatch: `*` and `?` also match `/`) against the path relative to the
guarded directory; a GLOB without a `/` is also matched against each component of that path,
so `build`, `node_modules` or `*.o` exclude such names anywhere, and everything under a
directory of that name. A skipped file is still deleted: the skip is recorded in the catalog
(state `skipped`, with the reason) and logged by the backup daemon.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    excludes: tuple[str, ...] = ()
    max_size: int | None = None

    def skip_reason(self, relative: bytes, size: int) -> str | None:
        """Why the entry at `relative` (to the guarded dir) of `size` bytes is not backed up,
        or None when it is."""
        if self.excludes:
            text = os.fsdecode(relative)
            parts = text.split("/")
            for pattern in self.excludes:
                if fnmatch.fnmatchcase(text, pattern) or (
                    "/" not in pattern and any(fnmatch.fnmatchcase(p, pattern) for p in parts)
                ):
                    return f"excluded by {pattern!r}"
        if self.max_size is not None and size > self.max_size:
            return f"larger than the size cap ({size} > {self.max_size} bytes)"
        return None

    def to_args(self) -> list[str]:
        args: list[str] = []
        for pattern in self.excludes:
            args += ["--exclude", pattern]
        if self.max_size is not None:
            args += ["--max-size", str(self.max_size)]
        return args
