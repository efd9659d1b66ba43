"""Confine a job with Landlock: every engine's scopes (`scope_job`), and the whole write policy
of a job that runs without namespaces (the filter engine, `confine_job`).

Without a mount namespace the job sees the host's whole tree, so the kernel itself must keep it
from writing where it should not. Landlock does that for an unprivileged process, for good: the
restriction is inherited by every descendant across fork and exec and can only be narrowed.

The policy, built for whatever Landlock ABI the kernel offers:

    - every filesystem right the ABI knows is handled, so nothing is allowed by omission;
    - read, list and execute everywhere but the host's devices and the store: the job runs the
      host's programs and reads its files; of /dev it may read only DEVICES (a user in the disk
      or input group may read the raw disks, and /dev/input's keyboards), and list it; the
      store (other envs' changes, the backups of deleted files) it may not read at all, but for
      what of it is its own to write (the copy engine's clones);
    - every right beneath each write path: the managed roots (filter mounts by then, where the
      filter daemon decides what a write does), the user's --allow paths, and what a shell, git
      or python needs to work at all (DEFAULT_WRITE_PATHS);
    - ABI >= 6: signals and abstract unix sockets are scoped to the job's own domain, so the job
      cannot kill the filter daemon, the launcher or its keeper, or talk to host services over
      abstract sockets. Landlock always forbids ptrace of a process outside the domain, and
      every mount operation, at any ABI.

Call it in the process that will exec the command, after capabilities are dropped and
no_new_privs is set, with every fd it keeps already in place.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence

from isolated_agent.env.store import is_within
from isolated_agent.errors import IsolationError
from isolated_agent.system import libc

STEP = "confining the job"

# The device nodes a job may use (with /dev/pts, for terminals), on every engine: the rest of
# the host's, raw disks and input devices included, are out of its reach (sandbox.py makes them
# inert in a namespaced view; here Landlock keeps them unread).
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty",
           "/dev/ptmx", "/dev/pts")

# Beyond the managed roots and --allow paths, a job needs these writable: a shared /tmp (there
# is no private one without a mount namespace), the harmless devices, its terminal, and its own
# /proc entries (resolved at confinement time, so they are the command's process's own).
# Missing ones are skipped.
DEFAULT_WRITE_PATHS = (
    "/tmp",
    "/dev/shm",
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/tty",
    "/dev/pts",
    "/dev/ptmx",
    "/proc/self",
)

SHARED_TMP = ("/tmp", "/dev/shm")

_READ = (
    libc.LANDLOCK_ACCESS_FS_EXECUTE
    | libc.LANDLOCK_ACCESS_FS_READ_FILE
    | libc.LANDLOCK_ACCESS_FS_READ_DIR
)

# The rights each ABI added (ABI 4 added network rights, 7 only logging flags).
_RIGHTS_BY_ABI = {
    1: (libc.LANDLOCK_ACCESS_FS_MAKE_SYM << 1) - 1,
    2: libc.LANDLOCK_ACCESS_FS_REFER,
    3: libc.LANDLOCK_ACCESS_FS_TRUNCATE,
    5: libc.LANDLOCK_ACCESS_FS_IOCTL_DEV,
}

# ABI >= 6: no signal to, and no abstract unix socket of, a process outside the job's domain.
_SCOPES = libc.LANDLOCK_SCOPE_SIGNAL | libc.LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET

_NOT_AVAILABLE_HINT = (
    "the filter engine needs Linux >= 5.13 with Landlock enabled (lsm=...,landlock)"
)


def handled_rights(abi: int) -> int:
    """Every filesystem access right Landlock ABI `abi` knows."""
    rights = 0
    for version, added in _RIGHTS_BY_ABI.items():
        if abi >= version:
            rights |= added
    return rights


def confine_job(write_paths: Sequence[str], shared_tmp: bool = True,
                unread: Sequence[str] = ()) -> None:
    """Restrict this process and all it will run: read and execute anywhere but /dev and the
    directories `unread` (the store: other envs' changes, the backups of deleted files), write
    only beneath `write_paths` (which must exist; they may lie in an unread directory) and
    DEFAULT_WRITE_PATHS (without /tmp and /dev/shm unless `shared_tmp`). Raises
    IsolationError."""
    abi = libc.landlock_abi()
    if abi < 1:
        raise IsolationError(STEP, "Landlock is not available", _NOT_AVAILABLE_HINT)
    handled = handled_rights(abi)
    scoped = _SCOPES if abi >= 6 else 0
    rules = _read_rules(_READ & handled, ["/dev", *(os.path.realpath(p) for p in unread)])
    rules += [(path, handled, True) for path in write_paths]
    rules += [(path, handled, False) for path in DEFAULT_WRITE_PATHS
              if shared_tmp or path not in SHARED_TMP]
    _restrict(handled, scoped, rules)


def _read_rules(read: int, unread: Sequence[str]) -> list[tuple[str, int, bool]]:
    """Read everywhere but beneath the `unread` directories (real paths), and of /dev only
    DEVICES. Landlock grants, never denies: so each directory on the way to an unread one is
    only listed and traversed, and each of its other entries is granted whole — decided by
    where the entry really is, so that a symlink cannot lead a grant into an unread one."""
    reach = read & (libc.LANDLOCK_ACCESS_FS_READ_DIR | libc.LANDLOCK_ACCESS_FS_EXECUTE)
    rules: list[tuple[str, int, bool]] = []

    def around(directory: str) -> None:
        rules.append((directory, reach, True))
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return
        for name in names:
            real = os.path.realpath(os.path.join(directory, name))
            if any(is_within(real, hidden) for hidden in unread):
                continue
            if any(is_within(hidden, real) for hidden in unread):
                around(real)  # it holds an unread directory: around it too
            else:
                rules.append((real, read, False))

    around("/")
    rules += [(device, read, False) for device in DEVICES]
    return rules


def scope_job() -> None:
    """For a job in its own namespaces, which the mounts already keep from writing where it
    should not: Landlock's scopes alone (ABI >= 6), so that it cannot reach the host's abstract
    unix sockets (an X server, D-Bus, containerd's shims) nor signal outside its domain. Older
    kernels have no scopes: nothing to do, and `--network none` is the way to a private
    abstract namespace there."""
    if libc.landlock_abi() < 6:
        return
    _restrict(0, _SCOPES, [])


def _restrict(handled: int, scoped: int, rules: list[tuple[str, int, bool]]) -> None:
    """Build one ruleset (`rules`: path, rights, whether the path must exist) and enforce it
    on this process and everything it will run."""
    try:
        ruleset = libc.landlock_create_ruleset(handled, scoped)
    except OSError as e:
        raise IsolationError(STEP, f"landlock_create_ruleset: {os.strerror(e.errno or 0)}") from e
    try:
        for path, access, required in rules:
            _allow(ruleset, path, access, required)
        try:
            libc.landlock_restrict_self(ruleset)
        except OSError as e:
            detail = f"landlock_restrict_self: {os.strerror(e.errno or 0)}"
            raise IsolationError(STEP, detail, "no_new_privs must be set first") from e
    finally:
        os.close(ruleset)


def _allow(ruleset: int, path: str, access: int, required: bool) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        if not required:
            return
        raise IsolationError(STEP, f"{path}: {os.strerror(e.errno or 0)}") from e
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= libc.LANDLOCK_ACCESS_FS_FILE  # directory rights are refused on a file
        libc.landlock_allow_beneath(ruleset, fd, access)
    except OSError as e:
        raise IsolationError(STEP, f"{path}: {os.strerror(e.errno or 0)}") from e
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
