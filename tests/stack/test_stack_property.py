"""The property of DESIGN §11: random file operations interleaved with checkpoint, rollback,
fork and squash give, at every step, the same view as replaying the same operations on plain
copies — through the kernel's overlayfs and through agentfs, mounted over the same stack. The
operations themselves go through the kernel's overlay, agentfs, or the copy engine's clone
(recorded into the upper afterwards)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from isolated_agent.engines.fuse.envmount import mount_env, unmount_env
from isolated_agent.env import clone
from isolated_agent.env.squash import squash
from isolated_agent.env.stack import checkpoint, fork, rollback
from isolated_agent.env.store import Env, Store
from isolated_agent.system import libc
from tests.agentfs.conftest import force_unmount

FILES = ("a", "b", "d/x", "d/y", "d/sub/w", "e/z")
DIRS = ("d", "e", "d/sub")

file_op = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(FILES), st.sampled_from(["1", "22", "333"])),
    st.tuples(st.just("rm"), st.sampled_from(FILES + DIRS)),
    st.tuples(st.just("mkdir"), st.sampled_from(DIRS)),
    st.tuples(st.just("move"), st.sampled_from(FILES), st.sampled_from(FILES)),
)
ops_step = st.tuples(st.just("ops"), st.sampled_from(["kernel", "agentfs", "copy"]),
                    st.lists(file_op, min_size=1, max_size=4))
step = st.one_of(
    ops_step, ops_step,
    st.tuples(st.just("checkpoint")), st.tuples(st.just("checkpoint")),
    st.tuples(st.just("rollback"), st.integers(0, 10)),
    st.tuples(st.just("fork")),
    st.tuples(st.just("squash")),
)


def apply(root: Path, op: tuple[str, ...]) -> None:
    """One operation, decided by what `root` shows (the same in a view and in its copy)."""
    kind, path = op[0], root / op[1]
    if kind == "write":
        if all(p.is_dir() or not p.exists() for p in path.parents) and not path.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(op[2])
    elif kind == "rm":
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    elif kind == "mkdir":
        if all(p.is_dir() or not p.exists() for p in path.parents) and not path.exists():
            path.mkdir(parents=True)
    elif kind == "move":
        target = root / op[2]
        if path.is_file() and target.parent.is_dir() and not target.is_dir() and path != target:
            os.rename(path, target)


def view(root: Path) -> dict[str, tuple[object, ...]]:
    result: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            content = (hashlib.sha256(Path(path).read_bytes()).hexdigest()
                       if stat.S_ISREG(st_.st_mode) else None)
            result[os.path.relpath(path, root)] = (stat.S_IFMT(st_.st_mode),
                                                   stat.S_IMODE(st_.st_mode), content)
    return result


@contextlib.contextmanager
def changed(store: Store, env: Env, engine: str, place: Path) -> Iterator[Path]:
    """Where a step's operations go: a mount of the env, or the copy engine's clone of it
    (recorded into the env when the step is done)."""
    if engine != "copy":
        with mounted(store, env, engine, place) as root:
            yield root
        return
    place.mkdir(exist_ok=True)
    made = clone.materialize(env.roots[0], str(place / "clone"))
    try:
        yield place / "clone"
        clone.record(made)
    finally:
        shutil.rmtree(place / "clone")


@contextlib.contextmanager
def mounted(store: Store, env: Env, engine: str, place: Path) -> Iterator[Path]:
    """The env's view of its root: a kernel overlay of its stack made here, or agentfs."""
    place.mkdir(exist_ok=True)
    root = env.roots[0]
    if engine == "kernel":
        options = ",".join(("lowerdir=" + ":".join([*root.layers, root.path]),
                            f"upperdir={root.upper}", f"workdir={root.work}", "userxattr"))
        libc.mount("overlay", str(place), "overlay", 0, options)
        try:
            yield place
        finally:
            force_unmount(place)
    else:
        mount_env(store, env, str(place))
        try:
            yield place
        finally:
            unmount_env(store, str(place))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=10))
