"""Rendering a changeset the way `git diff` does: unified patches, --stat, --name-status, JSON.

Pure rendering: everything is returned as bytes lines (names need not be UTF-8) or plain data; the
CLI decides where it goes and whether it is coloured. Directories carry no content, so the patch
shows them only for a permission change; --name-status and JSON list every change, directories
with a trailing "/". JSON gives each change the privileges (setuid, setgid,
capabilities) its new entry would bring to the host; the CLI warns about those on stderr, so
the patch itself stays what git would print.
"""

from __future__ import annotations

import difflib
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from isolated_agent.env.changeset import (
    ADDED,
    DELETED,
    MODIFIED,
    TYPE_CHANGED,
    Change,
    Changeset,
    Entry,
    data_xattrs,
    open_file,
    same_file_data,
)

TEXT_LIMIT = 64 << 20  # larger files are summarised, not diffed line by line
_BINARY_PROBE = 8000  # as git: a NUL byte in the first 8000 bytes makes a file binary
_CONTEXT = 3
_PREFETCH_FROM = 64  # changes; fewer are read in line
_READERS = 4
_BATCH = 32  # changes read by one task (a task per file costs more than a warm read)
_WINDOW = 16  # batches in flight

# ANSI styles, as git colours its diffs
META, FRAG, OLD, NEW, RESET = b"\x1b[1m", b"\x1b[36m", b"\x1b[31m", b"\x1b[32m", b"\x1b[m"
_NO_NEWLINE = b"\\ No newline at end of file"


@dataclass(frozen=True)
class Content:
    """What one side of a change holds, as far as a diff is concerned."""

    lines: list[bytes]  # with their line endings
    binary: bool  # binary, too large, or a kind with no content (fifo, device)
    size: int


def display_path(changeset: Changeset, change: Change) -> bytes:
    """A change's path as shown: relative to its root, or absolute when the env has several."""
    if len(changeset.env.roots) == 1:
        return change.rel
    root = os.fsencode(changeset.env.roots[change.root].path).lstrip(b"/")
    return root + b"/" + change.rel


def content_of(entry: Entry | None) -> Content:
    if entry is None:
        return Content([], False, 0)
    if stat.S_ISLNK(entry.mode):
        target = entry.target()
        return Content([target], False, len(target))
    if not stat.S_ISREG(entry.mode) or entry.size > TEXT_LIMIT:
        return Content([], True, entry.size)
    try:
        with open_file(entry.path) as f:
            data = f.read()
    except OSError:
        return Content([], True, entry.size)
    if b"\0" in data[:_BINARY_PROBE]:
        return Content([], True, len(data))
    return Content(data.splitlines(keepends=True), False, len(data))


def _is_shown(change: Change) -> bool:
    """Directories appear in a patch or --stat only when their permissions, owner or data
    xattrs changed."""
    old_dir = change.old is not None and change.old.is_dir
    new_dir = change.new is not None and change.new.is_dir
    if old_dir and new_dir:
        return change.mode_changed or change.owner_changed or change.xattrs_changed
    return not (old_dir and change.new is None) and not (new_dir and change.old is None)


def _sides(change: Change) -> list[tuple[Entry | None, Entry | None]]:
    """The (old, new) pairs a change is shown as: a type change is a deletion plus an addition,
    and its directory side shows nothing (its entries are changes of their own)."""
    if change.status != TYPE_CHANGED:
        return [(change.old, change.new)]
    pairs: list[tuple[Entry | None, Entry | None]] = []
    if change.old is not None and not change.old.is_dir:
        pairs.append((change.old, None))
    if change.new is not None and not change.new.is_dir:
        pairs.append((None, change.new))
    return pairs


# -- unified patch ------------------------------------------------------------------------------


Sides = list[tuple[Entry | None, Entry | None, Content, Content]]


