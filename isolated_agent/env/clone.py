"""The copy engine's storage half: an env's view of a root as a plain directory tree (a clone),
and what a job changed in that tree recorded back into the env's upper layer in the overlay
format, so that diff, commit, checkpoints and the other engines see it like any other change.

`materialize` clones the host's tree (sharing extents where the filesystem can: FICLONE, else
copy_file_range), then lays each frozen layer and the upper on it, bottom first: a whiteout
removes, an opaque directory replaces, anything else is copied over. It then notes every entry
(path -> inode and type) in a manifest, and a point in ctime after which anything the job
touches carries a later ctime — which a process cannot set back, so a hostile job cannot hide a
change from `record` (it can only lose its own change by leaving it out of the clone).

`record` compares the clone with its manifest: a name that is gone becomes a whiteout (where
something below had the name) or the removal of the upper's entry; a name with another inode or
type is removed and added anew (a directory made anew over one below is opaque); a file,
symlink or directory with a later ctime is copied up whole; files that were one inode in the
clone stay hard links of each other in the upper.

The manifest is written beside the clone, so a run killed before it could record is recorded by
the next one (`recover`).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from isolated_agent.env.store import Root
from isolated_agent.overlay.copyup import copy_data, copy_xattrs_between
from isolated_agent.overlay.format import (
    is_opaque_dir,
    is_whiteout,
    make_opaque,
    make_whiteout,
)
from isolated_agent.system import libc
from isolated_agent.system.trees import remove_tree

# Files above this size are copied extent by extent, holes kept (copy_data); smaller ones whole.
_SPARSE_MINIMUM = 1 << 20

Progress = Callable[[int], None]  # called with the number of entries copied since last call


@dataclass
class Clone:
    root: Root
    path: str  # the clone of the root's view
    entries: dict[str, tuple[int, int]]  # relative path -> (inode, file type bits)
    since_ns: int  # every change the job makes has a ctime after this

    def save(self, manifest: str) -> None:
        data = {"path": self.path, "since_ns": self.since_ns,
                "entries": {k: list(v) for k, v in self.entries.items()}}
        with open(manifest + ".tmp", "w") as f:
            json.dump(data, f)
        os.rename(manifest + ".tmp", manifest)


def count_entries(root: Root) -> int:
    """How many entries materialize copies (for a progress bar): the host tree's and the
    layers' (an estimate where layers replace host entries)."""
    total = 0
    for top in (root.path, *root.layers, root.upper):
        for _, dirs, files in os.walk(top):
            total += len(dirs) + len(files)
    return total


def materialize(root: Root, target: str, progress: Progress | None = None) -> Clone:
    """The env's view of `root` as a plain tree at `target` (which must not exist)."""
    copier = _Copier(progress or (lambda n: None))
    copier.tree(root.path, target)
    for layer in (*reversed(root.layers), root.upper):  # bottom first, the upper last
        copier.lay(layer, target)
    return Clone(root, target, _inventory(target), _ctime_barrier(os.path.dirname(target)))


def load(manifest: str, root: Root) -> Clone | None:
    """The clone whose manifest a run left (killed before it recorded), if any."""
    try:
        with open(manifest) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    entries = {k: (v[0], v[1]) for k, v in data["entries"].items()}
    return Clone(root, data["path"], entries, data["since_ns"])


def _ctime_barrier(directory: str) -> int:
    """A ctime that every change made from now on exceeds: the kernel's timestamps are coarse
    (a tick), so wait until a new change gets a later one than the last copy did."""
    marker = os.path.join(directory, ".ctime-barrier")
    with open(marker, "w"):
        pass
    first = os.stat(marker).st_ctime_ns
    while True:
        os.utime(marker)
        now = os.stat(marker).st_ctime_ns
        if now > first:
            os.unlink(marker)
            return first
        time.sleep(0.001)


# -- copying --------------------------------------------------------------------------------------


