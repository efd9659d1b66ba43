"""The filter engine's supervisor: the calls Landlock cannot judge, done by the job's keeper on
the job's behalf, where they may act.

Without a mount namespace the job sees the host's tree itself. Landlock keeps it from creating,
writing, renaming or removing anything outside its write paths (confine.py), but a change of
mode, owner, times or extended attributes is not a write to Landlock, nor is connect(2) to a
unix socket: `chmod 0777 ~/.ssh`, or a connect to /run/docker.sock, would pass. So
the job's seccomp filter makes those calls wait (syscall_filter.SUPERVISED) for the supervisor,
a thread of the job's keeper (launcher.py's process B), which:

- reads the call's arguments from the caller's memory once, and opens what its path or
  descriptor names as the caller would (from its working directory or its directory fd, through
  the filter's view of the job);
- decides on the object it holds, by the object's place in the tree (the path the kernel reports
  for the descriptor), never on the path it was given;
- does the call itself, on that descriptor, and answers with the result. Nothing is ever handed
  back to the kernel to redo (SECCOMP_USER_NOTIF_FLAG_CONTINUE): a second thread rewriting the
  path after the check would then change what is done.

The keeper has the job's credentials (same user and groups, no capability, no_new_privs) and its
Landlock scopes (confine.scope_job), so the supervisor can do nothing the job could not do on its
own: it adds a rule about where. And it is an ancestor of every job process, which Yama's
ptrace_scope=1 requires to read a caller's memory and descriptors.

Where (`Places`):

- metadata may change within the managed roots (the filter's view: the env's layer takes the
  change) and the --allow paths, and strictly beneath the shared scratch dirs /tmp and /dev/shm
  (not those dirs themselves: they are the host's). Objects with no place in the tree (pipes,
  sockets, unlinked files) are the job's own;
- a pathname unix socket may be reached when it is a name service or an --allow-socket (as on
  every engine), within a managed root or --allow path, or beneath /tmp or /dev/shm if the host
  had not bound it when the job started. Any other is refused with ECONNREFUSED, as the
  namespaced engines' covered sockets are. Other addresses (abstract sockets, IP) are connected
  as asked: the keeper's Landlock scope keeps the host's abstract sockets out of reach.

Not covered: a datagram sent with sendto/sendmsg to a named socket (README "Remaining gaps").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from isolated_agent.env.store import is_within
from isolated_agent.errors import IsolationError
from isolated_agent.jobs.confine import scope_job
from isolated_agent.jobs.host_sockets import bound_socket_paths, kept_sockets
from isolated_agent.jobs.syscall_filter import FS_IOC_FSSETXATTR, SUPERVISED_IOCTLS
from isolated_agent.system import libc

STEP = "the filter engine's supervisor"

# Shared with the host under the filter: the job may act beneath them, not on them.
SCRATCH_DIRS = ("/tmp", "/dev/shm")

_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_EMPTY_PATH = 0x1000
_PATH_MAX = 4096
_XATTR_NAME_MAX = 255
_XATTR_SIZE_MAX = 65536
_SOCKADDR_MAX = 128  # sizeof(struct sockaddr_storage): the kernel refuses longer addresses
_DELETED = " (deleted)"


@dataclass(frozen=True)
class Places:
    """Where a supervised call may act (real paths throughout)."""

    writable: tuple[str, ...]  # the managed roots and --allow paths, themselves included
    scratch: tuple[str, ...]  # shared dirs: strictly beneath only
    kept_sockets: tuple[str, ...]  # name services and --allow-socket paths
    host_sockets: frozenset[str]  # bound on the host when the job started

    @classmethod
    def for_job(cls, roots: Iterable[str], allow: Iterable[str],
                allow_sockets: Iterable[str], shared_tmp: bool = True) -> Places:
        real = os.path.realpath
        return cls(
            writable=tuple(real(p) for p in (*roots, *allow)),
            scratch=tuple(real(p) for p in SCRATCH_DIRS) if shared_tmp else (),
            kept_sockets=tuple(kept_sockets(allow_sockets)),
            host_sockets=frozenset(real(p) for p in bound_socket_paths()),
        )

    def may_change(self, place: str | None) -> bool:
        if place is None:
            return True
        return (any(is_within(place, w) for w in self.writable)
                or any(is_within(place, s) and place != s for s in self.scratch))

    def may_connect(self, place: str) -> bool:
        if any(is_within(place, k) for k in self.kept_sockets):
            return True
        if any(is_within(place, w) for w in self.writable):
            return True
        return place not in self.host_sockets and any(is_within(place, s) for s in self.scratch)

    def refused_host_sockets(self) -> list[str]:
        """The host's sockets a job is refused (for the launcher's hint after a failure)."""
        return sorted(p for p in self.host_sockets if not self.may_connect(p))


class Handover:
    """The socket pair over which the command (C) hands its listener to the keeper (B)."""

    def __init__(self) -> None:
        self._keeper, self._command = socket.socketpair()

    def send(self, listener: int) -> None:
        """In the command, once its supervised filter is loaded."""
        self._keeper.close()
        socket.send_fds(self._command, [b"L"], [listener])
        self._command.close()

    def receive(self) -> int | None:
        """In the keeper: the listener, or None when the command ended before it had one."""
        self._command.close()
        _, fds, _, _ = socket.recv_fds(self._keeper, 1, 1)
        self._keeper.close()
        return fds[0] if fds else None


def enter_job_domain() -> None:
    """In the keeper, before it forks the command: no_new_privs and the job's Landlock scopes.
    The command's own Landlock domain then nests in the keeper's, and a Landlock domain may
    read the memory of (and signal) only processes of its own or a nested domain."""
    try:
        libc.set_no_new_privs()
    except OSError as e:
        raise IsolationError(STEP, f"no_new_privs: {e.strerror}") from e
    scope_job()


def start(handover: Handover, places: Places, stop_job: Callable[[], None]) -> bool:
    """In the keeper, right after forking the command: take the listener, drop every
    capability (the command dropped its own, and its bounding set, with ours) and serve its
    calls on a thread until every process of the job has exited. False if the command never
    sent a listener (it failed before). Should the supervisor itself fail, `stop_job` ends the
    job: its calls would otherwise wait for ever."""
    listener = handover.receive()
    if listener is None:
        return False
    try:
        libc.drop_all_capabilities()
    except OSError as e:
        raise IsolationError(STEP, f"dropping capabilities: {e.strerror}") from e
    # The thread inherits this thread's credentials: capabilities are per thread.
    threading.Thread(target=_serve, args=(listener, places, stop_job), name="supervisor",
                     daemon=True).start()
    return True


def _serve(listener: int, places: Places, stop_job: Callable[[], None]) -> None:
    try:
        _answer_all(listener, places)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.write(2, f"agentctl: {STEP} failed ({e!r}); stopping the job\n".encode())
        stop_job()


def _answer_all(listener: int, places: Places) -> None:
    """Answer every waiting call, until the job's last process is gone (POLLHUP). Calls that
    may block (connect) run on a pool, so that one slow peer holds up nothing else."""
    from concurrent.futures import ThreadPoolExecutor  # only a serving keeper needs it (7 ms)

    handlers = _handlers()
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="supervisor") as pool:
        while True:
            events = dict(poller.poll())
            if not events.get(listener, 0) & select.POLLIN:
                return
            try:
                call_id, tid, number, args = libc.seccomp_receive(listener)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR):  # the caller died meanwhile
                    continue
                raise
            handler = handlers.get(number)
            if handler is _connect:
                pool.submit(_answer, listener, places, call_id, tid, handler, args)
            else:
                _answer(listener, places, call_id, tid, handler, args)


def _answer(listener: int, places: Places, call_id: int, tid: int,
            handler: Handler | None, args: tuple[int, ...]) -> None:
    error = 0
    try:
        with _Caller(listener, call_id, tid, places) as caller:
            if handler is None:  # a number this table does not know: never let it through
                raise OSError(errno.ENOSYS, "not supervised")
            _with_stale_retries(handler, caller, args)
    except _Gone:
        return
    except OSError as e:
        error = e.errno or errno.EPERM
    except Exception:  # noqa: BLE001 - a bug here must fail the call, never the job's keeper
        error = errno.EPERM
    with contextlib.suppress(OSError):
        libc.seccomp_respond(listener, call_id, 0, error)


# The filter answers ESTALE once when an env's change makes a shared name its own, and drops
# the kernel's cached entry for it; the kernel's own retry of a path-based call then forces a
# fresh lookup (LOOKUP_REVAL). A path given from user space cannot ask for that, and the entry
# is dropped asynchronously: the next tries wait a little longer each (63 ms in all).
_STALE_WAITS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032)


def _with_stale_retries(handler: Handler, caller: _Caller, args: tuple[int, ...]) -> None:
    for wait in (*_STALE_WAITS, None):
        try:
            handler(caller, args)
            return
        except OSError as e:
            if e.errno != errno.ESTALE or wait is None:
                raise
        time.sleep(wait)


class _Gone(Exception):
    """The call stopped waiting (its process was killed) before we could act on it."""


class _Caller:
    """The thread whose call waits: its memory and descriptors, opened once and proven to
    belong to the waiting call (a thread id can be reused once its thread is gone)."""

    def __init__(self, listener: int, call_id: int, tid: int, places: Places) -> None:
        self.tid = tid
        self.places = places
        self._fds: list[int] = []
        try:
            self._memory = self._keep(os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC))
            self._pidfd = self._keep(_pidfd_open(tid))
        except OSError as e:
            self.close()
            if e.errno in (errno.ENOENT, errno.ESRCH):
                raise _Gone from e
            raise
        if not libc.seccomp_call_is_waiting(listener, call_id):
            self.close()
            raise _Gone

    def __enter__(self) -> _Caller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def read(self, address: int, size: int) -> bytes:
        try:
            data = os.pread(self._memory, size, address) if size else b""
        except OSError as e:
            raise OSError(errno.EFAULT, "bad address") from e
        if len(data) != size:
            raise OSError(errno.EFAULT, "bad address")
        return data

    def read_string(self, address: int, limit: int = _PATH_MAX) -> bytes:
        """A NUL-terminated string, read a page at a time (the next page may not exist)."""
        if address == 0:
            raise OSError(errno.EFAULT, "bad address")
        data = b""
        while True:
            chunk = self.read(address + len(data), 4096 - (address + len(data)) % 4096)
            end = chunk.find(b"\0")
            if end >= 0:
                return data + chunk[:end]
            data += chunk
            if len(data) >= limit:
                raise OSError(errno.ENAMETOOLONG, "name too long")

    def descriptor(self, fd: int) -> int:
        """The caller's descriptor `fd`: the same open file."""
        return self._keep(libc.pidfd_getfd(self._pidfd, _int(fd)))

    def lookup(self, dir_fd: int, address: int, follow: bool, empty: bool = False) -> int:
        """An O_PATH descriptor of what the caller's (dir_fd, path) names, resolved as the
        kernel would for it."""
        return self.lookup_name(dir_fd, self.read_string(address), follow, empty)

    def lookup_name(self, dir_fd: int, path: bytes, follow: bool, empty: bool = False) -> int:
        dir_fd = _int(dir_fd)
        if not path:
            if not empty:
                raise OSError(errno.ENOENT, "empty path")
            return self._start(dir_fd)
        for own in (b"/proc/self/", b"/proc/thread-self/"):  # the caller's, not ours
            if path.startswith(own) or path == own[:-1]:
                path = b"/proc/%d/" % self.tid + path[len(own):]
        start = None if path.startswith(b"/") else self._start(dir_fd)
        flags = os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        return self._keep(os.open(path, flags, dir_fd=start))

    def _start(self, dir_fd: int) -> int:
        if dir_fd == _AT_FDCWD:
            return self._keep(os.open(f"/proc/{self.tid}/cwd", os.O_PATH | os.O_CLOEXEC))
        return self.descriptor(dir_fd)

    def may_change(self, fd: int) -> None:
        if not self.places.may_change(place_of(fd)):
            raise OSError(errno.EPERM, "outside the job's write paths")


