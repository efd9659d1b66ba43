"""The few Linux system calls Python's `os` module lacks, wrapped once, raising `OSError`.

Everything that talks to the kernel through ctypes lives here, so the rest of the code reads as
plain Python and a reviewer has one file to check against the man pages.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import sys

# glibc's soname, loaded directly: ctypes.util.find_library runs ldconfig, which costs every
# `agentctl run` several milliseconds of start-up.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)

# <sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000

# <sys/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# <sys/prctl.h>
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# <linux/securebits.h>: root gets no capabilities from exec, and that cannot be undone.
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# <linux/fs.h>: renameat2(2) flags.
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2  # leave an overlayfs whiteout (char device 0/0) at the source

# <linux/fs.h>: FICLONE = _IOW(0x94, 9, int): share the source's extents (reflink).
FICLONE = 0x40049409

# x86_64 / aarch64 share these numbers for the syscalls we call by number.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, 155)


def _check(result: int, what: str, path: str | None = None) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace `fd` refers to (an open /proc/PID/ns/* file); Python 3.12 has it."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    _check(
        _libc.mount(
            _bytes_or_none(source),
            os.fsencode(target),
            _bytes_or_none(fstype),
            ctypes.c_ulong(flags),
            _bytes_or_none(data),
        ),
        "mount",
        target,
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(flags)), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    result = _libc.syscall(
        ctypes.c_long(_SYS_PIVOT_ROOT), os.fsencode(new_root), os.fsencode(put_old)
    )
    _check(result, "pivot_root", new_root)


# The new mount API (Linux >= 5.12 for idmapped mounts): one number on every architecture.
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_OPEN_TREE_CLONE = 1
_AT_EMPTY_PATH = 0x1000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_IDMAP = 0x00100000


def attach_idmapped(path: str, userns_fd: int) -> None:
    """Mount over `path`, in this mount namespace, a copy of the mount there through which
    file owners are seen as the user namespace `userns_fd` maps them (an idmapped mount): an
    owner `a` on disk, where the namespace's uid_map has a line `a b 1`, is seen (and written)
    as `b`."""
    tree = _check(_libc.syscall(ctypes.c_long(_SYS_OPEN_TREE), _AT_FDCWD, os.fsencode(path),
                                ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC)), "open_tree", path)
    try:
        attr = struct.pack("=QQQQ", _MOUNT_ATTR_IDMAP, 0, 0, userns_fd)  # struct mount_attr
        _check(_libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), tree, b"",
                             ctypes.c_uint(_AT_EMPTY_PATH), attr, ctypes.c_size_t(len(attr))),
               "mount_setattr", path)
        _check(_libc.syscall(ctypes.c_long(_SYS_MOVE_MOUNT), tree, b"", _AT_FDCWD,
                             os.fsencode(path), ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH)),
               "move_mount", path)
    finally:
        os.close(tree)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    args = (ctypes.c_ulong(a) for a in (arg2, arg3, arg4, arg5))
    return _check(_libc.prctl(ctypes.c_int(option), *args), "prctl")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def drop_all_capabilities() -> None:
    """Leave this process, and every program it execs, with no capability at all.

    Order matters: the bounding set and the securebits need CAP_SETPCAP, so they go first; the
    capability sets are emptied last. SECBIT_NOROOT keeps uid 0 from regaining capabilities at
    exec (otherwise a root job would get the full set back from the kernel).

    A process without CAP_SETPCAP (an unprivileged user's job with no namespace of its own,
    the filter engine's) holds nothing to drop and may touch neither its bounding set nor its
    securebits: it only empties its sets; no_new_privs, which the caller sets next, keeps any
    exec (setuid, file capabilities) from granting one.
    """
    if not _effective_capability(CAP_SETPCAP):
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        _capset_empty()
        return
    for cap in range(last_capability() + 1):
        try:
            prctl(PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a capability this kernel does not know
                raise
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    bits = (
        SECBIT_NOROOT
        | SECBIT_NOROOT_LOCKED
        | SECBIT_NO_SETUID_FIXUP
        | SECBIT_NO_SETUID_FIXUP_LOCKED
        | SECBIT_KEEP_CAPS_LOCKED
        | SECBIT_NO_CAP_AMBIENT_RAISE
        | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
    )
    prctl(PR_SET_SECUREBITS, bits)
    _capset_empty()


CAP_SETPCAP = 8


def _effective_capability(cap: int) -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def _capset_empty() -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


# <linux/keyctl.h>; keyctl(2) by number: glibc has no wrapper.
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine, 250)
_KEYCTL_JOIN_SESSION_KEYRING = 1


def join_new_session_keyring() -> None:
    """Give this process (and what it runs) a new, empty, anonymous session keyring, so that
    no key of the caller's session is named in it. A kernel without keyrings has nothing to
    hide: ENOSYS is not an error."""
    result = _libc.syscall(_SYS_KEYCTL, _KEYCTL_JOIN_SESSION_KEYRING, None)
    if result == -1 and ctypes.get_errno() != errno.ENOSYS:
        _check(result, "keyctl(JOIN_SESSION_KEYRING)")


# <linux/sockios.h>, <net/if.h>: struct ifreq is a 16-byte name and a 24-byte union.
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def bring_up_loopback() -> None:
    """Set `lo` up in this process's network namespace (a new one starts with it down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def set_parent_death_signal(signum: int) -> None:
    prctl(PR_SET_PDEATHSIG, signum)


def set_child_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def syncfs(fd: int) -> None:
    """Flush every dirty page and inode of the filesystem holding `fd` (one barrier for many
    files, instead of an fsync each)."""
    _check(_libc.syncfs(ctypes.c_int(fd)), "syncfs")


# <linux/stat.h>: struct statx is 256 bytes on every architecture; stx_mask is its first u32 and
# stx_btime (a struct statx_timestamp: s64 seconds, u32 nanoseconds, s32 padding) sits at 80.
_STATX_BTIME = 0x800
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_FDCWD = -100
_STATX_SIZE = 256
_STATX_BTIME_OFFSET = 80


def birth_time_ns(path: bytes, dir_fd: int | None = None) -> int | None:
    """The birth (creation) time of `path` in nanoseconds, not following a final symlink, or
    None when the filesystem does not record one."""
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    result = _libc.statx(
        ctypes.c_int(_AT_FDCWD if dir_fd is None else dir_fd),
        path,
        ctypes.c_int(_AT_SYMLINK_NOFOLLOW),
        ctypes.c_uint(_STATX_BTIME),
        buf,
    )
    _check(result, "statx", os.fsdecode(path))
    order = sys.byteorder
    mask = int.from_bytes(buf.raw[0:4], order)
    if not mask & _STATX_BTIME:
        return None
    raw = buf.raw[_STATX_BTIME_OFFSET : _STATX_BTIME_OFFSET + 12]
    seconds = int.from_bytes(raw[0:8], order, signed=True)
    nanoseconds = int.from_bytes(raw[8:12], order)
    if seconds == 0 and nanoseconds == 0:  # some filesystems report the bit with no value
        return None
    return seconds * 1_000_000_000 + nanoseconds


# struct linux_dirent64: u64 d_ino, s64 d_off, u16 d_reclen, u8 d_type, then the name.
_DT_UNKNOWN = 0


def directory_types_known(directory: str) -> bool:
    """Whether the filesystem of `directory` (which must hold an entry besides . and ..)
    reports each entry's type in its listing (d_type), as overlayfs needs of an upper layer.
    Python's scandir hides it, falling back to a stat for DT_UNKNOWN."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        buf = ctypes.create_string_buffer(65536)
        size = _check(_libc.getdents64(ctypes.c_int(fd), buf, ctypes.c_size_t(len(buf))),
                      "getdents64", directory)
    finally:
        os.close(fd)
    raw, offset, types = buf.raw, 0, []
    while offset < size:
        reclen = int.from_bytes(raw[offset + 16:offset + 18], sys.byteorder)
        name = raw[offset + 19:offset + reclen].split(b"\0", 1)[0]
        if name not in (b".", b".."):
            types.append(raw[offset + 18])
        offset += reclen
    return bool(types) and _DT_UNKNOWN not in types


def renameat2(
    old_dir_fd: int, old_name: bytes, new_dir_fd: int, new_name: bytes, flags: int = 0
) -> None:
    """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT, relative to dir fds
    (glibc >= 2.28 has the wrapper; `os.rename` cannot pass flags)."""
    _check(
        _libc.renameat2(
            ctypes.c_int(old_dir_fd),
            ctypes.c_char_p(old_name),
            ctypes.c_int(new_dir_fd),
            ctypes.c_char_p(new_name),
            ctypes.c_uint(flags),
        ),
        "renameat2",
        os.fsdecode(old_name),
    )


# <sys/inotify.h>
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
_INOTIFY_EVENT = struct.Struct("=iIII")  # wd, mask, cookie, len; then len bytes of name


def inotify_init() -> int:
    """A non-blocking, close-on-exec inotify descriptor."""
    return _check(_libc.inotify_init1(ctypes.c_int(os.O_NONBLOCK | os.O_CLOEXEC)),
                  "inotify_init1")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    return _check(_libc.inotify_add_watch(ctypes.c_int(fd), os.fsencode(path),
                                          ctypes.c_uint32(mask)), "inotify_add_watch", path)


def inotify_rm_watch(fd: int, wd: int) -> None:
    _check(_libc.inotify_rm_watch(ctypes.c_int(fd), ctypes.c_int(wd)), "inotify_rm_watch")


_INOTIFY_READ = 1 << 16
_INOTIFY_EVENT_MAX = _INOTIFY_EVENT.size + 256  # NAME_MAX, its NUL, padding


def inotify_read(fd: int) -> list[tuple[int, int, bytes]]:
    """Every event queued now, as (wd, mask, name); [] when none is. One read(2) unless the
    queue held more than one read takes: a non-blocking read that finds nothing raises, and a
    caller on every request should not pay for that after each batch."""
    events = []
    while True:
        try:
            data = os.read(fd, _INOTIFY_READ)
        except BlockingIOError:
            return events
        offset = 0
        while offset < len(data):
            wd, mask, _, length = _INOTIFY_EVENT.unpack_from(data, offset)
            offset += _INOTIFY_EVENT.size
            events.append((wd, mask, data[offset:offset + length].rstrip(b"\0")))
            offset += length
        if len(data) <= _INOTIFY_READ - _INOTIFY_EVENT_MAX:
            return events  # the kernel returns whole events only: that was all of them


def ficlone(dst_fd: int, src_fd: int) -> None:
    """Make `dst_fd` share all of `src_fd`'s data extents (btrfs, xfs, ...). Raises OSError
    (EOPNOTSUPP, EXDEV, EINVAL) where the filesystem cannot; callers fall back to copying."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


# <linux/landlock.h>: syscall numbers are the same on every architecture (added in 5.13).
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
_LANDLOCK_RULE_PATH_BENEATH = 1

LANDLOCK_ACCESS_FS_EXECUTE = 1 << 0
LANDLOCK_ACCESS_FS_WRITE_FILE = 1 << 1
LANDLOCK_ACCESS_FS_READ_FILE = 1 << 2
LANDLOCK_ACCESS_FS_READ_DIR = 1 << 3
LANDLOCK_ACCESS_FS_REMOVE_DIR = 1 << 4
LANDLOCK_ACCESS_FS_REMOVE_FILE = 1 << 5
LANDLOCK_ACCESS_FS_MAKE_CHAR = 1 << 6
LANDLOCK_ACCESS_FS_MAKE_DIR = 1 << 7
LANDLOCK_ACCESS_FS_MAKE_REG = 1 << 8
LANDLOCK_ACCESS_FS_MAKE_SOCK = 1 << 9
LANDLOCK_ACCESS_FS_MAKE_FIFO = 1 << 10
LANDLOCK_ACCESS_FS_MAKE_BLOCK = 1 << 11
LANDLOCK_ACCESS_FS_MAKE_SYM = 1 << 12
LANDLOCK_ACCESS_FS_REFER = 1 << 13  # ABI 2
LANDLOCK_ACCESS_FS_TRUNCATE = 1 << 14  # ABI 3
LANDLOCK_ACCESS_FS_IOCTL_DEV = 1 << 15  # ABI 5

# Rights that only mean something on a regular file (a rule on a non-directory may hold no
# other: the kernel answers EINVAL).
LANDLOCK_ACCESS_FS_FILE = (
    LANDLOCK_ACCESS_FS_EXECUTE
    | LANDLOCK_ACCESS_FS_WRITE_FILE
    | LANDLOCK_ACCESS_FS_READ_FILE
    | LANDLOCK_ACCESS_FS_TRUNCATE
    | LANDLOCK_ACCESS_FS_IOCTL_DEV
)

LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
LANDLOCK_SCOPE_SIGNAL = 1 << 1  # ABI 6


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),  # ABI 4
        ("scoped", ctypes.c_uint64),  # ABI 6
    ]