def _with_contents(changes: list[Change]) -> Iterator[tuple[Change, Sides]]:
    """The shown changes in order, each with the contents of its sides, read a window ahead
    by a few threads: on a cold cache, reading thousands of small files one by one waits on
    the disk for each (reads release the GIL, so the waits overlap)."""
    shown = [c for c in changes if _is_shown(c)]

    def load(change: Change) -> tuple[Change, Sides]:
        return change, [(o, n, content_of(o), content_of(n)) for o, n in _sides(change)]

    def load_batch(batch: list[Change]) -> list[tuple[Change, Sides]]:
        return [load(change) for change in batch]

    if len(shown) < _PREFETCH_FROM:
        yield from map(load, shown)
        return
    batches = [shown[i : i + _BATCH] for i in range(0, len(shown), _BATCH)]
    with ThreadPoolExecutor(max_workers=_READERS) as pool:
        for start in range(0, len(batches), _WINDOW):
            for loaded in pool.map(load_batch, batches[start : start + _WINDOW]):
                yield from loaded


def patch(changeset: Changeset, color: bool = False) -> Iterator[bytes]:
    """The changeset as a unified diff, one line at a time (without line endings)."""
    style = _Styler(color)
    for change, sides in _with_contents(changeset.changes):
        path = display_path(changeset, change)
        for old, new, a, b in sides:
            yield from _file_patch(path, old, new, a, b, style, change.xattrs_changed)


def xattr_lines(old: Entry, new: Entry) -> Iterator[bytes]:
    """Extended header lines for data xattrs that differ, in the manner of git's mode lines:
    `old xattr NAME "VALUE"` and/or `new xattr NAME "VALUE"` (git apply passes them by)."""
    before, after = data_xattrs(old.path), data_xattrs(new.path)
    for name in sorted(before.keys() | after.keys()):
        if before.get(name) == after.get(name):
            continue
        for side, values in ((b"old", before), (b"new", after)):
            if name in values:
                yield side + b" xattr " + os.fsencode(name) + b" " + _quoted(values[name])


def _quoted(value: bytes, limit: int = 80) -> bytes:
    shown = value[:limit].decode("utf-8", "backslashreplace").encode("unicode_escape")
    return b'"' + shown.replace(b'"', b'\\"') + b'"' + (b"..." if len(value) > limit else b"")


def _mode(entry: Entry) -> bytes:
    if stat.S_ISLNK(entry.mode):
        return b"120000"  # as git: a symlink's permission bits mean nothing
    return b"%06o" % (entry.mode & 0o177777)


def _file_patch(
    path: bytes, old: Entry | None, new: Entry | None, a: Content, b: Content, style: _Styler,
    xattrs_changed: bool = False,
) -> Iterator[bytes]:
    yield style.meta(b"diff --git a/" + path + b" b/" + path)
    if old is None and new is not None:
        yield style.meta(b"new file mode " + _mode(new))
    elif new is None and old is not None:
        yield style.meta(b"deleted file mode " + _mode(old))
    elif old is not None and new is not None and old.mode != new.mode:
        yield style.meta(b"old mode " + _mode(old))
        yield style.meta(b"new mode " + _mode(new))
    if old is not None and new is not None and old.owner != new.owner:
        yield style.meta(b"old owner %d:%d" % old.owner)
        yield style.meta(b"new owner %d:%d" % new.owner)
    if xattrs_changed and old is not None and new is not None:
        for line in xattr_lines(old, new):
            yield style.meta(line)
    if (old is not None and old.is_dir) or (new is not None and new.is_dir):
        return
    if a.lines == b.lines and not (a.binary or b.binary):
        return  # a mode change only
    old_name = b"a/" + path if old is not None else b"/dev/null"
    new_name = b"b/" + path if new is not None else b"/dev/null"
    if a.binary or b.binary:
        if old is not None and new is not None and a.size == b.size and not _differs(old, new):
            return
        yield b"Binary files " + old_name + b" and " + new_name + b" differ"
        return
    yield style.meta(b"--- " + old_name)
    yield style.meta(b"+++ " + new_name)
    matcher = difflib.SequenceMatcher(None, a.lines, b.lines, autojunk=len(a.lines) > 2000)
    for group in matcher.get_grouped_opcodes(_CONTEXT):
        first, last = group[0], group[-1]
        yield style.frag(
            b"@@ -" + _range(first[1], last[2]) + b" +" + _range(first[3], last[4]) + b" @@"
        )
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                for line in a.lines[i1:i2]:
                    yield from _line(b" ", line, style.plain)
                continue
            for line in a.lines[i1:i2]:
                yield from _line(b"-", line, style.old)
            for line in b.lines[j1:j2]:
                yield from _line(b"+", line, style.new)


