"""What a FUSE daemon's log tells the user after a job: requests that failed on a bug.

A daemon answers a request that raised anything but OSError with EIO and logs the traceback
(`fusefs/replies.errno_handler`), then goes on serving. The job only sees "Input/output error";
`LogWatch` counts those entries from the job's start, so that `agentctl run` can say which daemon
failed and where its log is. Light on purpose: the launcher imports it, never pyfuse3.
"""

from __future__ import annotations

import os

# What the log says of a request that failed on a bug.
FAILED_MARK = "failed; answered EIO"


class LogWatch:
    """A daemon's log, from now on: how many requests failed on a bug (answered EIO) since,
    so that the user who got a bare EIO is told where to look."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._offset = os.path.getsize(path)
        except OSError:
            self._offset = 0

    def failures(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                return f.read().count(FAILED_MARK.encode())
        except OSError:
            return 0

    def problem(self, what: str) -> list[str]:
        """One line for the user if `what` (the daemon) failed requests, else none."""
        count = self.failures()
        if not count:
            return []
        return [f"{what} failed {count} request(s) with an I/O error (EIO) on an internal "
                f"error: the details are in {self.path}; please report them"]
