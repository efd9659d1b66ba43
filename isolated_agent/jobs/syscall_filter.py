"""The seccomp baseline every job runs under, whatever the engine: the one place that says which
system calls a job may not make.

Modelled on the default profiles of Docker and Podman, written as a deny list: a coding agent
runs compilers, package managers, test suites, browsers and shells, and a list of what it may
do would break some tool every week, while the list of what none of them needs is short and
stable. Every refused call fails with EPERM (clone3 with ENOSYS, so that the C library falls
back to clone, whose flags a filter can see), so programs take their ordinary "not permitted"
path instead of dying.

Refused:

- terminal injection: the TIOCSTI and TIOCLINUX ioctls (bubblewrap's CVE-2017-5226 class). The
  request number is compared in its low 32 bits only, as the kernel reads it: a caller cannot
  slip past with garbage in the upper half (flatpak's CVE-2019-10063);
- kernel keyrings: keyctl, add_key, request_key. The launcher also gives the job a fresh,
  empty session keyring, so nothing of the caller's is even named in it;
- new namespaces: unshare, setns, and clone with any CLONE_NEW* flag. Inside a user namespace
  of its own a job would hold every capability again, which is most of the kernel's attack
  surface (and would let it mount over its own view). Nested sandboxes (bubblewrap, Chromium's
  zygote) therefore fail inside a job; Chromium runs with --no-sandbox, as in Docker;
- what changes the machine rather than a process: modules, kexec, reboot, swap, clocks,
  accounting, quotas, mounts, the kernel's syslog, personality tricks of vm86/iopl;
- the kernel-attack surface that container defaults block: bpf, perf_event_open, userfaultfd,
  io_uring (whose requests would also bypass this very filter), open_by_handle_at (the
  "shocker" escape), and obsolete calls nobody uses (uselib, ustat, sysfs, nfsservctl, ...).

Not refused, on purpose: ptrace and process_vm_* (debuggers, profilers; the job sees only its
own processes: a pid namespace, or Landlock's ptrace scoping under the filter engine).

The filter engine's job, which sees the host's tree itself, also runs a second filter
(`install_supervised`): the calls Landlock does not judge — a change of mode, owner, times or
extended attributes, and connect(2) — wait for the job's keeper, which does them on the job's
behalf where they may act (supervisor.py).

System calls are resolved by name for the native architecture; any other architecture
(32-bit calls from a 64-bit process) kills the caller, libseccomp's default for a foreign
architecture, so the numbers of another ABI cannot be used to get around the list.
"""

from __future__ import annotations

import contextlib
import errno
import os
import termios
from typing import Any

from isolated_agent.errors import IsolationError
from isolated_agent.system import libc

STEP = "seccomp filter"

# Refused with EPERM whatever their arguments.
DENIED = (
    # kernel keyrings
    "keyctl", "add_key", "request_key",
    # namespaces (clone and unshare: only with a CLONE_NEW* flag, below)
    "setns",
    # mounts
    "mount", "umount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",
    # the machine: modules, kexec, reboot, swap, clocks, accounting, quotas, kernel log
    "init_module", "finit_module", "delete_module", "create_module", "query_module",
    "get_kernel_syms", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
    "settimeofday", "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64",
    "adjtimex", "stime", "acct", "quotactl", "quotactl_fd", "syslog", "vhangup",
    "iopl", "ioperm", "vm86", "vm86old",
    # kernel-attack surface that container defaults block
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "open_by_handle_at", "lookup_dcookie", "kcmp", "fanotify_init",
    "uselib", "ustat", "sysfs", "_sysctl", "nfsservctl",
)

# ioctl requests refused on any descriptor.
DENIED_IOCTLS = {
    "TIOCSTI": termios.TIOCSTI,  # push a byte into a terminal's input queue
    "TIOCLINUX": getattr(termios, "TIOCLINUX", 0x541C),  # the console's selection paste, etc.
}

