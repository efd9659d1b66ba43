"""Start a command inside an env, suspended until it is contained, then wait for it.

The processes, mirroring the seed's launcher (create suspended → job → register → resume):

    launcher (agentctl, host)          holds the env lock, the cgroup, forwards signals
     └─ A  "unshare"                   new user (when not root), mount, pid and IPC namespaces
         └─ B  pid 1 of the job        builds the view (sandbox.py), then is the job's init
             └─ C  the command          drops every capability, sets no_new_privs, waits to be
                                        released, then execs CMD

Containment: A and B die with their parent (PR_SET_PDEATHSIG), and when B, the pid namespace's
init, exits the kernel kills every process left in the namespace — daemons included. So killing
the launcher, even with SIGKILL, ends the whole job and its mounts, which only ever existed in
the job's own mount namespace. When a writable cgroup v2 subtree exists the job is also put in
its own group (killed and removed at the end); otherwise the launcher is a child subreaper.

Without namespaces (`JobSpec.namespaces=False`, the filter engine: the view is a filter mount
on the host, and the daemon tells the job's processes apart by identity, not by namespace):

    launcher (agentctl, host)
     └─ A                              nothing to unshare; the job's anchor (`Job.pid`)
         └─ B  the job's keeper        a child subreaper: every orphan of the job lands here
             └─ C  the command          as above, then confined by Landlock (confine.py), then
                                        released; changes to the caller's directory; execs CMD

B stands in for the pid namespace: when the command exits it kills every process left below
it (all of them are, being a subreaper), and when A dies (the launcher was killed, A with it)
a catchable death signal makes B kill them all before it exits.

The command runs in a session of its own, never in the caller's: on a pty of its own when the
caller has a terminal, relayed by the launcher (terminal.py). A starts a new session too, so the
terminal's Ctrl-C (when the caller's terminal is not relayed) reaches only the launcher, which
passes it down to the command's process group exactly once. Before exec, C also gets a fresh
session keyring and the seccomp baseline (syscall_filter.py), on every engine.

Messages from A, B and C travel to the launcher on one pipe, one JSON object per line; C's copy
closes on a successful exec, so end-of-file after "ready" means the command is running.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from isolated_agent.engines import Engine
from isolated_agent.env.store import is_within
from isolated_agent.errors import (
    CommandNotExecutable,
    CommandNotFound,
    IsolationError,
)
from isolated_agent.jobs.confine import confine_job, scope_job
from isolated_agent.jobs.sandbox import PRIVATE_DIRS, SandboxSpec, build_view
from isolated_agent.jobs.syscall_filter import install_baseline, install_supervised
from isolated_agent.jobs.terminal import JobTerminal
from isolated_agent.system import libc
from isolated_agent.system.cgroup import JobCgroup, Limits

if TYPE_CHECKING:
    from isolated_agent.jobs import supervisor

EXIT_SETUP_FAILED = 125
_FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGQUIT)


@dataclass(frozen=True)
class JoinTarget:
    """A running job that a new command joins (`agentctl exec`): instead of making namespaces
    and a view, A enters those of the job's init (B), and the command runs beside the job in
    its view, confined as the job is; it joins the job's cgroup, which stays the job's."""

    init_pid: int
    cgroup: str | None


# The namespaces a joining command enters, owner first (the user namespace gives the rights to
# enter the others), pid last (it applies to the children made after it).
_JOINED_NAMESPACES = ("user", "mnt", "ipc", "net", "pid")


@dataclass
class JobSpec:
    argv: list[str]
    sandbox: SandboxSpec
    engine: Engine
    rootless: bool
    keep_running: bool = False
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    cgroup_label: str = "job"
    # False: no namespaces, no view built here; the job is confined by Landlock and kept by a
    # subreaper instead (the filter engine). The engine's mount_root is then never called.
    namespaces: bool = True
    # "none": a network namespace of the job's own, with only its loopback interface.
    network: str = "host"
    # Set on the job's cgroup; a limit that cannot be set refuses the job (IsolationError).
    limits: Limits = field(default_factory=Limits)
    # Set: join this running job instead of making a new one (see JoinTarget).
    join: JoinTarget | None = None


@dataclass
class Job:
    """What the launcher knows of a running job; handed to `on_ready` before release."""

    pid: int  # A, the job's outermost process, on the host
    cgroup: JobCgroup | None
    masked_sockets: list[str] = field(default_factory=list)  # host sockets its view covers


def run_job(spec: JobSpec, on_ready: Callable[[Job], None] = lambda job: None) -> int:
    """Run the job to completion and return its exit status (128+N for a signal N).

    Raises IsolationError (the command never ran), CommandNotFound or CommandNotExecutable.
    """
    messages_r, messages_w = os.pipe()
    release_r, release_w = os.pipe()
    if spec.join is not None:
        cgroup = JobCgroup(spec.join.cgroup) if spec.join.cgroup else None
    else:
        cgroup = JobCgroup.create(spec.cgroup_label, spec.limits)
    if cgroup is None:
        libc.set_child_subreaper()
    launcher_pid = os.getpid()
    terminal = JobTerminal.open()
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in _TERMINAL_SIGNALS}
    pid = os.fork()
    if pid == 0:
        os.close(messages_r)
        os.close(release_w)
        _child_main(_process_a, spec, terminal, launcher_pid, messages_w, release_r)
    os.close(messages_w)
    os.close(release_r)
    job = Job(pid, cgroup)
    forward = _forward_to(pid)
    previous = {s: signal.signal(s, forward) for s in (*_FORWARDED_SIGNALS, *_TERMINAL_SIGNALS)}
    terminal.start()
    status: int | None = None
    try:
        if cgroup is not None:
            try:
                cgroup.add(pid)
            except OSError as e:
                raise IsolationError("cgroup job", f"{cgroup.path}: {e.strerror}") from e
        os.write(release_w, b"1")  # A: you are in the job, go on

        def release_command() -> None:
            on_ready(job)
            os.write(release_w, b"2")  # C: everything is in place, exec

        failure = _read_messages(messages_r, job, release_command, spec)
        status = _wait_status(pid)
        if failure is not None:
            raise failure
        return status
    finally:
        os.close(messages_r)
        os.close(release_w)
        if status is None:  # we are leaving early: A must not outlive us (nor stay a zombie)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if cgroup is not None and spec.join is None:  # a joined group is the job's
            cgroup.kill_and_remove()
        _reap_all()
        terminal.finish()
        for s, handler in {**previous, **saved}.items():
            signal.signal(s, handler)


def _read_messages(
    fd: int, job: Job, release: Callable[[], object], spec: JobSpec
) -> Exception | None:
    failure: Exception | None = None
    with os.fdopen(os.dup(fd), "rb") as stream:
        for line in stream:
            message = json.loads(line)
            kind = message["kind"]
            if kind == "ready":
                release()
            elif kind == "masked_sockets":
                job.masked_sockets = list(message["paths"])
            elif kind == "setup_failed":
                hint = message.get("hint", "")
                failure = IsolationError(message["step"], message["detail"], hint)
            elif kind == "exec_failed":
                failure = _exec_error(message["argv0"], message["errno"], spec)
    return failure


def _exec_error(argv0: str, err: int, spec: JobSpec) -> Exception:
    if err == errno.ENOENT:
        hidden = _in_private_dir(argv0, spec) if spec.namespaces else None
        if hidden is not None:
            return CommandNotFound(
                f"{argv0}: command not found inside the env: the job's /tmp and /dev/shm are "
                f"its own, so {hidden} is not there; install it elsewhere, or pass "
                f"--allow {os.path.dirname(hidden)}")
        return CommandNotFound(f"{argv0}: command not found inside the env")
    return CommandNotExecutable(f"{argv0}: cannot run it: {os.strerror(err)}")


def _in_private_dir(argv0: str, spec: JobSpec) -> str | None:
    """The host program `argv0` names (as the job's PATH finds it), if it lies in a directory
    the job sees private and empty."""
    found = argv0 if "/" in argv0 else shutil.which(argv0, path=spec.env.get("PATH"))
    if found is None:
        return None
    path = os.path.abspath(os.path.join(spec.sandbox.cwd, found))
    if any(is_within(path, private) for private in PRIVATE_DIRS) and os.path.exists(path):
        return path
    return None


def _forward_to(pid: int) -> Callable[[int, object], None]:
    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    return forward


def _wait_status(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return _exit_code(status)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _reap_all() -> None:
    """As subreaper, collect anything that was reparented to us."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


# -- inside the job -------------------------------------------------------------------------


def _child_main(body: Callable[..., int], *args: object) -> None:
    """Run `body` in a forked child and never return: the child must not unwind into the
    launcher's stack (its finally clauses, atexit handlers, buffered stdio)."""
    code = EXIT_SETUP_FAILED
    try:
        code = body(*args)
    except BaseException as e:  # noqa: BLE001 - a bug: say so, never fall through to the caller
        with contextlib.suppress(BaseException):
            os.write(2, f"agentctl: internal error while starting the job: {e!r}\n".encode())
    finally:
        os._exit(code)


def _send(fd: int, **message: object) -> None:
    os.write(fd, (json.dumps(message) + "\n").encode())


def _process_a(
    spec: JobSpec, terminal: JobTerminal, launcher_pid: int, messages: int, release: int
) -> int:
    libc.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != launcher_pid:
        return EXIT_SETUP_FAILED  # the launcher died before we could arm the death signal
    os.setsid()  # out of the caller's session: the terminal's signals go to the launcher only
    terminal.close_in_child()
    if os.read(release, 1) != b"1":
        return EXIT_SETUP_FAILED
    uid, gid = os.getuid(), os.getgid()
    try:
        if spec.join is not None:
            _enter_namespaces_of(spec.join.init_pid)
            return _fork_and_wait(_process_b, spec, terminal, messages, release)
        if not spec.namespaces:
            if spec.network == "none":  # a network namespace alone; a user's needs a user
                # namespace to own it, where the user stays itself (uid and gid mapped to
                # themselves: its own FUSE mount, files and processes are still its own)
                _unshare(libc.CLONE_NEWNET | libc.CLONE_NEWUSER,
                         "--network none: creating a network namespace",
                         "enable user namespaces (sysctl user.max_user_namespaces), or run "
                         "without --network none")
                _map_ids(uid, gid)
                _bring_up_loopback()
            return _fork_and_wait(_process_b, spec, terminal, messages, release)
        flags = libc.CLONE_NEWNS | libc.CLONE_NEWPID | libc.CLONE_NEWIPC
        if spec.rootless:
            flags |= libc.CLONE_NEWUSER
        if spec.network == "none":
            flags |= libc.CLONE_NEWNET
        _unshare(flags, "creating namespaces")
        if spec.rootless:
            _map_ids(uid, gid)
    except IsolationError as e:
        _send(messages, kind="setup_failed", step=e.step, detail=e.detail, hint=e.hint)
        return EXIT_SETUP_FAILED
    return _fork_and_wait(_process_b, spec, terminal, messages, release)


def _enter_namespaces_of(pid: int) -> None:
    """Enter each namespace of `pid` that is not already ours."""
    opened: list[int] = []
    try:
        for kind in _JOINED_NAMESPACES:
            theirs, ours = f"/proc/{pid}/ns/{kind}", f"/proc/self/ns/{kind}"
            if os.stat(theirs).st_ino != os.stat(ours).st_ino:
                opened.append(os.open(theirs, os.O_RDONLY | os.O_CLOEXEC))
        for fd in opened:
            libc.setns(fd)
    except OSError as e:
        raise IsolationError("joining the job's namespaces", os.strerror(e.errno or 0),
                             "is the job still running? (agentctl ps)") from e
    finally:
        for fd in opened:
            os.close(fd)


def _unshare(flags: int, step: str, hint: str = "run as root, or enable user namespaces "
             "(sysctl user.max_user_namespaces)") -> None:
    try:
        libc.unshare(flags)
    except OSError as e:
        raise IsolationError(step, os.strerror(e.errno or 0), hint) from e


def _bring_up_loopback() -> None:
    try:
        libc.bring_up_loopback()
    except OSError as e:
        raise IsolationError("--network none: loopback", os.strerror(e.errno or 0)) from e


def _fork_and_wait(
    body: Callable[..., int], spec: JobSpec, terminal: JobTerminal, messages: int, release: int
) -> int:
    _install_forwarding()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        _child_main(body, spec, terminal, messages, release, parent)
    os.close(messages)
    os.close(release)
    _CHILD[0] = pid
    return _wait_status(pid)


def _map_ids(uid: int, gid: int) -> None:
    """Map our own uid and gid into the new user namespace, to themselves: the job runs as the
    user it was started by, with no capabilities once it execs."""
    try:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1\n")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1\n")
    except OSError as e:
        raise IsolationError("user namespace id mapping", os.strerror(e.errno or 0)) from e