class _Copier:
    """Copies entries, keeping files that are one inode in the source one inode in the copy
    (hard links), and counting what it copied for a progress bar."""

    def __init__(self, tick: Progress) -> None:
        self.tick = tick
        self.linked: dict[tuple[int, int], str] = {}  # source (dev, inode) -> first copy
        self.reflinks = True  # until the filesystem says it cannot share extents

    def tree(self, source: str, target: str) -> None:
        st = os.lstat(source)
        os.mkdir(target, 0o700)
        with os.scandir(source) as listing:
            entries = list(listing)
        for entry in entries:
            self.entry(entry.path, os.path.join(target, entry.name))
        self.tick(len(entries))
        _copy_metadata(source, target, st)

    def entry(self, source: str, target: str) -> None:
        st = os.lstat(source)
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFDIR:
            self.tree(source, target)
            return
        if kind == stat.S_IFREG:
            if st.st_nlink > 1:
                first = self.linked.get((st.st_dev, st.st_ino))
                if first is not None and os.path.lexists(first):
                    os.link(first, target)
                    return
                self.linked[(st.st_dev, st.st_ino)] = target
            self.file(source, target, st)
            return
        if kind == stat.S_IFLNK:
            os.symlink(os.readlink(source), target)
        elif kind == stat.S_IFIFO:
            os.mkfifo(target, 0o600)
        else:
            return  # sockets and devices: nothing a job can use from a copy
        _copy_metadata(source, target, st)

    def file(self, source: str, target: str, st: os.stat_result) -> None:
        """A regular file, its data (shared extents where the filesystem can) and metadata
        through the two descriptors: no lookup by name beyond the two opens."""
        src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600)
            try:
                self.data(src, dst, st.st_size)
                copy_xattrs_between(src, dst)
                os.chmod(dst, stat.S_IMODE(st.st_mode))
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def data(self, src: int, dst: int, size: int) -> None:
        if size == 0:
            return
        if self.reflinks:
            try:
                libc.ficlone(dst, src)
                return
            except OSError:
                self.reflinks = False  # one answer is enough: this filesystem cannot
        if size > _SPARSE_MINIMUM:
            copy_data(src, dst, size)  # keeps holes
            return
        done = 0
        while done < size:
            copied = os.copy_file_range(src, dst, size - done)
            if copied == 0:
                break  # the source got shorter
            done += copied

    def replace(self, source: str, target: str) -> None:
        """`target` becomes a copy of `source` (whatever was at `target` goes)."""
        remove_tree(target)
        self.entry(source, target)

    def lay(self, layer: str, target: str) -> None:
        """Lay one overlay layer over the tree at `target`, as overlayfs would show it."""
        for dirpath, dirnames, filenames in os.walk(layer):
            relative = os.path.relpath(dirpath, layer)
            here = os.path.normpath(os.path.join(target, relative))
            for name in list(dirnames):
                source, dest = os.path.join(dirpath, name), os.path.join(here, name)
                if is_opaque_dir(source) or not os.path.isdir(dest) or os.path.islink(dest):
                    self.replace(source, dest)
                    dirnames.remove(name)  # copied whole: nothing to merge below it
                else:
                    _copy_metadata(source, dest, os.lstat(source))
            for name in filenames:
                source, dest = os.path.join(dirpath, name), os.path.join(here, name)
                if is_whiteout(os.lstat(source)):
                    remove_tree(dest)
                else:
                    self.replace(source, dest)
            self.tick(len(dirnames) + len(filenames))
        # Directory times last: laying entries into a directory changed its mtime.
        for dirpath, _, _ in os.walk(layer):
            dest = os.path.normpath(os.path.join(target, os.path.relpath(dirpath, layer)))
            st = os.lstat(dirpath)
            with contextlib.suppress(OSError):
                os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_metadata(source: str, target: str, st: os.stat_result) -> None:
    """Mode, user xattrs (never the overlay's own) and times; owners stay the caller's."""
    if not stat.S_ISLNK(st.st_mode):
        copy_xattrs_between(source, target)
        os.chmod(target, stat.S_IMODE(st.st_mode))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _inventory(top: str, prefix: str = "") -> dict[str, tuple[int, int]]:
    """relative path -> (inode, file type) of every entry below `top`, from the listings
    alone (d_ino and d_type: no stat, but where the filesystem does not give the type)."""
    found: dict[str, tuple[int, int]] = {}
    with os.scandir(top) as listing:
        for entry in listing:
            path = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                found[path] = (entry.inode(), stat.S_IFDIR)
                found.update(_inventory(entry.path, path + "/"))
            elif entry.is_symlink():
                found[path] = (entry.inode(), stat.S_IFLNK)
            elif entry.is_file(follow_symlinks=False):
                found[path] = (entry.inode(), stat.S_IFREG)
            else:
                found[path] = (entry.inode(), stat.S_IFMT(entry.stat(follow_symlinks=False)
                                                          .st_mode))
    return found


