"""What goes around a guard, found so that `guard start` and `guard status` can say so.

A guard sees only what reaches DIR through its mount. These reach the files under it without
the mount, and nothing in the guard can stop them (README "What the guard cannot see"):

    holders         processes holding a descriptor, a working directory or a root under DIR
                    taken before the mount: unlinkat/renameat/ftruncate through them go to the
                    directory below the mount. Found by reading /proc/*/{cwd,root,fd/*}.
    outside_links   files under DIR with hard links outside it: truncating or overwriting the
                    other link changes the same inode. Found by one bounded walk of DIR
                    (st_nlink against the links seen inside).
    other_views     mounts in this namespace showing DIR's filesystem at another place (root's
                    `mount --bind` of DIR or of a parent): deletes there are not seen.
    Gap             the mount vanished without `guard stop` (daemon killed then `umount -l`,
                    `umount -l` under a live daemon, a signal, a reboot): from the guard's state
                    file (run/guard-<id>.json, kept when the daemon ends other than by `guard
                    stop`), the time it was last known mounted; deletes since may have gone
                    unguarded.

Everything here only reads; a process or a file that vanishes while it is looked at is skipped.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import asdict, dataclass
from typing import Any

from isolated_agent.env.store import is_within
from isolated_agent.system.mountinfo import read_mountinfo

MAX_HOLDERS_FDS = 4096  # descriptors read per process at most (a process may hold millions)
WALK_MAX_ENTRIES = 200_000  # entries the hard-link walk looks at, at most
WALK_MAX_SECONDS = 2.0  # and for this long at most: `guard start` must stay quick
EXAMPLES = 3  # names given as examples of files with links outside


# -- processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """A process with something under DIR that it got before the mount."""

    pid: int
    command: str
    cwd: bool  # its working directory is under DIR
    root: bool  # its root directory (chroot) is under DIR
    fds: int  # descriptors it holds on files or directories under DIR
    example: str | None  # one of those descriptors' paths

    def describe(self) -> str:
        what = []
        if self.cwd:
            what.append("its working directory")
        if self.root:
            what.append("its root directory")
        if self.fds:
            what.append(f"{self.fds} open descriptor(s), e.g. {self.example}")
        return f"pid {self.pid} ({self.command}): " + ", ".join(what)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def holders(directory: str, ignore: tuple[str, ...] = (), skip_pids: tuple[int, ...] = ()
            ) -> list[Holder]:
    """Processes whose cwd, root or any descriptor is under `directory` (paths under one of
    `ignore`, e.g. the staging dir that backupd holds by design, do not count)."""
    found: list[Holder] = []
    skip = {os.getpid(), *skip_pids}

    def counts(path: str) -> bool:
        path = path.removesuffix(" (deleted)")
        return is_within(path, directory) and not any(is_within(path, i) for i in ignore)

    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        base = f"/proc/{name}"
        flags = {}
        for link in ("cwd", "root"):
            try:
                flags[link] = counts(os.readlink(f"{base}/{link}"))
            except OSError:
                flags[link] = False
        fds, example = 0, None
        try:
            numbers = os.listdir(f"{base}/fd")[:MAX_HOLDERS_FDS]
        except OSError:
            numbers = []
        for number in numbers:
            try:
                target = os.readlink(f"{base}/fd/{number}")
            except OSError:
                continue
            if target.startswith("/") and counts(target):
                fds += 1
                example = example or target.removesuffix(" (deleted)")
        if fds or flags["cwd"] or flags["root"]:
            found.append(Holder(int(name), _command(base), flags["cwd"], flags["root"], fds,
                                example))
    return found


def _command(base: str) -> str:
    try:
        with open(f"{base}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


# -- hard links ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutsideLinks:
    """Files under DIR that have hard links outside it."""

    files: int
    examples: tuple[str, ...]
    scanned: int  # entries the walk looked at
    complete: bool  # False: the walk stopped at its bound, there may be more
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "examples": list(self.examples),
                "seconds": round(self.seconds, 4)}


def outside_links(directory: str, skip: tuple[str, ...] = (),
                  max_entries: int = WALK_MAX_ENTRIES,
                  max_seconds: float = WALK_MAX_SECONDS) -> OutsideLinks:
    """Walk `directory` once (not following symlinks, not into `skip`): a regular file with
    st_nlink greater than the links to it found inside has the others outside. Only files with
    st_nlink > 1 cost more than their directory entry."""
    began = time.monotonic()
    deadline = began + max_seconds
    seen: dict[tuple[int, int], tuple[int, int, str]] = {}  # (dev, ino) -> nlink, found, path
    scanned = 0
    complete = True
    stack = [directory]
    while stack and complete:
        current = stack.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    scanned += 1
                    if scanned >= max_entries or (scanned % 512 == 0
                                                  and time.monotonic() > deadline):
                        complete = False
                        break
                    if entry.is_dir(follow_symlinks=False):
                        if entry.path not in skip:
                            stack.append(entry.path)
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if st.st_nlink < 2 or not stat.S_ISREG(st.st_mode):
                        continue
                    key = (st.st_dev, st.st_ino)
                    nlink, found, first = seen.get(key, (st.st_nlink, 0, entry.path))
                    seen[key] = (nlink, found + 1, first)
        except OSError:
            continue  # vanished or unreadable: what cannot be read is not judged
    outside = sorted(first for nlink, found, first in seen.values() if nlink > found)
    return OutsideLinks(len(outside), tuple(outside[:EXAMPLES]), scanned, complete,
                        time.monotonic() - began)


# -- other mounts of DIR's filesystem -----------------------------------------------------------


def other_views(directory: str, skip_fstype: str) -> list[str]:
    """Places in this mount namespace where DIR (or part of it) is reachable other than at
    DIR: bind mounts of DIR's filesystem whose root is DIR, a parent of it or a directory under
    it. Mounts of type `skip_fstype` (the guard's own) are not looked at."""
    below = [m for m in read_mountinfo() if m.fstype != skip_fstype]
    # The mount DIR is reached through: the deepest one whose mount point contains DIR.
    holding = [m for m in below if is_within(directory, m.mount_point)]
    if not holding:
        return []
    mount = max(holding, key=lambda m: len(m.mount_point))
    relative = directory[len(mount.mount_point.rstrip("/")):] or "/"
    inside_fs = (mount.root.rstrip("/") + relative) if relative != "/" else mount.root
    views = []
    for other in below:
        if other.device != mount.device or other.mount_point == mount.mount_point:
            continue
        if is_within(inside_fs, other.root):  # a parent of DIR (or DIR) mounted there
            rest = inside_fs[len(other.root.rstrip("/")):]
            view = other.mount_point.rstrip("/") + rest if rest else other.mount_point
        elif is_within(other.root, inside_fs):  # a directory under DIR mounted there
            view = other.mount_point
        else:
            continue
        if view != directory and not is_within(view, directory):
            views.append(view)
    return sorted(set(views))


# -- gaps: the mount vanished without `guard stop` ----------------------------------------------


@dataclass(frozen=True)
class Gap:
    """Deletes under DIR may have gone unguarded between `since` and `until`."""

    since: float  # when the guard was last known mounted
    until: float  # now, or when a new guard mounted again
    cause: str

    def describe(self, directory: str) -> str:
        return (f"deletes under {directory} may have gone unguarded between "
                f"{_when(self.since)} and {_when(self.until)} ({self.cause})")

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Gap | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(float(data["since"]), float(data["until"]), str(data["cause"]))
        except (KeyError, TypeError, ValueError):
            return None


def open_gap(state: dict[str, object], daemon_alive: bool = False,
             now: float | None = None) -> Gap:
    """The gap of a guard whose state file outlived its mount at DIR: since the daemon
    recorded the loss, else since its last heartbeat (it was killed and its dead mount
    removed, or its mount went away a moment ago and it has not noticed yet)."""
    now = time.time() if now is None else now
    lost = state.get("lost")
    if isinstance(lost, dict) and isinstance(lost.get("since"), int | float):
        return Gap(float(lost["since"]), now, str(lost.get("cause", "the mount was lost")))
    pid = state.get("pid")
    if daemon_alive:
        cause = f"its mount is gone while the guard daemon (pid {pid}) runs (umount -l?)"
    else:
        cause = f"the guard daemon (pid {pid}) ended without `guard stop` and its mount " \
                "was removed"
    for key in ("seen", "started"):
        value = state.get(key)
        if isinstance(value, int | float):
            return Gap(float(value), now, cause)
    return Gap(now, now, cause)


def past_gaps(state: dict[str, object]) -> list[Gap]:
    gaps = state.get("gaps")
    if not isinstance(gaps, list):
        return []
    return [g for g in (Gap.from_json(item) for item in gaps) if g is not None]


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
