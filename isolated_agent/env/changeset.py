"""An env's changes: how the view its layers give differs from the host, root by root.

The view of a root is upper ∪ frozen layers ∪ host − whiteouts (DESIGN §3, §11), except under a
layer directory that *hides* what is below it: an opaque one (`user.overlay.opaque`), or one that
sits over a lower whiteout or non-directory. There the view is the layers' subtree alone. A
change is a path whose entry in the view differs from the host's entry:

    A  added      the view has an entry where the host has none
    M  modified   same type; different content, permission bits, owner, symlink target or data
                  xattrs
    T  type       different type (file -> symlink, dir -> file, ...)
    D  deleted    the host has an entry the view does not (whiteout, or hidden by a directory)

A deleted directory is expanded: every entry of the host subtree is a D of its own, so a commit
can back each one up and a diff can show each file. A copied-up entry that ended identical to the
host (a `touch`, a rewrite with the same bytes, a chmod undone) is not a change; neither are time
differences (commit carries them along with the entries it writes). An owner (uid or gid) is:
a `chown` alone is a change. Extended attributes are compared where they are the file's own
data (`data_xattrs`): a `setfattr` alone is a change too.
Changes come out in path order (by root, then by the bytes of the path), so output is
deterministic.

The walk goes through directory fds, one per level and side, with the *at calls, so a tree deeper
than PATH_MAX reads like any other; `Entry.path` names an entry for later reads, which go through
`fdpath` for the same reason.

Privileges: an entry the view would give the host setuid or setgid bits, or file capabilities
(the `security.capability` xattr), is flagged (`Entry.privileges`), because a commit run by root
would turn it into a privileged program on the host. Directories carry none: setgid on a
directory only makes new entries inherit its group (shared project directories rely on it), and
Linux ignores setuid on directories.

Each change remembers `seen_from`: the layer entry whose creation marks the moment the env took the
path over (the copy-up, the create, the whiteout, or the directory hiding it; in a stack, the
oldest of the env's own versions of the path). Commit uses its
birth time to tell whether the host changed the path afterwards (see `commit.find_conflicts`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass, field
from typing import BinaryIO

from isolated_agent.env.selection import Selection
from isolated_agent.env.store import Env
from isolated_agent.errors import RootMissing, StoreError
from isolated_agent.overlay.chains import entries_at, open_chain, root_chain
from isolated_agent.overlay.format import is_private_xattr, is_whiteout
from isolated_agent.system import fdpath

ADDED, MODIFIED, TYPE_CHANGED, DELETED = "A", "M", "T", "D"

_CHUNK = 1 << 20
_UNSUPPORTED_XATTRS = ("user.overlay.metacopy", "user.overlay.redirect")

CAPABILITY_XATTR = "security.capability"
PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID
SETUID, SETGID, CAPABILITIES = "setuid", "setgid", "capabilities"


@dataclass(frozen=True, slots=True)
class Entry:
    """One side of a change: the host's entry (old) or the env's upper entry (new)."""

    path: bytes  # where it lives: the host path, or the path inside the upper layer
    mode: int
    size: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    nlink: int
    rdev: int

    @classmethod
    def of(cls, path: bytes, st: os.stat_result) -> Entry:
        return cls(
            path, st.st_mode, st.st_size, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_atime_ns,
            st.st_ctime_ns, st.st_ino, st.st_dev, st.st_nlink, st.st_rdev,
        )

    @property
    def kind(self) -> str:
        return kind_of(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def perms(self) -> int:
        return stat.S_IMODE(self.mode)

    @property
    def owner(self) -> tuple[int, int]:
        return self.uid, self.gid

    def target(self) -> bytes:
        return fdpath.readlink(self.path)

    def privileges(self) -> tuple[str, ...]:
        """What would make this entry run with more privilege than its caller: (setuid,
        setgid, capabilities), those it has, in that order; nothing for a directory."""
        if self.is_dir:
            return ()
        found = []
        if self.mode & stat.S_ISUID:
            found.append(SETUID)
        if self.mode & stat.S_ISGID:
            found.append(SETGID)
        if stat.S_ISREG(self.mode) and has_capabilities(self.path):
            found.append(CAPABILITIES)
        return tuple(found)


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "char"
    return "block"


@dataclass(frozen=True, slots=True)
class Change:
    root: int
    rel: bytes  # path relative to the root; never empty
    status: str  # ADDED, MODIFIED, TYPE_CHANGED or DELETED
    old: Entry | None  # the host's entry (None for A)
    new: Entry | None  # the env's entry (None for D)
    seen_from: bytes  # the upper entry whose birth is when the env took this path over
    content_changed: bool  # data or symlink target differ (always True for A/D/T non-dirs)
    xattrs_changed: bool = False  # M only: the data xattrs differ (see `data_xattrs`)

    @property
    def mode_changed(self) -> bool:
        return self.old is not None and self.new is not None and self.old.perms != self.new.perms

    @property
    def owner_changed(self) -> bool:
        return self.old is not None and self.new is not None and self.old.owner != self.new.owner

    def privileges(self) -> tuple[str, ...]:
        """The privileges the env's entry would bring to the host (see the module)."""
        return () if self.new is None else self.new.privileges()