def _walk(top: str, prefix: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of every entry below `top`, parents before children."""
    with os.scandir(top) as listing:
        entries = list(listing)
    for entry in entries:
        path = prefix + entry.name
        yield path, entry.stat(follow_symlinks=False)
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path, path + "/")


# -- recording ------------------------------------------------------------------------------------


def record(clone: Clone) -> None:
    """Write what the job changed in the clone into the root's upper layer."""
    _Recorder(clone).run()


def _replaced(seen: tuple[int, int], st: os.stat_result) -> bool:
    return seen[0] != st.st_ino or seen[1] != stat.S_IFMT(st.st_mode)


def _topmost(paths: list[str]) -> Iterator[str]:
    """Sorted paths without those below another of them."""
    last = None
    for path in paths:
        if last is not None and path.startswith(last + "/"):
            continue
        last = path
        yield path


def exists_below(root: Root, path: str) -> bool:
    """Whether the frozen layers and the host tree (not the upper) show an entry at `path`."""
    parts = path.split("/")
    for layer in root.layers:  # top first
        hides_below = False
        for depth in range(1, len(parts) + 1):
            here = os.path.join(layer, *parts[:depth])
            try:
                st = os.lstat(here)
            except OSError:
                break  # not in this layer
            if is_whiteout(st):
                return False
            if depth == len(parts):
                return True
            if not stat.S_ISDIR(st.st_mode):
                return False  # a file of this layer hides the rest of the path
            hides_below = hides_below or is_opaque_dir(here)
        if hides_below:
            return False  # an opaque directory of this layer: nothing below shows under it
    return os.path.lexists(os.path.join(root.path, path))


class _Recorder:
    def __init__(self, clone: Clone) -> None:
        self.clone = clone
        self.root = clone.root
        self.before = clone.entries
        self.after = dict(_walk(clone.path))
        self.linked: dict[int, str] = {}  # clone inode -> the path first recorded for it
        self.directories: set[str] = set()  # upper dirs made or changed: metadata set last
        self.copier = _Copier(lambda n: None)

    def run(self) -> None:
        before, after = self.before, self.after
        gone = [p for p in before if p not in after or _replaced(before[p], after[p])]
        for path in _topmost(sorted(gone)):
            self.remove(path, whiteout=True)
        for path in sorted(after):  # parents before children
            st = after[path]
            new = path not in before or _replaced(before[path], st)
            if not new and st.st_ctime_ns <= self.clone.since_ns:
                continue
            if self.under_new_directory(path):
                continue  # copied with it
            self.remove(path, whiteout=False)
            if stat.S_ISDIR(st.st_mode) and new:
                self.add_directory(path, opaque=exists_below(self.root, path))
            elif stat.S_ISDIR(st.st_mode):
                self.directory(path)
            else:
                self.directory(os.path.dirname(path))
                self.add_leaf(path, st)
        # Children first: what was laid into a directory moved its mtime.
        for path in sorted(self.directories, reverse=True):
            _copy_metadata(os.path.join(self.clone.path, path),
                           os.path.join(self.root.upper, path), after[path])

    def under_new_directory(self, path: str) -> bool:
        parent = os.path.dirname(path)
        while parent:
            if parent not in self.before or _replaced(self.before[parent], self.after[parent]):
                return True
            parent = os.path.dirname(parent)
        return False

    def remove(self, path: str, whiteout: bool) -> None:
        """The upper's entry at `path` goes (a directory the job kept stays); with
        `whiteout`, a whiteout hides what is below, if anything is."""
        upper = os.path.join(self.root.upper, path)
        if not whiteout and os.path.isdir(upper) and not os.path.islink(upper) and \
                stat.S_ISDIR(self.after[path].st_mode) and path in self.before and \
                not _replaced(self.before[path], self.after[path]):
            return
        remove_tree(upper)
        if whiteout and exists_below(self.root, path):
            self.directory(os.path.dirname(path))
            make_whiteout(upper)

    def directory(self, path: str) -> None:
        """The upper has a directory at `path`, merging with what is below."""
        if not path:
            return
        self.directories.add(path)
        upper = os.path.join(self.root.upper, path)
        if not os.path.isdir(upper) or os.path.islink(upper):
            self.directory(os.path.dirname(path))
            os.mkdir(upper, 0o700)

    def add_directory(self, path: str, opaque: bool) -> None:
        """A directory the job made (over one below: opaque), with all it holds."""
        self.directory(os.path.dirname(path))
        upper = os.path.join(self.root.upper, path)
        os.mkdir(upper, 0o700)
        self.directories.add(path)
        if opaque:
            make_opaque(upper)
        for entry in sorted(os.scandir(os.path.join(self.clone.path, path)),
                            key=lambda e: e.name):
            child = os.path.join(path, entry.name)
            if entry.is_dir(follow_symlinks=False):
                self.add_directory(child, opaque=False)
            else:
                self.add_leaf(child, entry.stat(follow_symlinks=False))

    def add_leaf(self, path: str, st: os.stat_result) -> None:
        upper = os.path.join(self.root.upper, path)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            first = self.linked.get(st.st_ino)
            if first is not None:
                os.link(os.path.join(self.root.upper, first), upper)
                return
            self.linked[st.st_ino] = path
        self.copier.entry(os.path.join(self.clone.path, path), upper)