def _process_b(
    spec: JobSpec, terminal: JobTerminal, messages: int, release: int, parent: int
) -> int:
    """pid 1 of the job's pid namespace: build the view, start C, then be the init. Without
    namespaces: the job's keeper, which kills what the command leaves behind."""
    if not spec.namespaces:
        return _keeper(spec, terminal, messages, release, parent)
    libc.set_parent_death_signal(signal.SIGKILL)
    if spec.join is not None:  # the job's view is there: go to the caller's place in it
        if not _enter_working_directory(spec, messages):
            return EXIT_SETUP_FAILED
        return _run_command(spec, terminal, messages, release)
    try:
        if spec.network == "none":
            _bring_up_loopback()
        masked = build_view(spec.sandbox, spec.engine)
    except IsolationError as e:
        _send(messages, kind="setup_failed", step=e.step, detail=e.detail, hint=e.hint)
        return EXIT_SETUP_FAILED
    _send(messages, kind="masked_sockets", paths=masked)
    # Returning ends the pid namespace: the kernel kills the rest.
    return _run_command(spec, terminal, messages, release)


def _run_command(
    spec: JobSpec, terminal: JobTerminal, messages: int, release: int,
    supervised: tuple[supervisor.Handover, supervisor.Places] | None = None,
) -> int:
    """Start C and reap every orphan as it dies until the command itself exits (then, with
    --keep-running, until the daemons it left behind exit too); return its status. With
    `supervised` (no namespaces), also serve the command's supervised calls (supervisor.py)."""
    handover = supervised[0] if supervised else None
    pid = os.fork()
    if pid == 0:
        _child_main(_process_c, spec, terminal, messages, release, handover)
    if supervised is not None:
        from isolated_agent.jobs.supervisor import start

        try:
            start(*supervised, stop_job=_stop_keeper)
        except IsolationError as e:
            _send(messages, kind="setup_failed", step=e.step, detail=e.detail, hint=e.hint)
            os.kill(pid, signal.SIGKILL)
    os.close(messages)
    os.close(release)
    terminal.close_slave()
    _CHILD[0] = pid
    while True:
        reaped, raw_status = os.wait()
        if reaped == pid:
            break
    if spec.keep_running:
        with contextlib.suppress(ChildProcessError):
            while True:
                os.wait()
    return _exit_code(raw_status)