# Every flag that makes a namespace; CLONE_NEWTIME's bit is part of the exit signal in clone(2),
# so it is checked for unshare only.
CLONE_NEW_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
CLONE_NEWTIME = 0x00000080

_MISSING_HINT = "install libseccomp's Python binding: apt-get install python3-seccomp"


def install_baseline() -> None:
    """Load the baseline into this thread's process (no_new_privs must be set). It stays for
    every descendant, across exec, and can only be narrowed. Raises IsolationError."""
    seccomp = _binding()
    try:
        rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        refuse = seccomp.ERRNO(errno.EPERM)
        for name in DENIED:
            _add_rule(rules, refuse, name)
        for request in DENIED_IOCTLS.values():
            rules.add_rule(refuse, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
        for flag in CLONE_NEW_FLAGS.values():
            rules.add_rule(refuse, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        for flag in (*CLONE_NEW_FLAGS.values(), CLONE_NEWTIME):
            rules.add_rule(refuse, "unshare", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
        rules.load()
    except (OSError, RuntimeError, ValueError) as e:
        raise IsolationError(STEP, f"cannot load it: {e}") from e


def _binding() -> Any:
    try:
        import seccomp  # type: ignore[import-not-found]  # Debian's binding, no stubs
    except ImportError as e:
        raise IsolationError(STEP, "libseccomp's Python module is missing", _MISSING_HINT) from e
    return seccomp


def _add_rule(rules: object, action: object, name: str) -> None:
    """One rule for a system call named. libseccomp knows every architecture's names and turns
    one this architecture lacks (vm86 on aarch64) into a rule that never matches; a name it
    does not know at all (an old libseccomp) is a call of a later kernel: skipped."""
    with contextlib.suppress(RuntimeError):
        rules.add_rule(action, name)  # type: ignore[attr-defined]


# The filter engine: calls that wait for the keeper (supervisor.py), which does them itself
# where Landlock's rules would let the job write. Names this architecture lacks (chmod on
# aarch64) match nothing.
SUPERVISED = (
    "chmod", "fchmod", "fchmodat",
    "chown", "fchown", "lchown", "fchownat",
    "utime", "utimes", "futimesat", "utimensat",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "connect",
)

# ioctl requests that change a file's attributes (chattr's flags, the XFS-style fsxattr).
FS_IOC_SETFLAGS = 0x40086602
FS_IOC32_SETFLAGS = 0x40046602
FS_IOC_FSSETXATTR = 0x401C5820
SUPERVISED_IOCTLS = (FS_IOC_SETFLAGS, FS_IOC32_SETFLAGS, FS_IOC_FSSETXATTR)

# Newer calls that do what a supervised one does: ENOSYS, as on a kernel without them, so
# that the C library falls back to the older call. By number (the same on every architecture
# since 5.1), as libseccomp releases older than the calls do not know their names.
NEWER_EQUIVALENTS = {"fchmodat2": 452, "setxattrat": 463, "removexattrat": 466,
                     "file_setattr": 469}


def install_supervised() -> int:
    """Load the filter engine's supervised calls into this process (no_new_privs set, after
    the baseline) and return the listener fd the keeper serves them from."""
    seccomp = _binding()
    try:
        rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        for name in SUPERVISED:
            _add_rule(rules, seccomp.NOTIFY, name)
        for request in SUPERVISED_IOCTLS:
            rules.add_rule(seccomp.NOTIFY, "ioctl",
                           seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
        for number in NEWER_EQUIVALENTS.values():
            rules.add_rule(seccomp.ERRNO(errno.ENOSYS), number)
        return libc.seccomp_load_listener(_program(rules))
    except (OSError, RuntimeError, ValueError) as e:
        raise IsolationError(STEP, f"cannot load the supervised calls: {e}") from e


def _program(rules: object) -> bytes:
    """The BPF program libseccomp would load (its export writes to a file)."""
    with open(os.memfd_create("seccomp", os.MFD_CLOEXEC), "w+b", buffering=0) as f:
        rules.export_bpf(f)  # type: ignore[attr-defined]
        f.seek(0)
        return f.read()