@dataclass
class Changeset:
    env: Env
    selection: Selection
    changes: list[Change] = field(default_factory=list)  # selected, in path order
    context: list[Change] = field(default_factory=list)  # changes of the dirs leading to them
    # Upper regular files identical to the host that share their inode with other upper names
    # (hard links made in the env): (dev, ino) -> [(root, rel)].
    unchanged_links: dict[tuple[int, int], list[tuple[int, bytes]]] = field(default_factory=dict)

    def unknown_paths(self) -> list[str]:
        """Selected paths that neither exist on the host nor have a change in the env (most
        likely typos), as absolute host paths."""
        unknown: list[str] = []
        for root, prefix in self.selection.prefixes or ():
            if not prefix:
                continue
            selection = Selection(((root, prefix),))
            if any(selection.matches(c.root, c.rel) for c in self.changes):
                continue
            host = os.path.join(self.env.roots[root].path, os.fsdecode(prefix))
            if fdpath.lstat_or_none(os.fsencode(host)) is None:
                unknown.append(host)
        return unknown


def read_changeset(env: Env, selection: Selection | None = None) -> Changeset:
    """The env's changes, restricted to `selection` (default: everything)."""
    return read_view_changes(env, env_layers(env), selection)


def env_layers(env: Env) -> dict[int, list[str]]:
    """The layers of the env's view as it is now, per root, top first: its upper, then its
    frozen layers."""
    return {root.index: [root.upper, *root.layers] for root in env.roots}


def read_view_changes(
    env: Env, layers: dict[int, list[str]], selection: Selection | None = None
) -> Changeset:
    """The changes of the view that `layers` (per root index, top first) give over the host:
    the env's own (read_changeset), or a checkpoint's."""
    selection = selection or Selection(None)
    reader = _Reader(env, selection)
    wanted = selection.roots()
    for root in env.roots:
        if not os.path.isdir(root.path):
            raise RootMissing(env.name, root.path)
        if wanted is not None and root.index not in wanted:
            continue
        opened: list[Layer] = []
        try:
            for layer in layers[root.index]:
                try:
                    opened.append((os.open(layer, fdpath.DIR_READ), os.fsencode(layer)))
                except OSError as e:
                    raise StoreError(
                        f"the layer {layer} of env {env.name} is missing; the store is damaged"
                    ) from e
            host = os.fsencode(root.path)
            host_fd = os.open(host, fdpath.DIR_PATH)
            try:
                merged, cut = root_chain([fd for fd, _ in opened])
                chain = opened[: len(merged)]
                hider = chain[-1][1] if chain else host
                reader.walk(root.index, b"", chain, host_fd, host, cut, hider)
            finally:
                os.close(host_fd)
        finally:
            for fd, _ in opened:
                os.close(fd)
    result = Changeset(env, selection)
    for change in sorted(reader.found, key=lambda c: (c.root, c.rel)):
        if selection.matches(change.root, change.rel):
            result.changes.append(change)
        else:
            result.context.append(change)
    result.unchanged_links = reader.unchanged_links
    return result


Layer = tuple[int, bytes]  # a directory of a layer: an fd open on it, and its path


