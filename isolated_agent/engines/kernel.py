"""The kernel engine: Linux overlayfs over each managed root, at the root's own path.

Fastest: the kernel serves every request. Mounted with `userxattr` as root too, so the upper
layer has the same format whoever made it (DESIGN §3).

Known limitation (the kernel's, documented in the README): in `userxattr` mode overlayfs has no
`redirect_dir`, so rename(2) of a directory that exists in the lower layer fails with EXDEV.
`mv` and most tools fall back to copy + delete, which works; a program that calls rename(2) on a
lower directory and does not handle EXDEV sees the error. The fuse engine does not have it.
"""

from __future__ import annotations

import os
import signal

from isolated_agent.engines.id_swap import IdSwap, id_swap_for
from isolated_agent.env.store import Env, Root
from isolated_agent.errors import IsolationError
from isolated_agent.system import libc


def _escape(path: str) -> str:
    # overlayfs splits its options at ',' and lowerdir lists at ':'; a backslash escapes both.
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def check_namespaces(rootless: bool) -> None:
    """Whether the namespaces a job needs can be made here: tried for real in a child (a
    millisecond), since the reasons they cannot are many (user.max_user_namespaces=0, an
    AppArmor or seccomp policy, a container without CAP_SYS_ADMIN)."""
    flags = libc.CLONE_NEWNS | libc.CLONE_NEWPID | libc.CLONE_NEWIPC
    if rootless:
        flags |= libc.CLONE_NEWUSER
    pid = os.fork()
    if pid == 0:
        try:
            libc.unshare(flags)
            os._exit(0)
        except OSError as e:
            os._exit(min(e.errno or 1, 255))
        finally:
            os._exit(255)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise IsolationError(
            "creating namespaces", os.strerror(code) if 0 < code < 255 else "failed",
            "run as root, or enable user namespaces (sysctl user.max_user_namespaces)",
        )


class KernelEngine:
    name = "kernel"
    namespaces = True

    def __init__(self) -> None:
        # Per root index, for a root run over another user's tree: a user namespace whose
        # maps are the id swap, the lens of the idmapped layers (id_swap.py).
        self._swap_namespaces: dict[int, int] = {}

    def check(self, rootless: bool) -> None:
        try:
            with open("/proc/filesystems") as f:
                known = f.read().split()
        except OSError:
            known = []
        if "overlay" not in known:
            raise IsolationError(
                "kernel engine",
                "this kernel has no overlay filesystem",
                "load it with `modprobe overlay`",
            )

    # -- host side (engines.HostSide): only the id swaps' namespaces ------------------------------

    def start(self, env: Env, log_dir: str) -> None:
        for root in env.roots:
            swap = id_swap_for(root.path)
            if swap is not None:
                self._swap_namespaces[root.index] = _user_namespace(swap)

    def job_started(self, pid: int, cgroup_dir: str | None) -> None:
        pass

    def problems(self) -> list[str]:
        return []

    def stop(self) -> None:
        for namespace in self._swap_namespaces.values():
            os.close(namespace)
        self._swap_namespaces.clear()

    # -- inside the job's mount namespace -------------------------------------------------------

    def mount_root(self, root: Root, target: str, lower: str) -> None:
        if root.index in self._swap_namespaces:
            # The overlay's layers seen through the swap: idmapped copies of the mounts of
            # the host's tree and of the env's layer, put over them in this mount namespace
            # only (the view, a copy of the tree made before, does not show them).
            namespace = self._swap_namespaces[root.index]
            try:
                for path in (lower, os.path.dirname(root.upper), *root.layers):
                    libc.attach_idmapped(path, namespace)
            except OSError as e:
                raise IsolationError(
                    f"idmapped layers of {root.path}", os.strerror(e.errno or 0),
                    "the filesystems of the project and of the store must support idmapped "
                    "mounts (Linux >= 5.19: ext4, xfs, btrfs, tmpfs >= 6.3); or run as the "
                    "project's owner") from e
        # Frozen layers (DESIGN §11) sit between the upper and the tree, top first. Named by
        # their descriptors: mount(2) takes one page of options, which 40 store paths fill.
        layer_fds = [os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                     for path in root.layers]
        try:
            self._mount_overlay(root, target, [*(f"/proc/self/fd/{fd}" for fd in layer_fds),
                                               lower])
        finally:
            for fd in layer_fds:
                os.close(fd)

    def _mount_overlay(self, root: Root, target: str, lowers: list[str]) -> None:
        options = ",".join(
            (
                "lowerdir=" + ":".join(_escape(path) for path in lowers),
                f"upperdir={_escape(root.upper)}",
                f"workdir={_escape(root.work)}",
                "userxattr",
            )
        )
        try:
            libc.mount("overlay", target, "overlay", libc.MS_NOSUID | libc.MS_NODEV, options)
        except OSError as e:
            raise IsolationError(
                f"overlay mount of {root.path}",
                os.strerror(e.errno or 0),
                "the store must be on a filesystem with user xattrs (ext4, xfs, btrfs, tmpfs); "
                "see `dmesg | grep overlay`",
            ) from e


def _user_namespace(swap: IdSwap) -> int:
    """A descriptor of a new user namespace whose id maps are `swap`'s: made by a child that
    exists only to be in it, gone once the descriptor is open."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            libc.unshare(libc.CLONE_NEWUSER)
            os.write(ready_w, b"1")
            while True:
                signal.pause()
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        if os.read(ready_r, 1) != b"1":
            raise IsolationError("id swap", "could not make a user namespace for it")
        for name, lines in (("uid_map", swap.uid_map()), ("gid_map", swap.gid_map())):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(lines)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise IsolationError("id swap", f"user namespace: {os.strerror(e.errno or 0)}") from e
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