def place_of(fd: int) -> str | None:
    """Where the object `fd` holds sits in the tree, as the kernel names it for this very
    descriptor, or None when it has no place (a pipe, a socket, an unlinked file)."""
    name = os.readlink(f"/proc/self/fd/{fd}")
    if not name.startswith("/"):
        return None  # pipe:[...], socket:[...], anon_inode:...
    if name.endswith(_DELETED):
        st = os.fstat(fd)
        try:
            here = os.lstat(name)
            if (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
                return name  # a real name that happens to end so
        except OSError:
            pass
        if st.st_nlink == 0:
            return None
        return name[: -len(_DELETED)]
    return name


def _int(raw: int) -> int:
    """A C int argument from its raw 64-bit register."""
    value = raw & 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _id(raw: int) -> int:
    """A uid_t/gid_t argument; (uid_t)-1 means "leave it"."""
    value = raw & 0xFFFFFFFF
    return -1 if value == 0xFFFFFFFF else value


def _pidfd_open(tid: int) -> int:
    try:
        return os.pidfd_open(tid, libc.PIDFD_THREAD)
    except OSError as e:
        if e.errno != errno.EINVAL:  # before 6.9: only processes; threads share their table
            raise
    with open(f"/proc/{tid}/status") as f:
        tgid = next(int(line.split()[1]) for line in f if line.startswith("Tgid:"))
    return os.pidfd_open(tgid)


# -- what is done, on the object the caller named ------------------------------------------------


def _chmod(caller: _Caller, fd: int, mode: int) -> None:
    caller.may_change(fd)
    if stat.S_ISLNK(os.fstat(fd).st_mode):
        raise OSError(errno.EOPNOTSUPP, "a symlink has no mode")
    os.chmod(f"/proc/self/fd/{fd}", mode & 0o7777)


def _chown(caller: _Caller, fd: int, uid: int, gid: int) -> None:
    caller.may_change(fd)
    libc.fchownat_empty(fd, _id(uid), _id(gid))


def _utimens(caller: _Caller, fd: int, times: bytes | None) -> None:
    caller.may_change(fd)
    libc.utimensat_empty(fd, times)


def _setxattr(caller: _Caller, fd: int, name_at: int, value_at: int, size: int,
              flags: int) -> None:
    name = caller.read_string(name_at, _XATTR_NAME_MAX + 1)
    if size > _XATTR_SIZE_MAX:
        raise OSError(errno.E2BIG, "value too large")
    value = caller.read(value_at, size)
    caller.may_change(fd)
    os.setxattr(f"/proc/self/fd/{fd}", name, value, _int(flags))


def _removexattr(caller: _Caller, fd: int, name_at: int) -> None:
    name = caller.read_string(name_at, _XATTR_NAME_MAX + 1)
    caller.may_change(fd)
    os.removexattr(f"/proc/self/fd/{fd}", name)


# struct timespec, from the older calls' struct utimbuf (two time_t) and struct timeval[2].
_TIMESPECS = struct.Struct("=qqqq")


def _timespecs(caller: _Caller, address: int) -> bytes | None:
    return caller.read(address, _TIMESPECS.size) if address else None


def _from_utimbuf(caller: _Caller, address: int) -> bytes | None:
    if not address:
        return None
    access, modify = struct.unpack("=qq", caller.read(address, 16))
    return _TIMESPECS.pack(access, 0, modify, 0)


def _from_timevals(caller: _Caller, address: int) -> bytes | None:
    if not address:
        return None
    a_sec, a_usec, m_sec, m_usec = _TIMESPECS.unpack(caller.read(address, 32))
    if not (0 <= a_usec < 1_000_000 and 0 <= m_usec < 1_000_000):
        raise OSError(errno.EINVAL, "bad time")
    return _TIMESPECS.pack(a_sec, a_usec * 1000, m_sec, m_usec * 1000)


# -- the calls, by name: how each one's arguments name the object --------------------------------

Handler = Callable[[_Caller, tuple[int, ...]], None]
CWD = _AT_FDCWD & 0xFFFFFFFF


def _follow(flags: int) -> bool:
    return not flags & _AT_SYMLINK_NOFOLLOW


def _empty(flags: int) -> bool:
    return bool(flags & _AT_EMPTY_PATH)


def _utimensat(c: _Caller, a: tuple[int, ...]) -> None:
    # A NULL path means the descriptor itself (futimens).
    fd = c.descriptor(a[0]) if a[1] == 0 else c.lookup(a[0], a[1], _follow(a[3]), _empty(a[3]))
    _utimens(c, fd, _timespecs(c, a[2]))


def _futimesat(c: _Caller, a: tuple[int, ...]) -> None:
    fd = c.descriptor(a[0]) if a[1] == 0 else c.lookup(a[0], a[1], True)
    _utimens(c, fd, _from_timevals(c, a[2]))


def _ioctl(c: _Caller, a: tuple[int, ...]) -> None:
    request = a[1] & 0xFFFFFFFF
    if request not in SUPERVISED_IOCTLS:
        raise OSError(errno.ENOTTY, "not supervised")
    fd = c.descriptor(a[0])
    argument = c.read(a[2], 28 if request == FS_IOC_FSSETXATTR else 4)
    c.may_change(fd)
    fcntl.ioctl(fd, request, argument)


def _connect(c: _Caller, a: tuple[int, ...]) -> None:
    sock = c.descriptor(a[0])
    length = a[2] & 0xFFFFFFFF
    if length > _SOCKADDR_MAX:
        raise OSError(errno.EINVAL, "address too long")
    address = c.read(a[1], length) if length else b""
    if len(address) > 2 and struct.unpack("=H", address[:2])[0] == socket.AF_UNIX \
            and address[2] != 0:  # a pathname socket (an abstract one starts with NUL)
        target = c.lookup_name(_AT_FDCWD, address[2:].split(b"\0", 1)[0], follow=True)
        place = place_of(target)
        if not stat.S_ISSOCK(os.fstat(target).st_mode) or place is None \
                or not c.places.may_connect(place):
            raise OSError(errno.ECONNREFUSED, "not one of the job's sockets")
        address = struct.pack("=H", socket.AF_UNIX) + b"/proc/self/fd/%d\0" % target
    libc.connect(sock, address)


_BY_NAME: dict[str, Handler] = {
    "chmod": lambda c, a: _chmod(c, c.lookup(CWD, a[0], True), a[1]),
    "fchmod": lambda c, a: _chmod(c, c.descriptor(a[0]), a[1]),
    "fchmodat": lambda c, a: _chmod(c, c.lookup(a[0], a[1], True), a[2]),
    "chown": lambda c, a: _chown(c, c.lookup(CWD, a[0], True), a[1], a[2]),
    "lchown": lambda c, a: _chown(c, c.lookup(CWD, a[0], False), a[1], a[2]),
    "fchown": lambda c, a: _chown(c, c.descriptor(a[0]), a[1], a[2]),
    "fchownat": lambda c, a: _chown(
        c, c.lookup(a[0], a[1], _follow(a[4]), _empty(a[4])), a[2], a[3]),
    "utime": lambda c, a: _utimens(c, c.lookup(CWD, a[0], True), _from_utimbuf(c, a[1])),
    "utimes": lambda c, a: _utimens(c, c.lookup(CWD, a[0], True), _from_timevals(c, a[1])),
    "futimesat": _futimesat,
    "utimensat": _utimensat,
    "setxattr": lambda c, a: _setxattr(c, c.lookup(CWD, a[0], True), *a[1:5]),
    "lsetxattr": lambda c, a: _setxattr(c, c.lookup(CWD, a[0], False), *a[1:5]),
    "fsetxattr": lambda c, a: _setxattr(c, c.descriptor(a[0]), *a[1:5]),
    "removexattr": lambda c, a: _removexattr(c, c.lookup(CWD, a[0], True), a[1]),
    "lremovexattr": lambda c, a: _removexattr(c, c.lookup(CWD, a[0], False), a[1]),
    "fremovexattr": lambda c, a: _removexattr(c, c.descriptor(a[0]), a[1]),
    "ioctl": _ioctl,
    "connect": _connect,
}


def _handlers() -> dict[int, Handler]:
    """The table by this architecture's numbers (names it lacks are left out)."""
    import seccomp  # type: ignore[import-not-found]

    table = {}
    for name, handler in _BY_NAME.items():
        with contextlib.suppress(ValueError, RuntimeError):
            number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
            if number >= 0:
                table[number] = handler
    return table