# B's death signal without namespaces: catchable, so that B can kill the job before it dies, and
# one that nobody forwards (the job cannot signal B at all: Landlock scopes its signals).
_KEEPER_DEATH_SIGNAL = signal.SIGRTMIN


def _keeper(
    spec: JobSpec, terminal: JobTerminal, messages: int, release: int, parent: int
) -> int:
    """B without namespaces: a child subreaper holding the whole job below it. It reaps orphans
    while the command runs and kills every process left when the command exits, or when A dies
    (the launcher was killed), so no job process outlives the job's containment."""

    def parent_died(signum: int, frame: object) -> None:
        _kill_descendants()
        os._exit(128 + signal.SIGKILL)

    signal.signal(_KEEPER_DEATH_SIGNAL, parent_died)
    libc.set_parent_death_signal(_KEEPER_DEATH_SIGNAL)
    if os.getppid() != parent:  # A died before the death signal was armed
        return EXIT_SETUP_FAILED
    try:
        libc.set_child_subreaper()
    except OSError as e:
        _send(messages, kind="setup_failed", step="child subreaper", detail=str(e))
        return EXIT_SETUP_FAILED
    # Decided before the command exists, while the keeper may still read every process's
    # network namespace: which host sockets were bound when the job started.
    from isolated_agent.jobs.supervisor import Handover, Places, enter_job_domain

    sandbox = spec.sandbox
    private = (sandbox.private_tmp,) if sandbox.private_tmp else ()
    places = Places.for_job([root.path for root in sandbox.roots], (*sandbox.allow, *private),
                            sandbox.allow_sockets, shared_tmp=not private)
    _send(messages, kind="masked_sockets", paths=places.refused_host_sockets())
    try:
        enter_job_domain()
    except IsolationError as e:
        _send(messages, kind="setup_failed", step=e.step, detail=e.detail, hint=e.hint)
        return EXIT_SETUP_FAILED
    try:
        return _run_command(spec, terminal, messages, release, (Handover(), places))
    finally:
        _kill_descendants()