class _Reader:
    """Walks the layers of a view and the host beside them through directory fds, one per level,
    layer and side (trees can be deeper than PATH_MAX); the paths it builds are names for the
    results, never handed to the kernel here.

    A directory of the view is a chain of layer directories (overlay/chains.py), each with its
    path here."""

    def __init__(self, env: Env, selection: Selection) -> None:
        self.env = env
        self.selection = selection
        self.found: list[Change] = []
        self.unchanged_links: dict[tuple[int, int], list[tuple[int, bytes]]] = {}

    def walk(
        self, root: int, rel: bytes, chain: list[Layer], host_fd: int | None,
        host_dir: bytes | None, hides_host: bool, hider: bytes,
    ) -> None:
        """Visit the view's directory at `rel`, made of `chain`. `host_fd`/`host_dir` is the
        host's directory there (None when the host has no directory there); `hides_host`: the
        host's entries under it are hidden, and `hider` is the layer entry that hides them."""
        names: dict[bytes, None] = {}
        for fd, path in chain:
            try:
                names.update((os.fsencode(name), None) for name in os.listdir(fd))
            except OSError as e:
                raise self._layer_error(path, e) from e
        fds = [fd for fd, _ in chain]
        for name in names:
            path = join(rel, name)
            if not self.selection.relevant(root, path):
                continue
            host_path = None if host_dir is None else host_dir + b"/" + name
            host_st = None if host_fd is None else fdpath.lstat_at(host_fd, name)
            self.visit(root, path, chain, fds, name, host_fd, host_path, host_st, hides_host,
                       hider)
        if hides_host and host_fd is not None and host_dir is not None:
            for host_name in _list_at(host_fd):
                if host_name in names:
                    continue
                path = join(rel, host_name)
                if not self.selection.relevant(root, path):
                    continue
                host_st = fdpath.lstat_at(host_fd, host_name)
                if host_st is not None:
                    self.deleted(root, path, host_fd, host_name, host_dir + b"/" + host_name,
                                 host_st, hider)

    def visit(
        self, root: int, rel: bytes, chain: list[Layer], fds: list[int], name: bytes,
        host_fd: int | None, host_path: bytes | None, host_st: os.stat_result | None,
        hides_host: bool, hider: bytes,
    ) -> None:
        found = entries_at(fds, name)
        entries = [(fds[i], chain[i][1] + b"/" + name, st) for i, st in found]
        top_fd, upper_path, st = entries[0]
        if is_whiteout(st):
            if host_st is not None and host_path is not None and host_fd is not None:
                self.deleted(root, rel, host_fd, name, host_path, host_st, upper_path)
            return
        new = Entry.of(upper_path, st)
        if stat.S_ISDIR(st.st_mode):
            try:
                opened, cut = open_chain(fds, found, name)
            except OSError as e:
                raise self._layer_error(upper_path, e) from e
            children = [(fd, entries[i][1]) for i, fd in enumerate(opened)]
            cut_by = None if cut is None else entries[cut][1]  # what hides the host below
            try:
                for parent_fd, path, _ in entries[: len(children)]:
                    self._check_supported(fdpath.child_path(parent_fd, name), path)
                self._visit_dir(root, rel, children, upper_path, new, host_fd, name, host_path,
                                host_st, hides_host, hider, cut_by)
            finally:
                for fd in opened:
                    os.close(fd)
            return
        if stat.S_ISREG(st.st_mode) and st.st_blocks * 512 < st.st_size:
            # Only a file with holes can be a metacopy (its data left in the lower layer).
            self._check_supported(fdpath.child_path(top_fd, name), upper_path)
        if host_st is None or host_path is None or host_fd is None:
            self.add(root, rel, ADDED, None, new, upper_path, True)
            return
        # The env took the path over when the oldest of its own versions of it was made.
        taken_at = upper_path
        for _, older, older_st in entries[1:]:
            if stat.S_ISDIR(older_st.st_mode):
                break
            taken_at = older
        old = Entry.of(host_path, host_st)
        if old.is_dir:
            self.add(root, rel, TYPE_CHANGED, old, new, taken_at, True)
            self.expand(root, rel, host_fd, name, host_path, taken_at)
            return
        if stat.S_IFMT(old.mode) != stat.S_IFMT(new.mode):
            self.add(root, rel, TYPE_CHANGED, old, new, taken_at, True)
            return
        content_changed = not same_content(old, new)
        xattrs_changed = data_xattrs(old.path) != data_xattrs(new.path)
        if content_changed or xattrs_changed or (old.perms, old.owner) != (new.perms, new.owner):
            self.add(root, rel, MODIFIED, old, new, taken_at, content_changed, xattrs_changed)
        elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            self.unchanged_links.setdefault((st.st_dev, st.st_ino), []).append((root, rel))

    def _visit_dir(
        self, root: int, rel: bytes, chain: list[Layer], upper_path: bytes, new: Entry,
        host_fd: int | None, name: bytes, host_path: bytes | None,
        host_st: os.stat_result | None, hides_host: bool, hider: bytes, cut_by: bytes | None,
    ) -> None:
        if host_st is None or host_path is None or host_fd is None:
            self.add(root, rel, ADDED, None, new, upper_path, True)
            self.walk(root, rel, chain, None, None, False, upper_path)
            return
        old = Entry.of(host_path, host_st)
        if not old.is_dir:
            self.add(root, rel, TYPE_CHANGED, old, new, upper_path, True)
            self.walk(root, rel, chain, None, None, False, upper_path)
            return
        xattrs_changed = data_xattrs(old.path) != data_xattrs(new.path)
        if xattrs_changed or (old.perms, old.owner) != (new.perms, new.owner):
            self.add(root, rel, MODIFIED, old, new, upper_path, False, xattrs_changed)
        with fdpath.dir_at(host_fd, name) as host_child:
            if host_child is None:  # gone from the host since it was looked at
                self.walk(root, rel, chain, None, None, False, upper_path)
            elif hides_host:
                self.walk(root, rel, chain, host_child, host_path, True, hider)
            elif cut_by is not None:
                self.walk(root, rel, chain, host_child, host_path, True, cut_by)
            else:
                self.walk(root, rel, chain, host_child, host_path, False, upper_path)

    def deleted(
        self, root: int, rel: bytes, parent_fd: int, name: bytes, host_path: bytes,
        host_st: os.stat_result, hider: bytes,
    ) -> None:
        self.add(root, rel, DELETED, Entry.of(host_path, host_st), None, hider, True)
        if stat.S_ISDIR(host_st.st_mode):
            self.expand(root, rel, parent_fd, name, host_path, hider)

    def expand(
        self, root: int, rel: bytes, parent_fd: int, name: bytes, host_dir: bytes, hider: bytes
    ) -> None:
        """Every entry under a host directory the view hides is deleted."""
        with fdpath.dir_at(parent_fd, name) as fd:
            if fd is None:
                return
            for child in _list_at(fd):
                path = join(rel, child)
                if not self.selection.relevant(root, path):
                    continue
                host_st = fdpath.lstat_at(fd, child)
                if host_st is not None:
                    self.deleted(root, path, fd, child, host_dir + b"/" + child, host_st, hider)

    def add(
        self, root: int, rel: bytes, status: str, old: Entry | None, new: Entry | None,
        seen_from: bytes, content_changed: bool, xattrs_changed: bool = False,
    ) -> None:
        self.found.append(
            Change(root, rel, status, old, new, seen_from, content_changed, xattrs_changed))

    def _layer_error(self, upper_path: bytes, e: OSError) -> StoreError:
        return StoreError(
            f"cannot read the layer of env {self.env.name} at {os.fsdecode(upper_path)}: "
            f"{e.strerror}"
        )

    def _check_supported(self, xattr_path: bytes, upper_path: bytes) -> None:
        # Our engines mount with userxattr, which rules out metacopy and redirect_dir; a layer
        # carrying them came from elsewhere, and committing it would lose data.
        for name in _UNSUPPORTED_XATTRS:
            try:
                os.getxattr(xattr_path, name, follow_symlinks=False)
            except OSError:
                continue
            raise StoreError(
                f"{os.fsdecode(upper_path)} carries {name}, which agentctl does not support; "
                "this layer was not made by agentctl"
            )


