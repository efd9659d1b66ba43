"""The directories an overlay is made of, opened once as file descriptors.

An overlay reaches its layers only through the descriptors opened here, *before* anything is
mounted: a view mounted over its own lower (the filter mount) must never resolve a path that
leads back into itself. Paths are used exactly once, in `Layers.open`.

    upper   the env's layer: new and modified entries, whiteouts, opaque markers (DESIGN §3)
    work    beside upper on the same filesystem; copy-ups and atomic replacements are built in
            its `work/` subdirectory (the name the kernel's overlayfs uses too) and renamed in
    lowers  read-only layers, top first: the project itself, or a fork's parent layers
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

from isolated_agent.overlay.copyup import remove_temp

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_TEMP_PREFIX = b"#agentfs."


class LayerError(Exception):
    """A layer directory is missing or unsuitable; the message says which and why."""


@dataclass
class Layers:
    upper: int
    work: int  # the `work/` subdirectory of the work dir: where temporaries are built
    lowers: tuple[int, ...]

    @classmethod
    def open(
        cls, upper: str, work: str, lowers: Sequence[str], lower_fds: Sequence[int] = ()
    ) -> Layers:
        """`lower_fds` (duplicated, not taken) come after the `lowers` opened by path: the
        filter mount opened its lower before mounting over it, and must never open it by
        path again."""
        if not lowers and not lower_fds:
            raise LayerError("at least one lower directory is needed")
        opened: list[int] = []
        try:
            upper_fd = _open_dir(upper, "upper", opened)
            work_top = _open_dir(work, "work", opened)
            lower_layers = tuple(_open_dir(path, "lower", opened) for path in lowers) + tuple(
                _dup_dir(fd, opened) for fd in lower_fds)
            upper_st, work_st = os.fstat(upper_fd), os.fstat(work_top)
            if upper_st.st_dev != work_st.st_dev:
                raise LayerError(f"work dir {work} must be on the same filesystem as upper {upper}")
            if (upper_st.st_dev, upper_st.st_ino) == (work_st.st_dev, work_st.st_ino):
                raise LayerError("upper and work must be different directories")
            try:
                os.mkdir("work", 0o700, dir_fd=work_top)
            except FileExistsError:
                pass
            except OSError as e:
                raise LayerError(f"cannot use work dir {work}: {e.strerror}") from e
            work_fd = _open_dir(os.path.join(work, "work"), "work", opened)
            os.chmod(f"/proc/self/fd/{work_fd}", 0o700)
            os.close(work_top)
            opened.remove(work_top)
            _sweep_temporaries(work_fd)
            return cls(upper_fd, work_fd, lower_layers)
        except BaseException:
            for fd in opened:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise

    def close(self) -> None:
        for fd in (self.upper, self.work, *self.lowers):
            with contextlib.suppress(OSError):
                os.close(fd)


def _dup_dir(fd: int, opened: list[int]) -> int:
    opened.append(os.dup(fd))
    return opened[-1]


def _open_dir(path: str, role: str, opened: list[int]) -> int:
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        raise LayerError(f"{role} dir {path} does not exist") from None
    except NotADirectoryError:
        raise LayerError(f"{role} dir {path} is not a directory") from None
    except OSError as e:
        raise LayerError(f"cannot open {role} dir {path}: {e.strerror}") from e
    opened.append(fd)
    return fd


def _sweep_temporaries(work_fd: int) -> None:
    """Remove what an earlier agentfs left half-built (it died mid copy-up). Only our own
    temporaries: the kernel's overlayfs cleans its own on mount."""
    listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=work_fd)
    try:
        names = [os.fsencode(n) for n in os.listdir(listing)]
    finally:
        os.close(listing)
    for name in names:
        if name.startswith(_TEMP_PREFIX):
            _remove_tree_at(work_fd, name)


def _remove_tree_at(dir_fd: int, name: bytes) -> None:
    try:
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                      dir_fd=dir_fd)
    except OSError:
        remove_temp(dir_fd, name)
        return
    try:
        for child in os.listdir(sub):
            _remove_tree_at(sub, os.fsencode(child))
    finally:
        os.close(sub)
    remove_temp(dir_fd, name)
