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

from isolated_agent import libc
from isolated_agent.env.store import Root
from isolated_agent.errors import IsolationError


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

    def mount_root(self, root: Root, target: str, lower: str) -> None:
        options = ",".join(
            (
                f"lowerdir={_escape(lower)}",
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