# Extended attributes that are the file's own data. Security labels belong to the machine (each
# filesystem and policy gives its own), file capabilities are privileges (see the module), and
# user.overlay.* is the layer format's.
DATA_XATTR_PREFIXES = ("user.", "system.posix_acl_")


def data_xattrs(path: bytes) -> dict[str, bytes]:
    """The data xattrs of `path` (a symlink's own), by name; empty where it has none or the
    filesystem keeps none."""
    values: dict[str, bytes] = {}
    try:
        with fdpath.xattr_path(path) as short:
            for name in os.listxattr(short, follow_symlinks=False):
                if name.startswith(DATA_XATTR_PREFIXES) and not is_private_xattr(name):
                    with contextlib.suppress(OSError):
                        values[name] = os.getxattr(short, name, follow_symlinks=False)
    except OSError:
        pass
    return values


def has_capabilities(path: bytes) -> bool:
    try:
        fdpath.getxattr(path, CAPABILITY_XATTR)
    except OSError:
        return False
    return True


def unprivileged_mode(mode: int) -> int:
    """`mode` without setuid and setgid — unless it is a directory's (see the module)."""
    return mode if stat.S_ISDIR(mode) else mode & ~PRIVILEGE_BITS


def join(rel: bytes, name: bytes) -> bytes:
    return name if not rel else rel + b"/" + name


def _list_at(dir_fd: int) -> list[bytes]:
    try:
        return fdpath.listdir_at(dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return []
        raise


def same_content(old: Entry, new: Entry) -> bool:
    """Do two entries of the same type hold the same thing (data, target, device)?"""
    if stat.S_ISLNK(old.mode):
        return old.target() == new.target()
    if not stat.S_ISREG(old.mode):
        return old.rdev == new.rdev
    if old.size != new.size:
        return False
    if old.size == 0:
        return True
    try:
        return same_file_data(old.path, new.path)
    except OSError:
        return False  # unreadable (e.g. mode 000 without privilege): show it as changed


def same_file_data(a: bytes, b: bytes) -> bool:
    with open_file(a) as fa, open_file(b) as fb:
        while True:
            chunk_a = fa.read(_CHUNK)
            chunk_b = fb.read(_CHUNK)
            if chunk_a != chunk_b:
                return False
            if not chunk_a:
                return True


def open_file(path: bytes) -> BinaryIO:
    """`path` (of any length) opened for reading, unbuffered."""
    return os.fdopen(fdpath.open_fd(path, os.O_RDONLY), "rb", buffering=0)