def _differs(old: Entry, new: Entry) -> bool:
    if not (stat.S_ISREG(old.mode) and stat.S_ISREG(new.mode)):
        return True
    return not same_file_data(old.path, new.path)


def _line(sign: bytes, line: bytes, paint: Any) -> Iterator[bytes]:
    if line.endswith(b"\r\n"):
        yield paint(sign + line[:-2] + b"\r")
    elif line.endswith(b"\n"):
        yield paint(sign + line[:-1])
    else:
        yield paint(sign + line)
        yield _NO_NEWLINE


def _range(start: int, stop: int) -> bytes:
    length = stop - start
    if length == 1:
        return b"%d" % (start + 1)
    if length == 0:
        return b"%d,0" % start
    return b"%d,%d" % (start + 1, length)


class _Styler:
    def __init__(self, color: bool) -> None:
        self.color = color

    def _paint(self, code: bytes, text: bytes) -> bytes:
        return code + text + RESET if self.color else text

    def meta(self, text: bytes) -> bytes:
        return self._paint(META, text)

    def frag(self, text: bytes) -> bytes:
        return self._paint(FRAG, text)

    def old(self, text: bytes) -> bytes:
        return self._paint(OLD, text)

    def new(self, text: bytes) -> bytes:
        return self._paint(NEW, text)

    def plain(self, text: bytes) -> bytes:
        return text


# -- counts, --stat, --name-status, JSON --------------------------------------------------------


@dataclass(frozen=True)
class FileStat:
    path: bytes
    insertions: int
    deletions: int
    binary: bool
    old_size: int
    new_size: int


def line_counts(a: list[bytes], b: list[bytes]) -> tuple[int, int]:
    """(insertions, deletions) from a to b; common head and tail lines are skipped first, which
    makes the usual small edit cheap."""
    head = 0
    limit = min(len(a), len(b))
    while head < limit and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < limit - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    a_mid, b_mid = a[head : len(a) - tail], b[head : len(b) - tail]
    if not a_mid or not b_mid:
        return len(b_mid), len(a_mid)
    matcher = difflib.SequenceMatcher(None, a_mid, b_mid, autojunk=len(a_mid) > 2000)
    same = sum(block.size for block in matcher.get_matching_blocks())
    return len(b_mid) - same, len(a_mid) - same


def file_stats(changeset: Changeset) -> list[FileStat]:
    stats: list[FileStat] = []
    for change, sides in _with_contents(changeset.changes):
        insertions = deletions = 0
        binary = False
        old_size = new_size = 0
        for _, _, a, b in sides:
            old_size += a.size
            new_size += b.size
            if a.binary or b.binary:
                binary = True
                continue
            added, removed = line_counts(a.lines, b.lines)
            insertions += added
            deletions += removed
        stats.append(
            FileStat(display_path(changeset, change), insertions, deletions, binary, old_size,
                     new_size)
        )
    return stats