# A file rewritten in a later layer; a directory deleted in a middle layer and made again above
# it, then squashed; a fork rolled back to where it started, then squashed.
@example(steps=[("ops", "kernel", [("write", "a", "1")]), ("checkpoint",),
                ("ops", "agentfs", [("write", "a", "22")]), ("checkpoint",)])
@example(steps=[("ops", "agentfs", [("write", "d/sub/w", "1")]), ("checkpoint",),
                ("ops", "kernel", [("rm", "d")]), ("checkpoint",),
                ("ops", "agentfs", [("mkdir", "d"), ("write", "d/y", "22")]), ("checkpoint",),
                ("squash",), ("rollback", 1)])
@example(steps=[("ops", "kernel", [("move", "a", "e/z"), ("write", "e/z", "1")]), ("fork",),
                ("ops", "agentfs", [("rm", "e"), ("write", "b", "333")]), ("checkpoint",),
                ("rollback", 0), ("ops", "kernel", [("write", "d/x", "22")]), ("checkpoint",),
                ("squash",)])
@example(steps=[("ops", "copy", [("write", "d/sub/w", "1")]), ("checkpoint",),
                ("ops", "copy", [("rm", "d")]), ("checkpoint",),
                ("ops", "copy", [("mkdir", "d"), ("write", "d/y", "22"), ("move", "a", "e/z")]),
                ("squash",), ("ops", "copy", [("rm", "e"), ("write", "a", "333")])])
# A directory deleted and made again in one step of the copy engine: opaque over the host's.
@example(steps=[("ops", "copy", [("rm", "d"), ("mkdir", "d"), ("write", "d/y", "1")])])
def test_stack_views_equal_plain_copies(tmp_path: Path, steps: list[tuple[object, ...]]) -> None:
    base = Path(os.path.realpath(tmp_path)) / f"run{os.urandom(4).hex()}"
    project = base / "project"
    (project / "d").mkdir(parents=True)
    for name, text in (("a", "host a"), ("b", "host b"), ("d/x", "host x")):
        (project / name).write_text(text)
    copies = base / "copies"
    store = Store(str(base / "store"))
    env = store.create("e0", [str(project)])
    model = copies / "e0"
    shutil.copytree(project, model)
    saved: list[tuple[str, Path]] = []  # (checkpoint id, copy of the model then), of this env
    try:
        for number, (kind, *args) in enumerate(steps):
            env = store.get(env.id)
            if kind == "ops":
                engine, ops = args
                with changed(store, env, str(engine), base / "mnt") as root:
                    for op in ops:  # type: ignore[attr-defined]
                        apply(root, op)
                for op in ops:  # type: ignore[attr-defined]
                    apply(model, op)
            elif kind == "checkpoint":
                record = checkpoint(store, env)
                saved.append((record.id, copies / f"cp{number}"))
                shutil.copytree(model, saved[-1][1], symlinks=True)
            elif kind == "rollback" and saved:
                checkpoint_id, copy = saved[int(args[0]) % len(saved)]
                [record] = store.catalog.find_checkpoint(env.id, checkpoint_id)
                kept = rollback(store, env, record)
                if kept is not None:
                    saved.append((kept.id, copies / f"kept{number}"))
                    shutil.copytree(model, saved[-1][1], symlinks=True)
                shutil.rmtree(model)
                shutil.copytree(copy, model, symlinks=True)
            elif kind == "fork":  # carry on in the fork; its checkpoints are its own
                env, start = fork(store, env, f"e{number + 1}")
                shutil.copytree(model, copies / env.name, symlinks=True)
                model = copies / env.name
                saved = [(start.id, copies / f"start{number}")]
                shutil.copytree(model, saved[-1][1], symlinks=True)
            elif kind == "squash":
                squash(store, env)
            env = store.get(env.id)
            expected = view(model)
            for engine in ("kernel", "agentfs"):
                with mounted(store, env, engine, base / "mnt") as root:
                    assert view(root) == expected, (engine, steps[: number + 1])
    finally:
        store.close()
