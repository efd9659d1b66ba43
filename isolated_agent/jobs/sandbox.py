"""Build the job's view of the filesystem inside its private mount namespace.

Runs in the job's init process (pid 1 of the job's pid namespace), before the command exists.
The view is assembled beside the host's tree and then made the root with pivot_root, so the
host's paths stay reachable while it is being built (a managed root under /tmp is still found
after the private /tmp covers it):

    1. every mount propagation becomes private: nothing mounted here reaches the host;
    2. the host tree is bind-mounted recursively at `staging` and every mount in it is made
       read-only and nodev (keeping its nosuid/noexec/atime flags, which a user namespace
       locks): a read-only mount does not stop writes to a device, and a root job owns
       /dev/sda. The few devices a program needs (DEVICES, and /dev/pts for terminals) are
       bound in again from the host, read-only;
    3. every host socket a job must not reach is covered by an inert file (host_sockets.py);
       private tmpfs on /tmp and /dev/shm; `allow` paths bound writable from the host, and
       `allow_sockets` under the private dirs bound in again;
    4. the engine mounts each root's merged view at the root's own path;
    5. the store is covered by an empty read-only tmpfs: the job has no business there;
    6. a fresh /proc for the job's pid namespace, with the kernel knobs in it read-only;
    7. pivot_root into `staging`, detach the host tree, chdir to the caller's directory.

Any failure raises IsolationError naming the step; the launcher then refuses to run the command.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from isolated_agent.engines import Engine
from isolated_agent.env.store import Root, is_within
from isolated_agent.errors import IsolationError
from isolated_agent.jobs.confine import DEVICES
from isolated_agent.jobs.host_sockets import bound_socket_paths, is_socket, sockets_to_mask
from isolated_agent.system import libc
from isolated_agent.system.mountinfo import mounts_under

# Per-mount flags a remount must repeat (a user namespace refuses to clear locked ones).
_KEPT_FLAGS = {
    "nosuid": libc.MS_NOSUID,
    "nodev": libc.MS_NODEV,
    "noexec": libc.MS_NOEXEC,
    "noatime": libc.MS_NOATIME,
    "nodiratime": libc.MS_NODIRATIME,
    "relatime": libc.MS_RELATIME,
}

# Directories that are private to the job: a fresh tmpfs each run.
PRIVATE_DIRS = ("/tmp", "/dev/shm")

# Files in /proc through which uid 0 could change the host kernel even without capabilities.
_PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")


@dataclass(frozen=True)
class SandboxSpec:
    roots: tuple[Root, ...]
    allow: tuple[str, ...]  # absolute host paths the job may write to
    store: str  # the env store: hidden from the job
    cwd: str
    staging: str  # an empty directory on the host to build the view at
    allow_sockets: tuple[str, ...] = ()  # real paths of host sockets the job may connect to
    # The copy engine: the job's own tmp (TMPDIR), and no shared /tmp or /dev/shm to write to.
    private_tmp: str | None = None


def build_view(spec: SandboxSpec, engine: Engine) -> list[str]:
    """Build the view and enter it; return the host sockets it covered."""
    new = spec.staging

    def inside(path: str) -> str:
        return new + path

    with _step("mount namespace"):
        libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    with _step("read-only host view"):
        libc.mount("/", new, None, libc.MS_BIND | libc.MS_REC)
        covered = tuple(new + private for private in PRIVATE_DIRS)
        for entry in mounts_under(new):
            if any(is_within(entry.mount_point, hidden) for hidden in covered):
                continue  # hidden under the job's private tmpfs below
            flags = libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY | libc.MS_NODEV
            for option in entry.options:
                flags |= _KEPT_FLAGS.get(option, 0)
            _remount_read_only(entry.mount_point, flags)
    with _step("devices"):
        for device in DEVICES:
            if os.path.exists(device) and os.path.lexists(inside(device)):
                _bind_device(device, inside(device))
    with _step("covering host sockets"):
        writable = [*(root.path for root in spec.roots), *spec.allow, *PRIVATE_DIRS, spec.store]
        masked = [
            path for path in sockets_to_mask(bound_socket_paths(), writable, spec.allow_sockets)
            if is_socket(inside(path))
        ]
        for path in masked:
            _cover(inside(path), inside("/dev/null"))
    with _step("private /tmp"):
        for private in PRIVATE_DIRS:
            if os.path.isdir(inside(private)):
                _mount_tmpfs(inside(private), "mode=1777")
    for path in spec.allow_sockets:
        if any(is_within(path, private) for private in PRIVATE_DIRS):
            with _step(f"--allow-socket {path}"):
                _ensure_mount_point(inside(path), False)
                libc.mount(path, inside(path), None, libc.MS_BIND)
    for path in spec.allow:
        with _step(f"--allow {path}"):
            target = inside(path)
            _ensure_mount_point(target, os.path.isdir(path))
            libc.mount(path, target, None, libc.MS_BIND | libc.MS_REC)
    for root in spec.roots:
        target = inside(root.path)
        with _step(f"mount point for {root.path}"):
            _ensure_mount_point(target, True)
        engine.mount_root(root, target, root.path)  # raises IsolationError itself
    with _step("hiding the store"):
        if os.path.isdir(inside(spec.store)):
            _mount_tmpfs(inside(spec.store), "mode=0755,size=4k", read_only=True)
    with _step("/proc"):
        flags = libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
        libc.mount("proc", inside("/proc"), "proc", flags)
        for name in _PROC_READ_ONLY:
            path = inside(f"/proc/{name}")
            if os.path.exists(path):
                libc.mount(path, path, None, libc.MS_BIND | libc.MS_REC)
                read_only = libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY | flags
                libc.mount(None, path, None, read_only)
    with _step("pivot_root"):
        os.chdir(new)
        libc.pivot_root(".", ".")
        libc.umount(".", libc.MNT_DETACH)  # the host tree, now stacked under the new root
        os.chdir("/")
    with _step(f"working directory {spec.cwd}"):
        os.chdir(spec.cwd)
    return masked


@contextmanager
def _step(name: str) -> Iterator[None]:
    """Turn any OSError inside into IsolationError(name): the user learns which step failed."""
    try:
        yield
    except OSError as error:
        detail = os.strerror(error.errno) if error.errno else str(error)
        if error.filename:
            detail = f"{error.filename}: {detail}"
        raise IsolationError(name, detail) from error


# A mount we cannot reach is one the job cannot reach either: the job runs as the same user
# with fewer privileges. So these errors leave nothing to protect: the mount point vanished
# (ENOENT), lies behind a directory we may not enter or is another user's FUSE mount (EACCES),
# or is a FUSE mount whose daemon died (ENOTCONN).
_UNREACHABLE = (errno.ENOENT, errno.EACCES, errno.ENOTCONN)


def _remount_read_only(mount_point: str, flags: int) -> None:
    try:
        libc.mount(None, mount_point, None, flags)
    except OSError as e:
        if e.errno not in _UNREACHABLE:
            raise


def _bind_device(device: str, target: str) -> None:
    """The host's `device` (a node, or /dev/pts with what is mounted under it) at `target`,
    usable but read-only: its node cannot be chmodded or removed from the job."""
    libc.mount(device, target, None, libc.MS_BIND | libc.MS_REC)
    flags = libc.MS_REMOUNT | libc.MS_BIND | libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NOEXEC
    _remount_read_only(target, flags)


def _cover(target: str, inert: str) -> None:
    """Put an inert file over `target`: /dev/null, bound read-only and without device access,
    so that it opens as nothing and connect() finds no socket there."""
    libc.mount(inert, target, None, libc.MS_BIND)
    flags = libc.MS_NODEV | libc.MS_NOSUID | libc.MS_NOEXEC | libc.MS_RDONLY
    libc.mount(None, target, None, libc.MS_REMOUNT | libc.MS_BIND | flags)


def _mount_tmpfs(target: str, options: str, read_only: bool = False) -> None:
    flags = libc.MS_NOSUID | libc.MS_NODEV | (libc.MS_RDONLY if read_only else 0)
    libc.mount("tmpfs", target, "tmpfs", flags, options)


def _ensure_mount_point(target: str, is_dir: bool) -> None:
    """A bind target must exist. It always does in the read-only host copy; below the private
    /tmp (a fresh tmpfs) it is created."""
    if os.path.lexists(target):
        return
    os.makedirs(target if is_dir else os.path.dirname(target), exist_ok=True)
    if not is_dir:
        open(target, "a").close()