def stat_lines(stats: list[FileStat], width: int = 80, color: bool = False) -> Iterator[bytes]:
    """`git diff --stat`: one line per file and a summary line."""
    if not stats:
        return
    names = [os.fsdecode(s.path).encode("utf-8", "backslashreplace") for s in stats]
    name_width = max(len(n) for n in names)
    counts = [s.insertions + s.deletions for s in stats]
    count_width = max(len(str(c)) for c in counts)
    graph_width = max(10, width - name_width - count_width - 6)
    biggest = max(counts) or 1
    scale = min(1.0, graph_width / biggest)
    for s, name, total in zip(stats, names, counts, strict=True):
        if s.binary:
            detail = b"Bin %d -> %d bytes" % (s.old_size, s.new_size)
            yield b" " + name.ljust(name_width) + b" | " + detail
            continue
        plus = int(round(s.insertions * scale)) or (1 if s.insertions else 0)
        minus = int(round(s.deletions * scale)) or (1 if s.deletions else 0)
        plus_text, minus_text = b"+" * plus, b"-" * minus
        if color:
            plus_text = NEW + plus_text + RESET if plus else b""
            minus_text = OLD + minus_text + RESET if minus else b""
        yield (
            b" " + name.ljust(name_width) + b" | " + str(total).rjust(count_width).encode()
            + (b" " + plus_text + minus_text if plus or minus else b"")
        )
    yield summary_line(stats)


def summary_line(stats: list[FileStat]) -> bytes:
    files = len(stats)
    insertions = sum(s.insertions for s in stats)
    deletions = sum(s.deletions for s in stats)
    text = f" {files} file{'s' if files != 1 else ''} changed"
    if insertions or not deletions:
        text += f", {insertions} insertion{'s' if insertions != 1 else ''}(+)"
    if deletions or not insertions:
        text += f", {deletions} deletion{'s' if deletions != 1 else ''}(-)"
    return text.encode()


def name_status_lines(changeset: Changeset) -> Iterator[bytes]:
    for change in changeset.changes:
        path = display_path(changeset, change)
        if change.new is not None and change.new.is_dir or change.new is None and (
            change.old is not None and change.old.is_dir
        ):
            path += b"/"
        yield change.status.encode() + b"\t" + path


def _side_json(entry: Entry | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    side: dict[str, Any] = {
        "kind": entry.kind,
        "mode": f"{entry.mode & 0o177777:06o}",
        "uid": entry.uid,
        "gid": entry.gid,
        "size": entry.size,
        "mtime_ns": entry.mtime_ns,
    }
    if stat.S_ISLNK(entry.mode):
        side["target"] = os.fsdecode(entry.target())
    return side


def to_json(changeset: Changeset) -> list[dict[str, Any]]:
    """Every change as plain data; paths are decoded with surrogateescape (os.fsencode gives
    back the exact bytes)."""
    counts = {s.path: s for s in file_stats(changeset)}
    result: list[dict[str, Any]] = []
    for change in changeset.changes:
        path = display_path(changeset, change)
        counted = counts.get(path)
        result.append(
            {
                "root": changeset.env.roots[change.root].path,
                "path": os.fsdecode(change.rel),
                "display": os.fsdecode(path),
                "status": change.status,
                "old": _side_json(change.old),
                "new": _side_json(change.new),
                "content_changed": change.content_changed,
                "mode_changed": change.mode_changed,
                "owner_changed": change.owner_changed,
                "xattrs_changed": change.xattrs_changed,
                # setuid/setgid/capabilities the env's entry would bring to the host
                "privileges": list(change.privileges()),
                "binary": counted.binary if counted else False,
                "insertions": counted.insertions if counted else 0,
                "deletions": counted.deletions if counted else 0,
            }
        )
    return result


__all__ = [
    "ADDED", "DELETED", "MODIFIED", "TYPE_CHANGED", "Content", "FileStat", "content_of",
    "display_path", "file_stats", "line_counts", "name_status_lines", "patch", "stat_lines",
    "summary_line", "to_json",
]