def _stop_keeper() -> None:
    """From any thread of the keeper: end the job as if its launcher had died."""
    os.kill(os.getpid(), _KEEPER_DEATH_SIGNAL)


def _kill_descendants() -> None:
    """SIGKILL every process below us, until none is left. As a subreaper we inherit each
    orphan, so whatever a dying process forked meanwhile shows up as our child next round."""
    me = os.getpid()
    while True:
        direct = children(me)
        if not direct:
            return
        pending = list(direct)
        while pending:
            pid = pending.pop()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # before reading its children: it forks no more
            pending.extend(children(pid))
        for child in direct:  # killed: each wait ends soon; its orphans come to us
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, 0)


def children(pid: int) -> list[int]:
    """The children of every thread of `pid` (empty when it is gone)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(child) for child in f.read().split())
        except OSError:
            continue
    return found


def _process_c(
    spec: JobSpec, terminal: JobTerminal, messages: int, release: int,
    handover: supervisor.Handover | None,
) -> int:
    for signum in range(1, signal.NSIG):  # the command starts with default dispositions
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    try:
        terminal.attach_job()
    except OSError as e:
        _send(messages, kind="setup_failed", step="the job's terminal", detail=str(e))
        return EXIT_SETUP_FAILED
    try:
        libc.join_new_session_keyring()
        libc.drop_all_capabilities()
        libc.set_no_new_privs()
    except OSError as e:
        _send(messages, kind="setup_failed", step="dropping privileges", detail=str(e))
        return EXIT_SETUP_FAILED
    _close_inherited_fds(keep=(messages, release))
    try:
        if spec.namespaces:
            scope_job()
        else:
            sandbox = spec.sandbox
            confine_job([*(root.path for root in sandbox.roots), *sandbox.allow,
                         *([sandbox.private_tmp] if sandbox.private_tmp else [])],
                        shared_tmp=sandbox.private_tmp is None, unread=(sandbox.store,))
        install_baseline()
        if handover is not None:  # last: from here on these calls wait for the keeper
            listener = install_supervised()
            handover.send(listener)
            os.close(listener)
    except IsolationError as e:
        _send(messages, kind="setup_failed", step=e.step, detail=e.detail, hint=e.hint)
        return EXIT_SETUP_FAILED
    _send(messages, kind="ready")
    if os.read(release, 1) != b"2":  # the launcher died or gave up: never run the command
        return EXIT_SETUP_FAILED
    # Only now, registered with the filter: the path is looked up in the job's own view.
    if not spec.namespaces and not _enter_working_directory(spec, messages):
        return EXIT_SETUP_FAILED
    try:
        os.execvpe(spec.argv[0], spec.argv, spec.env)
    except OSError as e:
        _send(messages, kind="exec_failed", argv0=spec.argv[0], errno=e.errno)
        return 127 if e.errno == errno.ENOENT else 126
    return EXIT_SETUP_FAILED  # not reached


def _enter_working_directory(spec: JobSpec, messages: int) -> bool:
    try:
        os.chdir(spec.sandbox.cwd)
    except OSError as e:
        step = f"working directory {spec.sandbox.cwd}"
        _send(messages, kind="setup_failed", step=step, detail=os.strerror(e.errno or 0))
        return False
    return True


def _close_inherited_fds(keep: tuple[int, ...]) -> None:
    """The command gets stdin, stdout and stderr, nothing else of ours or our caller's."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


# The pid a forwarding handler in A or B passes signals on to (set once it exists).
_CHILD = [0]


def _install_forwarding() -> None:
    """A and B pass every forwarded signal on to their child. The terminal's signals go to
    the command's whole process group, as a terminal would send them (C leads its own)."""

    def forward(signum: int, frame: object) -> None:
        child = _CHILD[0]
        if not child:
            return
        with contextlib.suppress(ProcessLookupError):
            if signum in _TERMINAL_SIGNALS:
                try:
                    os.killpg(child, signum)
                    return
                except ProcessLookupError:  # not (yet) leading a group of its own
                    pass
            os.kill(child, signum)

    for s in (*_FORWARDED_SIGNALS, *_TERMINAL_SIGNALS):
        signal.signal(s, forward)