class _LandlockPathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the uapi header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The Landlock ABI version this kernel offers, 0 when it has none (older than 5.13, or
    Landlock not among the enabled LSMs)."""
    result = _libc.syscall(
        ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET),
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(int(result), 0)


def landlock_create_ruleset(handled_access_fs: int, scoped: int = 0) -> int:
    """A new ruleset fd (close-on-exec) handling these access rights. The attribute is passed
    at the size of the oldest ABI that knows every field used, so older kernels accept it."""
    attr = _LandlockRulesetAttr(handled_access_fs, 0, scoped)
    size = 24 if scoped else 8
    result = _libc.syscall(
        ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET),
        ctypes.byref(attr),
        ctypes.c_size_t(size),
        ctypes.c_uint32(0),
    )
    return _check(int(result), "landlock_create_ruleset")


def landlock_allow_beneath(ruleset_fd: int, parent_fd: int, allowed_access: int) -> None:
    """Allow `allowed_access` on the file or directory tree `parent_fd` (an O_PATH fd) names."""
    attr = _LandlockPathBeneathAttr(allowed_access, parent_fd)
    result = _libc.syscall(
        ctypes.c_long(_SYS_LANDLOCK_ADD_RULE),
        ctypes.c_int(ruleset_fd),
        ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
        ctypes.byref(attr),
        ctypes.c_uint32(0),
    )
    _check(int(result), "landlock_add_rule")


def landlock_restrict_self(ruleset_fd: int) -> None:
    """Enforce the ruleset on this thread, and on everything it forks and execs, for good.
    Needs no_new_privs (or CAP_SYS_ADMIN). Python runs us on one thread in the job's processes
    (forked children have a single thread), so that thread is the whole process."""
    result = _libc.syscall(
        ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset_fd), ctypes.c_uint32(0)
    )
    _check(int(result), "landlock_restrict_self")


def _bytes_or_none(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


# <linux/seccomp.h>: a filter whose matching calls wait for a supervisor (user notification).
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}.get(os.uname().machine, 317)
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5  # 5.19
_SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100  # _IOWR('!', 0, struct seccomp_notif)
_SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101  # _IOWR('!', 1, struct seccomp_notif_resp)
_SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102  # _IOW('!', 2, __u64)
# struct seccomp_notif: u64 id, u32 pid, u32 flags, then struct seccomp_data: s32 nr,
# u32 arch, u64 instruction_pointer, u64 args[6].
_SECCOMP_NOTIF = struct.Struct("=QIIiIQ6Q")
_SECCOMP_NOTIF_RESP = struct.Struct("=QqiI")  # u64 id, s64 val, s32 error, u32 flags


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_load_listener(program: bytes) -> int:
    """Load a BPF program (libseccomp's export) whose SCMP_ACT_NOTIFY calls wait for whoever
    holds the returned listener fd. Once the supervisor has received a call, only a fatal
    signal interrupts the caller (WAIT_KILLABLE_RECV, Linux 5.19), so that an operation done
    on its behalf is never repeated by a restarted call; older kernels load without it."""
    buffer = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    flags = _SECCOMP_FILTER_FLAG_NEW_LISTENER | _SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    while True:
        result = _libc.syscall(ctypes.c_long(_SYS_SECCOMP), ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
                               ctypes.c_uint(flags), ctypes.byref(prog))
        if result >= 0:
            return int(result)
        if ctypes.get_errno() != errno.EINVAL or flags == _SECCOMP_FILTER_FLAG_NEW_LISTENER:
            return _check(int(result), "seccomp(SET_MODE_FILTER)")
        flags = _SECCOMP_FILTER_FLAG_NEW_LISTENER


def seccomp_receive(listener: int) -> tuple[int, int, int, tuple[int, ...]]:
    """The next call waiting on `listener`: (id, thread id, syscall number, six raw args)."""
    buffer = bytearray(_SECCOMP_NOTIF.size)  # the kernel insists on a zeroed one
    fcntl.ioctl(listener, _SECCOMP_IOCTL_NOTIF_RECV, buffer, True)
    call_id, tid, _flags, number, _arch, _ip, *args = _SECCOMP_NOTIF.unpack(buffer)
    return call_id, tid, number, tuple(args)


def seccomp_respond(listener: int, call_id: int, value: int, error: int) -> None:
    """Complete a waiting call: it returns `value`, or fails with errno `error` if non-zero.
    ENOENT (the caller was killed meanwhile) is not an error."""
    response = _SECCOMP_NOTIF_RESP.pack(call_id, value, -error if error else 0, 0)
    try:
        fcntl.ioctl(listener, _SECCOMP_IOCTL_NOTIF_SEND, response)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def seccomp_call_is_waiting(listener: int, call_id: int) -> bool:
    """Whether the call is still waiting: after opening a thread's /proc files by its id, this
    proves the id was not reused by another process meanwhile."""
    try:
        fcntl.ioctl(listener, _SECCOMP_IOCTL_NOTIF_ID_VALID, struct.pack("=Q", call_id))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


# pidfd_getfd(2): the same number on every architecture (5.6).
_SYS_PIDFD_GETFD = 438
PIDFD_THREAD = os.O_EXCL  # pidfd_open(2) of a thread, not only of a process (6.9)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A duplicate (close-on-exec) of another process's descriptor: the same open file."""
    result = _libc.syscall(ctypes.c_long(_SYS_PIDFD_GETFD), ctypes.c_int(pidfd),
                           ctypes.c_int(target_fd), ctypes.c_uint(0))
    return _check(int(result), "pidfd_getfd")


def connect(fd: int, address: bytes) -> None:
    """connect(2) with a raw socket address, as a program passed it."""
    _check(_libc.connect(ctypes.c_int(fd), address, ctypes.c_uint(len(address))), "connect")


AT_EMPTY_PATH = 0x1000


def fchownat_empty(fd: int, uid: int, gid: int) -> None:
    """chown the object an O_PATH descriptor names, itself (a symlink included)."""
    flags = AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW
    _check(_libc.fchownat(ctypes.c_int(fd), b"", ctypes.c_uint(uid & 0xFFFFFFFF),
                          ctypes.c_uint(gid & 0xFFFFFFFF), ctypes.c_int(flags)), "fchownat")


def utimensat_empty(fd: int, times: bytes | None) -> None:
    """utimensat(2) on the object an O_PATH descriptor names, itself; `times` is the raw
    struct timespec[2] (UTIME_NOW / UTIME_OMIT included) or None for "now"."""
    flags = AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW
    _check(_libc.utimensat(ctypes.c_int(fd), b"", times, ctypes.c_int(flags)), "utimensat")
