"""`agentctl mount` / `agentctl umount` as library calls: one env's merged view at a mount point.

While mounted, the daemon holds the env's lock (it inherits the locked descriptor), so a run,
discard or commit in that env is refused until it is unmounted — which is also what the
`exclusive` cache mode's contract needs. A record in the store (`run/mounts/<hash>.json`) names
the daemon, so `umount` can wait for it to be gone before it returns: then the env is free.

The mount point must not lie inside any of the env's layers or its project: agentfs would
meet its own mount while looking something up in a layer, and wait for itself forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

from isolated_agent.engines.fuse.daemon import (
    MountConfig,
    MountFailed,
    open_layers,
    serve,
    setup_logging,
    start_background,
)
from isolated_agent.env.store import Env, Root, Store, is_within, live_socket_path
from isolated_agent.errors import AgentctlError, UsageError
from isolated_agent.fusefs import mount as mounts


class MountError(AgentctlError):
    """agentfs could not be mounted or unmounted (exit 1)."""


@dataclass
class MountRecord:
    mountpoint: str
    pid: int
    env: str
    env_id: str
    root: str
    log: str


def _records_dir(store: Store) -> str:
    path = os.path.join(store.run_dir, "mounts")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _record_path(store: Store, mountpoint: str) -> str:
    digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
    return os.path.join(_records_dir(store), f"{digest}.json")


def read_record(store: Store, mountpoint: str) -> MountRecord | None:
    try:
        with open(_record_path(store, mountpoint)) as f:
            return MountRecord(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def _write_record(store: Store, record: MountRecord) -> None:
    path = _record_path(store, record.mountpoint)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(record), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pick_root(env: Env, root: str | None) -> Root:
    if root is None:
        if len(env.roots) > 1:
            choices = ", ".join(r.path for r in env.roots)
            raise UsageError(
                f"env {env.name} manages several roots ({choices}); pick one with --root"
            )
        return env.roots[0]
    wanted = os.path.realpath(root)
    for candidate in env.roots:
        if candidate.path == wanted:
            return candidate
    raise UsageError(f"env {env.name} does not manage {root}")


def check_mountpoint(store: Store, env: Env, mountpoint: str) -> str:
    path = os.path.abspath(mountpoint)
    if not os.path.isdir(path):
        raise UsageError(f"mount point {mountpoint} is not an existing directory")
    real = os.path.realpath(path)
    if mounts.is_fuse_mount(mounts.mount_entry(real)):
        raise MountError(f"{real} is already a FUSE mount; `agentctl umount {real}` first")
    forbidden = [store.home] + [p for r in env.roots for p in (r.path, r.upper, r.work)]
    for place in forbidden:
        if is_within(real, place):
            raise UsageError(
                f"mount point {real} is inside {place}, which agentfs reads from; "
                "pick a directory outside the project and the store"
            )
    return real


def mount_env(
    store: Store,
    env: Env,
    mountpoint: str,
    root: str | None = None,
    foreground: bool = False,
    on_mounted: Callable[[MountRecord], None] = lambda record: None,
) -> MountRecord:
    """Mount `env`'s view of one root at `mountpoint`. In the background (the default) this
    returns once the mount is in place; in the foreground it returns when the mount ends."""
    chosen = pick_root(env, root)
    target = check_mountpoint(store, env, mountpoint)
    log_path = os.path.join(_records_dir(store), f"{env.id}-{chosen.index}.log")
    live = live_socket_path(store.run_dir, env.id, chosen.index)  # live checkpoints
    with store.lock(env, purpose="mount it") as lock_fd:
        # Its stack as it is now that nobody else may change it (a rollback may have come
        # between finding the env and taking its lock).
        chosen = store.get(env.id).roots[chosen.index]
        config = MountConfig(lowers=chosen.lowers, upper=chosen.upper, work=chosen.work,
                             fsname=f"agentfs:{env.name}")
        if foreground:
            record = MountRecord(target, os.getpid(), env.name, env.id, chosen.path, log_path)
            _note_holder(lock_fd, record.pid)
            try:
                layers = open_layers(config)
                _write_record(store, record)
                setup_logging()
                serve(layers, target, config, on_ready=lambda: on_mounted(record),
                      live_socket=live)
            except MountFailed as e:
                raise MountError(str(e)) from None
            finally:
                _forget_record(store, target)
            return record
        try:
            pid = start_background(config, target, log_path=log_path, live_socket=live)
        except MountFailed as e:
            raise MountError(f"{e} (log: {log_path})") from None
        record = MountRecord(target, pid, env.name, env.id, chosen.path, log_path)
        _note_holder(lock_fd, pid)
        _write_record(store, record)
        on_mounted(record)
        return record


def _note_holder(lock_fd: int, pid: int) -> None:
    """The lock file names its holder, for "env in use by pid N" messages: the daemon."""
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{pid}\n".encode(), 0)


def _forget_record(store: Store, mountpoint: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_record_path(store, mountpoint))


def unmount_env(store: Store, mountpoint: str, timeout: float = 10.0) -> MountRecord | None:
    """Unmount an agentfs mount (a dead one too) and wait for its daemon to exit, so the env
    is free again when this returns. Returns the record of the mount, if agentctl made it."""
    target = os.path.normpath(os.path.abspath(mountpoint))
    record = read_record(store, target)
    entry = mounts.mount_entry(target)
    if entry is None:
        _forget_record(store, target)
        raise MountError(f"{target} is not mounted")
    if entry.fstype != "fuse.agentfs":
        raise MountError(f"{target} is a {entry.fstype} mount, not agentfs; not touching it")
    try:
        mounts.unmount(target)
    except (mounts.UnmountFailed, mounts.NotMounted) as e:
        raise MountError(str(e)) from None
    if record is not None and not mounts.wait_exited(record.pid, timeout):
        raise MountError(
            f"unmounted {target}, but its agentfs daemon (pid {record.pid}) is still running"
        )
    _forget_record(store, target)
    return record
