"""`agentctl doctor`: what this machine lets each engine do, why an engine cannot run, and the one
command or setting that fixes it.

Each check is tried for real where it can be — namespaces made in a child and a filesystem
mounted in them, an overlay mounted over directories of the store, /dev/fuse opened, a cgroup
made, a reflink, an xattr and a birth time asked of the store's filesystem — because the reasons
a feature is missing are many (a sysctl, an AppArmor or seccomp policy, a container without a
capability or a device) and reading one setting tells only one of them. The setting read
afterwards only names the likeliest reason.

A check names the engines that cannot run without it; an engine works when none of its checks
failed. `auto` is then chosen by `engines.select_engine`'s rule, restated here on the findings.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from isolated_agent.engines.fuse.engine import check_dev_fuse
from isolated_agent.env.store import Store
from isolated_agent.errors import AgentctlError, IsolationError
from isolated_agent.fusefs import wakeup
from isolated_agent.system import libc
from isolated_agent.system.cgroup import DELEGATE_HINT, Limits, limits_problem, own_group
from isolated_agent.system.mountinfo import read_mountinfo
from isolated_agent.system.trees import remove_tree

OK, WARN, FAIL = "ok", "warn", "fail"
ENGINES = ("kernel", "fuse", "filter", "copy")

# The file this project ships for Ubuntu's restriction of unprivileged user namespaces.
APPARMOR_PROFILE = "packaging/apparmor/agentctl"
APPARMOR_FIX = (f"install the AppArmor profile from the source tree: sudo install -m 644 "
                f"{APPARMOR_PROFILE} /etc/apparmor.d/agentctl && "
                "sudo apparmor_parser -r /etc/apparmor.d/agentctl")
STORE_FIX = "keep the store on ext4, xfs, btrfs or tmpfs (ISOLATED_AGENT_HOME=DIR)"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK, WARN (works, with less) or FAIL
    detail: str
    fix: str = ""
    needed_by: tuple[str, ...] = ()  # the engines that cannot run when it fails


@dataclass(frozen=True)
class EngineVerdict:
    name: str
    ok: bool
    reason: str = ""
    fix: str = ""


@dataclass
class Diagnosis:
    user: str
    rootless: bool
    checks: list[Check]
    engines: list[EngineVerdict] = field(default_factory=list)
    auto: str | None = None
    auto_why: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "rootless": self.rootless,
            "auto": {"engine": self.auto, "why": self.auto_why},
            "engines": {v.name: ({"ok": True} if v.ok else
                                 {"ok": False, "reason": v.reason, "fix": v.fix})
                        for v in self.engines},
            "checks": [dict(asdict(c), needed_by=list(c.needed_by)) for c in self.checks],
        }


def diagnose() -> Diagnosis:
    rootless = os.geteuid() != 0
    checks: list[Check] = []

    def needs(engines: tuple[str, ...], *found: Check) -> None:
        checks.extend(replace(check, needed_by=engines) for check in found)

    store: Store | None = None
    try:
        store = Store()
        needs(ENGINES, Check("store", OK, store.home))
    except AgentctlError as e:
        needs(ENGINES, Check("store", FAIL, str(e)))
    with _probe_dirs(store.run_dir if store is not None else None) as dirs:
        namespaces = _namespaces(rootless, dirs)
        needs(("kernel", "fuse"), namespaces)
        if namespaces.status == OK:
            needs(("kernel",), _overlay(rootless, dirs))
        else:
            needs(("kernel",), Check("overlayfs", FAIL, "not tried: no namespaces to mount it in",
                                     namespaces.fix))
        if store is not None:
            xattrs, d_type, *optional = _store_filesystem(store.home, dirs)
            needs(ENGINES, xattrs)
            needs(("kernel",), d_type)
            needs((), *optional)
    needs(("fuse", "filter"), _dev_fuse(), _python_module("pyfuse3"), _python_module("trio"))
    needs(("filter",), _fusermount())
    needs(("filter", "copy"), _landlock(), _job_user(rootless))
    needs(ENGINES, _seccomp())
    needs((), _cgroup(), _tiocsti(), *_fuse_wakeups())
    diagnosis = Diagnosis(_user_name(), rootless, checks)
    diagnosis.engines = [_verdict(name, checks) for name in ENGINES]
    diagnosis.auto, diagnosis.auto_why = _auto(diagnosis.engines, namespaces)
    return diagnosis


def _verdict(engine: str, checks: list[Check]) -> EngineVerdict:
    for check in checks:
        if check.status == FAIL and engine in check.needed_by:
            return EngineVerdict(engine, False, f"{check.name}: {check.detail}", check.fix)
    return EngineVerdict(engine, True)


def _auto(engines: list[EngineVerdict], namespaces: Check) -> tuple[str | None, str]:
    """`select_engine`'s rule: kernel, else fuse, when namespaces can be made; the filter,
    else the copy engine, only where they cannot."""
    verdict = {v.name: v for v in engines}
    if namespaces.status == OK:
        if verdict["kernel"].ok:
            return "kernel", "namespaces and overlayfs work here: the kernel serves the view"
        if verdict["fuse"].ok:
            return "fuse", (f"the kernel engine cannot run ({verdict['kernel'].reason}): "
                            "agentfs serves the view")
        return None, f"neither the kernel engine nor fuse can run: {verdict['kernel'].reason}"
    if verdict["filter"].ok:
        return "filter", (f"no namespaces here ({namespaces.detail}): the filter engine "
                          "shows the env to the job's processes on the host")
    if verdict["copy"].ok:
        return "copy", (f"no namespaces here ({namespaces.detail}) and the filter engine "
                        f"cannot run ({verdict['filter'].reason}): the job works in a copy "
                        "of the project, not at its real path")
    return None, (f"no namespaces here ({namespaces.detail}), and neither the filter engine "
                  f"({verdict['filter'].reason}) nor the copy engine can run")


# -- probes in a child ----------------------------------------------------------------------------

Step = list[str]  # the child names the step it is at in step[0], for the report


def _in_child(body: Callable[[Step], None]) -> tuple[str, int] | None:
    """Run `body` in a forked child (its namespaces and mounts die with it); None when it
    finished, else the step it failed at and the errno."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        step = ["start"]
        try:
            body(step)
        except OSError as e:
            os.write(write_end, f"{step[0]}\0{e.errno or 0}".encode())
        except BaseException:
            os.write(write_end, f"{step[0]}\0{errno.EIO}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    if not answer:
        return None
    at, code = answer.decode().split("\0")
    return at, int(code)


def _enter_namespaces(rootless: bool, mount_on: str, step: Step) -> None:
    """What the launcher does first: the job's namespaces (a user namespace when not root),
    private mounts, and a first mount in them."""
    uid, gid = os.getuid(), os.getgid()
    step[0] = "unshare"
    flags = libc.CLONE_NEWNS | libc.CLONE_NEWPID | libc.CLONE_NEWIPC
    libc.unshare(flags | libc.CLONE_NEWUSER if rootless else flags)
    if rootless:
        step[0] = "id mapping"
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1\n"),
                           ("gid_map", f"{gid} {gid} 1\n")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    step[0] = "mount"
    libc.mount("none", "/", None, libc.MS_REC | libc.MS_PRIVATE)
    libc.mount("tmpfs", mount_on, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "size=64k")


def _sysctl(name: str) -> str | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


def _namespaces(rootless: bool, dirs: dict[str, str]) -> Check:
    name = "user namespaces" if rootless else "namespaces"
    failed = _in_child(lambda step: _enter_namespaces(rootless, dirs["merged"], step))
    if failed is None:
        made = "a user namespace, with mounts in it" if rootless else "mount, pid and ipc"
        return Check(name, OK, f"made {made}")
    at, code = failed
    found = f"{at}: {os.strerror(code)}"
    if rootless and _sysctl("user.max_user_namespaces") == "0":
        return Check(name, FAIL, f"{found} (user.max_user_namespaces is 0)",
                     "sudo sysctl -w user.max_user_namespaces=65536 (and set it in "
                     "/etc/sysctl.d/ to keep it)")
    if rootless and _sysctl("kernel.unprivileged_userns_clone") == "0":
        return Check(name, FAIL, f"{found} (kernel.unprivileged_userns_clone is 0)",
                     "sudo sysctl -w kernel.unprivileged_userns_clone=1 (and set it in "
                     "/etc/sysctl.d/ to keep it)")
    if rootless and _sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1":
        return Check(name, FAIL, f"{found} (AppArmor restricts unprivileged user namespaces)",
                     APPARMOR_FIX)
    if code == errno.EPERM:
        where = ("a seccomp or LSM policy forbids them" if rootless
                 else "no CAP_SYS_ADMIN here: a container?")
        fix = ("allow unshare(CLONE_NEWUSER) in the container's seccomp profile, or run "
               "outside it" if rootless else
               "run as a user (the filter engine needs no namespaces), or give the container "
               "CAP_SYS_ADMIN")
        return Check(name, FAIL, f"{found} ({where})", fix)
    return Check(name, FAIL, found, "")


def _overlay(rootless: bool, dirs: dict[str, str]) -> Check:
    """The kernel engine's mount, as it makes it (userxattr, nosuid, nodev), over directories
    of the store, then a write and a delete through it (a copy-up and a whiteout)."""
    def body(step: Step) -> None:
        _enter_namespaces(rootless, dirs["scratch"], step)
        step[0] = "overlay mount"
        options = (f"lowerdir={dirs['lower']},upperdir={dirs['upper']},"
                   f"workdir={dirs['work']},userxattr")
        libc.mount("overlay", dirs["merged"], "overlay", libc.MS_NOSUID | libc.MS_NODEV,
                   options)
        step[0] = "write through the overlay"
        with open(os.path.join(dirs["merged"], "file"), "a") as f:
            f.write("changed")
        step[0] = "delete through the overlay"
        os.unlink(os.path.join(dirs["merged"], "file"))

    with open("/proc/filesystems") as f:
        if "overlay" not in f.read().split():
            return Check("overlayfs", FAIL, "this kernel has no overlay filesystem",
                         "sudo modprobe overlay")
    failed = _in_child(body)
    if failed is None:
        return Check("overlayfs", OK, "mounted over the store's filesystem, written, deleted")
    at, code = failed
    found = f"{at}: {os.strerror(code)}"
    if rootless and at == "overlay mount" and _kernel_older_than(5, 11):
        return Check("overlayfs", FAIL, f"{found} (a user may mount overlayfs from Linux 5.11)",
                     "run as root, or use --engine fuse")
    return Check("overlayfs", FAIL, f"{found} on the store's filesystem", STORE_FIX)


def _kernel_older_than(major: int, minor: int) -> bool:
    numbers = platform.release().split("-")[0].split(".")
    with contextlib.suppress(ValueError, IndexError):
        return (int(numbers[0]), int(numbers[1])) < (major, minor)
    return False


@contextlib.contextmanager
def _probe_dirs(base: str | None):  # type: ignore[no-untyped-def]
    """lower (holding a file), upper, work, merged and scratch directories for the probes,
    in the store when there is one (its filesystem is the one that matters), removed after."""
    import tempfile

    top = tempfile.mkdtemp(prefix="doctor-", dir=base)
    try:
        dirs = {name: os.path.join(top, name)
                for name in ("lower", "upper", "work", "merged", "scratch")}
        for path in dirs.values():
            os.mkdir(path)
        with open(os.path.join(dirs["lower"], "file"), "w") as f:
            f.write("lower\n")
        yield dirs
    finally:
        remove_tree(top)


# -- the store's filesystem -----------------------------------------------------------------------


def _store_filesystem(home: str, dirs: dict[str, str]) -> list[Check]:
    fstype = _filesystem_type(home)
    probe = os.path.join(dirs["scratch"], "probe")
    with open(probe, "wb") as f:
        f.write(b"x" * 4096)
    checks = []
    try:
        os.setxattr(probe, "user.agentctl-doctor", b"1")
        checks.append(Check("store: user xattrs", OK, f"{fstype} keeps them"))
    except OSError as e:
        checks.append(Check("store: user xattrs", FAIL,
                            f"{fstype} at {home}: {os.strerror(e.errno or 0)} (whiteouts, "
                            "opaque directories and copy-up marks are xattrs)",
                            STORE_FIX))
    if libc.directory_types_known(dirs["lower"]):
        checks.append(Check("store: d_type", OK, f"{fstype} lists entry types"))
    else:
        checks.append(Check("store: d_type", FAIL, f"{fstype} lists no entry types (d_type), "
                            "which overlayfs needs of its upper layer",
                            STORE_FIX))
    if libc.birth_time_ns(probe.encode()) is not None:
        checks.append(Check("store: birth times", OK, f"{fstype} records them"))
    else:
        checks.append(Check("store: birth times", WARN,
                            f"{fstype} records none: commit's conflict check dates every change "
                            "from the env's creation, so a host edit made before the job took a "
                            "file over is reported as a conflict",
                            "optional: xfs, btrfs and ext4 with 256-byte inodes (mkfs.ext4's "
                            "default) record them"))
    clone = probe + ".clone"
    try:
        with open(probe, "rb") as source, open(clone, "wb") as target:
            libc.ficlone(target.fileno(), source.fileno())
        checks.append(Check("store: reflink", OK, f"{fstype} shares extents: copies are instant"))
    except OSError:
        checks.append(Check("store: reflink", WARN,
                            f"{fstype} cannot share extents: copy-up, commit and backups copy "
                            "large files byte by byte",
                            "optional: a store on btrfs or xfs (reflink=1) makes those instant"))
    return checks


def _filesystem_type(path: str) -> str:
    best, fstype = "", "unknown"
    for entry in read_mountinfo():
        point = entry.mount_point.rstrip("/") + "/"
        if (path + "/").startswith(point) and len(point) > len(best):
            best, fstype = point, entry.fstype
    return fstype


# -- devices, programs and modules ----------------------------------------------------------------


def _dev_fuse() -> Check:
    try:
        check_dev_fuse("/dev/fuse")
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except IsolationError as e:
        return Check("/dev/fuse", FAIL, e.detail, e.hint)
    except OSError as e:
        return Check("/dev/fuse", FAIL, f"cannot open it: {os.strerror(e.errno or 0)} (a "
                     "container's device rules?)", "start the container with --device /dev/fuse")
    os.close(fd)
    return Check("/dev/fuse", OK, "opened")


def _python_module(name: str) -> Check:
    if importlib.util.find_spec(name) is not None:
        return Check(f"python: {name}", OK, "installed")
    return Check(f"python: {name}", FAIL, "not installed",
                 "sudo apt-get install fuse3 libfuse3-dev, then pip install pyfuse3 in "
                 "agentctl's venv (the README's set-up command)")


def _fusermount() -> Check:
    found = shutil.which("fusermount3")
    if found:
        return Check("fusermount3", OK, found)
    return Check("fusermount3", FAIL, "not installed (the filter mounts through it)",
                 "sudo apt-get install fuse3")


def _landlock() -> Check:
    abi = libc.landlock_abi()
    if abi <= 0:
        return Check("Landlock", FAIL, "not available (the filter and copy engines' only "
                     "confinement)",
                     "Linux >= 5.13 booted with Landlock among its LSMs (lsm=landlock,...)")
    if abi < 6:
        return Check("Landlock", WARN, f"ABI {abi}: jobs can reach the host's abstract sockets "
                     "and signal outside their domain (scoping needs ABI 6, Linux 6.12)",
                     "a newer kernel; meanwhile --network none gives a job abstract sockets of "
                     "its own")
    return Check("Landlock", OK, f"ABI {abi}")


def _seccomp() -> Check:
    from isolated_agent.jobs.syscall_filter import _binding

    try:
        with open("/proc/self/status") as f:
            if not any(line.startswith("Seccomp:") for line in f):
                return Check("seccomp", FAIL, "this kernel has no seccomp",
                             "a kernel built with CONFIG_SECCOMP_FILTER")
        _binding()
    except IsolationError as e:
        return Check("seccomp", FAIL, e.detail, e.hint)
    return Check("seccomp", OK, "libseccomp's binding loads; every job gets the baseline")


def _job_user(rootless: bool) -> Check:
    if rootless:
        return Check("job user", OK, f"uid {os.getuid()}")
    return Check("job user", FAIL, "root: without namespaces the job would be uid 0 on the "
                 "host, owner of /tmp and of every root file", "run agentctl as your user")


def _cgroup() -> Check:
    parent = own_group()
    if parent is None:
        return Check("cgroup v2", WARN, "no cgroup2 hierarchy: a job is held by its pid namespace "
                     "alone, and --memory, --pids, --cpus are refused",
                     "boot with systemd.unified_cgroup_hierarchy=1")
    probe = os.path.join(parent, f"isolated-agent-doctor-{os.getpid()}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        return Check("cgroup v2", WARN, f"{parent} is not writable ({os.strerror(e.errno or 0)}): "
                     "a job is held by its pid namespace alone, and --memory, --pids, --cpus "
                     "are refused", DELEGATE_HINT)
    problem = limits_problem(Limits(memory=1, pids=1, cpus=1))
    if problem is not None:
        return Check("cgroup v2", WARN, f"jobs get a group in {parent}, but {problem}: "
                     "--memory, --pids, --cpus are refused", DELEGATE_HINT)
    return Check("cgroup v2", OK, f"jobs get a group in {parent}, with every limit")


def _tiocsti() -> Check:
    value = _sysctl("dev.tty.legacy_tiocsti")
    if value == "0":
        return Check("TIOCSTI", OK, "dev.tty.legacy_tiocsti is 0: no program can inject input")
    return Check("TIOCSTI", WARN, "terminal input injection is allowed on this machine (jobs are "
                 "safe: they get a terminal of their own and the seccomp baseline refuses it)",
                 "to shut it for every program: sudo sysctl -w dev.tty.legacy_tiocsti=0")


def _fuse_wakeups() -> list[Check]:
    """Where a FUSE daemon is woken (fusefs/wakeup.py); no check on a kernel that cannot say."""
    here = wakeup.callers_cpu_wakeups()
    if here is None:
        return []
    if here:
        return [Check("FUSE wake-ups", OK, "on the caller's CPU (fuse.wake_here is Y)")]
    return [Check("FUSE wake-ups", WARN, "on another CPU (fuse.wake_here is N): each request to "
                  "the guard, the filter or agentfs waits for that CPU, on a virtual machine "
                  "several times what the request costs", f"for every FUSE file system: "
                  f"{wakeup.ENABLE}")]


def _user_name() -> str:
    import pwd

    with contextlib.suppress(KeyError):
        return pwd.getpwuid(os.getuid()).pw_name
    return f"uid {os.getuid()}"

