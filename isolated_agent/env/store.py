"""The env store: where envs live on disk and the operations on them.

Layout under the store root (`$ISOLATED_AGENT_HOME`, default `$XDG_DATA_HOME/isolated-agent`):

    catalog.sqlite            envs and their roots (see catalog.py)
    envs/<id>/lock            flock'ed by whoever uses the env (a run, a discard, a removal)
    envs/<id>/roots/<n>/upper the overlayfs upper layer of root n (DESIGN §3)
    envs/<id>/roots/<n>/work  overlayfs work dir, same filesystem as upper
    layers/<id>/roots/<n>     a frozen layer of root n: an upper renamed here by a checkpoint,
                              read-only from then on, shared by every stack naming it (stack.py)
    run/                      sockets and pid files of daemons

Rules kept here: managed roots are absolute, resolved, existing directories; never `/`, never
nested in one another, never overlapping the store. One user of an env at a time: every
operation that changes an env holds its lock, and a second one is refused with a clear message.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import sqlite3
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from isolated_agent.env.catalog import Catalog, EnvRecord
from isolated_agent.env.layers import (
    collect_layers,
    finish_interrupted_freeze,
    has_pending_layers,
)
from isolated_agent.errors import EnvBusy, EnvNotFound, StoreError, UsageError, store_full
from isolated_agent.system.sqlite import OutOfSpace
from isolated_agent.system.trees import remove_tree

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def default_home() -> str:
    home = os.environ.get("ISOLATED_AGENT_HOME")
    if home:
        return os.path.abspath(home)
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return os.path.join(os.path.abspath(data), "isolated-agent")


@dataclass(frozen=True)
class Root:
    """One managed root of an env: the host directory and the env's layers over it."""

    index: int
    path: str
    upper: str
    work: str
    layers: tuple[str, ...] = ()  # frozen layers between upper and the host, top first

    @property
    def lowers(self) -> list[str]:
        """What the upper is mounted over, top first: the frozen layers, then the host."""
        return [*self.layers, self.path]


# Where the copy engine clones an env's roots for a job (engines/copy.py), in the env's dir.
COPY_WORKSPACE = "copy"


def show_host_root(root: Root) -> None:
    """Give the upper's root directory the host root's permission bits (setgid and sticky
    included) and group: the merged view's root directory is the upper's, and what a job makes
    there inherits from it as from the host's (a 2770 project root's group and setgid bit).

    A root run gets the host root's owner too, whom it writes as (engines/id_swap.py: another
    user's tree is seen as root's); a root run has no capabilities and writes as the owner, so
    for root the owner's bits stay rwx (root natively writes in a 0555 directory too). A
    user's run keeps its own. A change is always below a root, never the root's own
    attributes, so nothing of the env's is overwritten. A group the caller may not give (not
    one of theirs, rootless) is left as it is."""
    st = os.stat(root.path)
    with contextlib.suppress(PermissionError):
        os.chown(root.upper, st.st_uid if os.geteuid() == 0 else -1, st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    os.chmod(root.upper, mode | 0o700 if os.geteuid() == 0 else mode)


@dataclass(frozen=True)
class Env:
    id: str
    name: str
    created: float
    dir: str
    roots: tuple[Root, ...]
    layers: tuple[str, ...] = ()  # ids of the frozen layers under the live upper, bottom first

    @property
    def lock_path(self) -> str:
        return os.path.join(self.dir, "lock")


class Store:
    def __init__(self, home: str | None = None) -> None:
        self.home = os.path.realpath(home or default_home())
        try:
            os.makedirs(os.path.join(self.home, "envs"), mode=0o700, exist_ok=True)
            os.makedirs(os.path.join(self.home, "run"), mode=0o700, exist_ok=True)
            os.makedirs(os.path.join(self.home, "layers"), mode=0o700, exist_ok=True)
            self.catalog = Catalog(os.path.join(self.home, "catalog.sqlite"))
        except OSError as e:
            raise StoreError(
                f"cannot use the store at {self.home}: {e.strerror}; "
                "set ISOLATED_AGENT_HOME to a writable directory"
            ) from e
        except OutOfSpace as e:
            raise StoreError(
                store_full("the store", self.home, f"{e.free_text} free on its filesystem")
            ) from e
        except Exception as e:  # sqlite3.Error: a damaged or foreign catalog file
            raise StoreError(
                f"cannot open the catalog {self.home}/catalog.sqlite: {e}; "
                "move it away or point ISOLATED_AGENT_HOME elsewhere"
            ) from e

    def close(self) -> None:
        self.catalog.close()

    @property
    def run_dir(self) -> str:
        return os.path.join(self.home, "run")

    def layer_dir(self, layer_id: str, index: int | None = None) -> str:
        """The directory of a frozen layer, or of its part for root `index`."""
        path = os.path.join(self.home, "layers", layer_id)
        return path if index is None else os.path.join(path, "roots", str(index))

    # -- roots --------------------------------------------------------------------------------

    def resolve_roots(self, paths: list[str], cwd: str | None = None) -> list[str]:
        """Turn user-given root paths into validated absolute real paths (default: cwd)."""
        cwd = cwd or os.getcwd()
        resolved: list[str] = []
        for given in paths or [cwd]:
            path = os.path.realpath(os.path.join(cwd, os.path.expanduser(given)))
            if not os.path.exists(path):
                raise UsageError(f"root {given} does not exist; create it or pick another --root")
            if not os.path.isdir(path):
                raise UsageError(f"root {given} is not a directory; a root must be a directory")
            if path == "/":
                raise UsageError("/ cannot be a managed root; pick your project directory")
            if is_within(path, self.home) or is_within(self.home, path):
                raise UsageError(
                    f"root {path} overlaps the store {self.home}; "
                    "set ISOLATED_AGENT_HOME outside your project"
                )
            if path not in resolved:
                resolved.append(path)
        for a in resolved:
            for b in resolved:
                if a != b and is_within(a, b):
                    raise UsageError(f"roots {b} and {a} are nested; give only {b}")
        return resolved

    # -- envs ---------------------------------------------------------------------------------

    def create(
        self, name: str | None, roots: list[str],
        then: Callable[[sqlite3.Connection, str], None] = lambda db, env_id: None,
    ) -> Env:
        """A new env over `roots`; `then(db, env_id)` runs in the transaction that adds it."""
        if name is not None:
            check_name(name)
        env_id = secrets.token_hex(4)
        if name is None:
            base = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(roots[0])).lstrip("-._")
            name = f"{base[:40] or 'env'}-{env_id[:4]}"
        if self.catalog.name_taken(name):
            raise UsageError(f"an env named {name!r} exists already; pick another name")
        env_dir = os.path.join(self.home, "envs", env_id)
        try:
            for index in range(len(roots)):
                for part in ("upper", "work"):
                    os.makedirs(os.path.join(env_dir, "roots", str(index), part), mode=0o755)
            open(os.path.join(env_dir, "lock"), "a").close()
            record = self.catalog.add_env(env_id, name, roots, lambda db: then(db, env_id))
        except OSError as e:
            shutil.rmtree(env_dir, ignore_errors=True)
            raise StoreError(f"cannot create env {name} in {self.home}: {e.strerror}") from e
        except BaseException:
            shutil.rmtree(env_dir, ignore_errors=True)
            raise
        return self._env(record)

    def get(self, name_or_id: str) -> Env:
        record = self.catalog.find_env(name_or_id)
        if record is None:
            raise EnvNotFound(name_or_id)
        env = self._env(record)
        if has_pending_layers(self.home, env.id):
            # A crash in a checkpoint: readers (diff, log) must not see the half-moved upper.
            # Taking the lock finishes it, unless someone holds it (then it is theirs to do).
            with contextlib.suppress(EnvBusy), self.lock(env, purpose="read it"):
                pass
        return env

    def list_envs(self) -> list[Env]:
        return [self._env(r) for r in self.catalog.list_envs()]

    def envs_for_roots(self, roots: list[str]) -> list[Env]:
        return [e for e in self.list_envs() if [r.path for r in e.roots] == roots]

    def remove(self, env: Env) -> None:
        """Remove the env, its checkpoints, and the layers nothing else uses."""
        with self.lock(env, purpose="remove it"):
            trash = os.path.join(self.home, "envs", f".removing-{env.id}")
            os.rename(env.dir, trash)
            self.catalog.remove_env(env.id)
        remove_tree(trash)
        collect_layers(self.home, self.catalog)

    def discard(self, env: Env) -> None:
        """Drop every change of the env: its upper becomes empty and its stack too (the
        frozen layers stay with the checkpoints that name them); the env itself stays."""
        with self.lock(env, purpose="discard it"):
            for root in env.roots:
                for part in (root.upper, root.work):
                    remove_tree(part)
                    os.makedirs(part, mode=0o755)
            remove_tree(os.path.join(env.dir, COPY_WORKSPACE))  # a killed copy run's clones
            if env.layers:
                with self.catalog.transaction() as db:
                    self.catalog.set_env_layers(db, env.id, ())

    @contextmanager
    def lock(self, env: Env, purpose: str) -> Iterator[int]:
        """Hold the env's lock; refuse at once (no waiting) when another process holds it.

        The lock is an flock on an open file description: it is released when the last process
        holding a copy of the descriptor exits, however it exits, so a crashed run never leaves
        an env locked.
        """
        fd = os.open(env.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise EnvBusy(
                    f"env {env.name} is in use by another agentctl process (pid {holder}); "
                    f"wait for it to finish before you {purpose}, or use another env"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            finish_interrupted_freeze(self.home, self.catalog, env.id,
                                      [(r.index, r.upper) for r in env.roots])
            yield fd
        finally:
            os.close(fd)

    def in_use(self, env: Env) -> bool:
        fd = os.open(env.lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def _env(self, record: EnvRecord) -> Env:
        env_dir = os.path.join(self.home, "envs", record.id)
        layers = self.catalog.env_layers(record.id)
        roots = tuple(
            Root(
                index=i,
                path=path,
                upper=os.path.join(env_dir, "roots", str(i), "upper"),
                work=os.path.join(env_dir, "roots", str(i), "work"),
                layers=tuple(self.layer_dir(layer, i) for layer in reversed(layers)),
            )
            for i, path in enumerate(record.roots)
        )
        return Env(record.id, record.name, record.created, env_dir, roots, layers)


def live_socket_path(run_dir: str, env_id: str, index: int) -> str:
    """The control socket of the agentfs daemon serving root `index` of a job in env `env_id`
    (`run --engine fuse`): where a live checkpoint asks it to freeze the upper (env/stack.py)."""
    return os.path.join(run_dir, "live", f"{env_id}-{index}.sock")


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"{name!r} is not a valid env name: use letters, digits, '.', '_' and '-' "
            "(at most 64, starting with a letter or digit)"
        )


def count_changes(env: Env) -> int:
    """How many entries the env's layers hold, its upper and its frozen ones (files, dirs,
    whiteouts)."""
    total = 0
    for root in env.roots:
        for layer in (root.upper, *root.layers):
            for _, dirs, files in os.walk(layer):
                total += len(dirs) + len(files)
    return total


def is_within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")
