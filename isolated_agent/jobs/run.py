"""`agentctl run`, as a library call: pick or create the env, check every input, lock the env,
and run the job in it. Never prints: what the user should hear goes through `notify`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from isolated_agent.engines import Engine, HostSide, engine_named, problems, select_engine
from isolated_agent.engines.copy import CopyEngine, Progress, recover
from isolated_agent.engines.filter.identity import start_time
from isolated_agent.engines.id_swap import id_swap_for
from isolated_agent.env.squash import KERNEL_DEPTH, squash_locked
from isolated_agent.env.store import Env, Store, is_within, show_host_root
from isolated_agent.errors import EnvNotFound, IsolationError, UsageError
from isolated_agent.jobs import registry
from isolated_agent.jobs.host_sockets import is_socket
from isolated_agent.jobs.launcher import Job, JobSpec, JoinTarget, run_job
from isolated_agent.jobs.sandbox import PRIVATE_DIRS, SandboxSpec
from isolated_agent.system.cgroup import Limits, delegate_limits, sweep_stale_groups

# Where coding agents and package managers keep state and caches: writable by default, so that an
# agent can log in, cache and remember. A missing directory is made for the job (a new user's
# first `npm install` must not fail on a read-only ~/.npm) and removed after it if the job left it
# empty; a missing file is skipped. --no-default-allows drops them all.
DEFAULT_ALLOWED_DIRS = ("~/.cache", "~/.npm", "~/.cargo/registry", "~/.claude", "~/.codex",
                        "~/.gemini")
DEFAULT_ALLOWED_FILES = ("~/.claude.json",)

DOCTOR_HINT = "`agentctl doctor` checks all this machine needs"


@dataclass
class RunRequest:
    argv: list[str]
    env_name: str | None = None
    roots: tuple[str, ...] = ()
    engine: str = "auto"
    allow: tuple[str, ...] = ()
    default_allows: bool = True
    keep_running: bool = False
    network: str = "host"  # or "none"
    allow_sockets: tuple[str, ...] = ()
    limits: Limits = Limits()


Notify = Callable[[str], None]


def resolve_env(store: Store, name: str | None, roots: tuple[str, ...], notify: Notify) -> Env:
    """The env a run (or a review command) means.

    --env NAME: that env, created over the given roots (default: the current directory) when it
    does not exist yet. No name: the one env that manages exactly these roots, or a new one;
    with no --root either, a directory inside a managed root means that root's env (as for
    diff and commit), so a run from `src/` works on the project's env, not on a second one.
    """
    if name is not None:
        try:
            env = store.get(name)
        except EnvNotFound:
            pass
        else:
            if roots and store.resolve_roots(list(roots)) != [r.path for r in env.roots]:
                managed = ", ".join(r.path for r in env.roots)
                raise UsageError(
                    f"env {env.name} manages {managed}; drop --root or pick another env"
                )
            return env
        env = store.create(name, store.resolve_roots(list(roots)))
        notify(f"created env {env.name} for {', '.join(r.path for r in env.roots)}")
        return env
    resolved = store.resolve_roots(list(roots))
    candidates = store.envs_for_roots(resolved)
    if not roots and not candidates:
        candidates = [e for e in store.list_envs()
                      if any(is_within(resolved[0], r.path) for r in e.roots)]
    if len(candidates) > 1:
        names = ", ".join(e.name for e in candidates)
        managed = ", ".join(resolved)
        raise UsageError(f"several envs manage {managed} ({names}); pick one with --env")
    if candidates and not roots and [r.path for r in candidates[0].roots] != resolved:
        notify(f"{resolved[0]} is inside env {candidates[0].name}'s root: using it")
    if candidates:
        return candidates[0]
    env = store.create(None, resolved)
    notify(f"created env {env.name} for {', '.join(resolved)}")
    return env


def resolve_allows(
    store: Store, env: Env, request: RunRequest, made: list[str] | None = None
) -> tuple[str, ...]:
    """The real paths the job may write to. Missing default directories are made, and
    appended to `made` (outermost first) for `remove_if_empty` after the job."""
    candidates = [(p, True) for p in request.allow]
    if request.default_allows:
        candidates += [(p, False) for p in (*DEFAULT_ALLOWED_DIRS, *DEFAULT_ALLOWED_FILES)]
    allows: list[str] = []
    for given, explicit in candidates:
        path = os.path.realpath(os.path.expanduser(given))
        if not os.path.exists(path):
            if explicit:
                raise UsageError(f"--allow {given}: no such file or directory")
            if given not in DEFAULT_ALLOWED_DIRS or made is None or not _make_dirs(path, made):
                continue
        if is_within(path, store.home):
            raise UsageError(f"--allow {given} is inside the store {store.home}; never allowed")
        for root in env.roots:
            if is_within(path, root.path):
                raise UsageError(
                    f"--allow {given} is inside the managed root {root.path}, "
                    "where writes already go to the env"
                )
        if path not in allows:
            allows.append(path)
    return tuple(allows)


def _make_dirs(path: str, made: list[str]) -> bool:
    """mkdir -p `path` (as the caller, with its umask), noting each directory made."""
    missing, ancestor = [], path
    while not os.path.lexists(ancestor):  # "/" always exists
        missing.append(ancestor)
        ancestor = os.path.dirname(ancestor)
    try:
        os.makedirs(path)
    except OSError:
        return False
    made.extend(reversed(missing))
    return True


def remove_if_empty(made: list[str]) -> None:
    """After the job: the directories `resolve_allows` made and the job left empty go."""
    for directory in reversed(made):
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def resolve_allowed_sockets(given: tuple[str, ...]) -> tuple[str, ...]:
    """--allow-socket paths: each must name an existing unix socket (the real path is kept)."""
    sockets = []
    for path in given:
        real = os.path.realpath(os.path.expanduser(path))
        if not is_socket(real):
            raise UsageError(f"--allow-socket {path}: not a unix socket (is its daemon running?)")
        sockets.append(real)
    return tuple(sockets)


def socket_hint(masked: list[str]) -> str:
    """What a user reads when a job failed while host sockets were covered: maybe it needed one."""
    shown = ", ".join(masked[:3]) + (f" and {len(masked) - 3} more" if len(masked) > 3 else "")
    return (f"the job could not connect to host sockets ({shown}); if it needed one, "
            "let it through with --allow-socket PATH")


def check_store_out_of_reach(store: Store, engine: Engine, sandbox: SandboxSpec) -> None:
    """Without namespaces the store cannot be hidden from the job, and the job may write where
    Landlock lets it: the store must not be there, or the job could rewrite its own env (and
    every other one) behind the engine's back."""
    from isolated_agent.jobs.confine import DEFAULT_WRITE_PATHS, SHARED_TMP

    shared = [p for p in DEFAULT_WRITE_PATHS
              if sandbox.private_tmp is None or p not in SHARED_TMP]
    for path in (*shared, *sandbox.allow):
        if is_within(store.home, path):
            raise IsolationError(
                f"{engine.name} engine", f"the store {store.home} is under {path}, which the "
                "job may write to", "keep the store elsewhere (ISOLATED_AGENT_HOME)")


def _job_spec(store: Store, env: Env, engine: Engine, request: RunRequest,
              allows: tuple[str, ...], rootless: bool) -> JobSpec:
    allow_sockets = resolve_allowed_sockets(request.allow_sockets)
    sandbox, variables = _view(store, env, engine, allows, allow_sockets)
    if not engine.namespaces:
        check_store_out_of_reach(store, engine, sandbox)
    return JobSpec(
        argv=list(request.argv),
        sandbox=sandbox,
        engine=engine,
        rootless=rootless,
        keep_running=request.keep_running,
        env=variables,
        cgroup_label=env.id,
        namespaces=engine.namespaces,
        network=request.network,
        limits=request.limits,
    )


def _view(store: Store, env: Env, engine: Engine, allows: tuple[str, ...],
          allow_sockets: tuple[str, ...]) -> tuple[SandboxSpec, dict[str, str]]:
    """What a job (or a command joining it) sees and may write, and its environment."""
    sandbox = _sandbox(store, env, allows, allow_sockets)
    variables = dict(os.environ, AGENTCTL_ENV=env.name)
    if isinstance(engine, CopyEngine):  # the job works in the clones, with a tmp of its own
        sandbox = replace(sandbox, roots=engine.job_roots(env),
                          cwd=engine.job_directory(env, sandbox.cwd),
                          private_tmp=engine.private_tmp(env))
        variables.update(PWD=sandbox.cwd, TMPDIR=engine.private_tmp(env))
    return sandbox, variables


def _sandbox(store: Store, env: Env, allows: tuple[str, ...],
             allow_sockets: tuple[str, ...]) -> SandboxSpec:
    staging = os.path.join(store.run_dir, "views", env.id)
    os.makedirs(staging, mode=0o700, exist_ok=True)
    cwd = os.getcwd()
    if any(is_within(cwd, hidden) for hidden in PRIVATE_DIRS) and not any(
        is_within(cwd, p) for p in [*(r.path for r in env.roots), *allows]
    ):
        cwd = env.roots[0].path  # the job's /tmp is its own: the caller's dir is not there
    return SandboxSpec(roots=env.roots, allow=allows, store=store.home, cwd=cwd,
                       staging=staging, allow_sockets=allow_sockets)


def _user_name(uid: int) -> str:
    with contextlib.suppress(KeyError):
        return pwd.getpwuid(uid).pw_name
    return f"uid {uid}"


def _squashed(store: Store, env: Env, notify: Notify) -> Env:
    """The env with its private layers merged into one (KERNEL_DEPTH), under its lock."""
    done = squash_locked(store, env)
    if done is not None:
        notify(f"squashed the {len(done.merged)} layers of env {env.name} into one: the kernel "
               f"engine reads stacks deeper than {KERNEL_DEPTH} slower")
    return store.get(env.id)


def _tell_copy(env: Env, engine: CopyEngine, notify: Notify) -> None:
    """Once per run: the copy engine does not show the project at its real path."""
    if engine.fallback_from is not None:
        notify(f"no engine but copy can run here ({engine.fallback_from.detail}; agentctl "
               "doctor tells why)")
    for root in env.roots:
        notify(f"copy engine: the job works in a copy of {root.path} at "
               f"{engine.clone_path(env, root)}, not at its real path; its changes go to "
               "the env when it ends")


def run(store: Store, request: RunRequest, notify: Notify,
        progress: Progress | None = None) -> int:
    if not request.argv:
        raise UsageError("no command given: agentctl run [OPTIONS] -- CMD [ARGS...]")
    sweep_stale_groups()
    if request.limits:
        try:
            delegate_limits(request.limits)
        except IsolationError as e:
            raise IsolationError(e.step, e.detail, f"{e.hint}; {DOCTOR_HINT}") from None
    rootless = os.geteuid() != 0
    try:
        engine = select_engine(request.engine, rootless, store)
    except IsolationError as e:  # this machine lacks something: doctor tells all of it
        hint = "; ".join(part for part in (e.hint, DOCTOR_HINT) if part)
        raise IsolationError(e.step, e.detail, hint) from None
    env = resolve_env(store, request.env_name, request.roots, notify)
    store.resolve_roots([r.path for r in env.roots])  # every root must still exist
    if engine.namespaces:  # the filter shows the host's root itself
        for root in env.roots:
            show_host_root(root)
            swap = id_swap_for(root.path)
            if swap is not None:
                owner = _user_name(swap.owner_uid)
                notify(f"{root.path} is {owner}'s: the job sees {owner}'s files as root's, and "
                       f"what it makes stays {owner}'s")
    made: list[str] = []
    allows = resolve_allows(store, env, request, made)
    try:
        with store.lock(env, purpose="run in it"):
            # Its stack as it is now that nobody else may change it: a rollback or checkpoint
            # may have come between resolving the env and taking its lock.
            env = store.get(env.id)
            if recover(env):  # whatever the engine now: nothing a job wrote is left behind
                notify("recorded the changes of a copy-engine run that could not record them")
            if engine.name == "kernel" and len(env.layers) > KERNEL_DEPTH:
                env = _squashed(store, env, notify)
            spec = _job_spec(store, env, engine, request, allows, rootless)
            notify(f"env {env.name}, {engine.name} engine")
            if isinstance(engine, CopyEngine):
                engine.progress = progress
                _tell_copy(env, engine, notify)
            with serving(engine, env, store.run_dir) as on_ready:
                started: list[Job] = []

                def ready(job: Job) -> None:
                    started.append(job)
                    on_ready(job)
                    with contextlib.suppress(OSError):  # ps and exec are not worth a job
                        registry.record(store.run_dir, _running(env, engine, spec, job))

                try:
                    status = run_job(spec, ready)
                finally:
                    registry.forget(store.run_dir, env.id)
        if status not in (0, 128 + signal.SIGINT) and started and started[0].masked_sockets:
            notify(socket_hint(started[0].masked_sockets))
        for line in problems(engine):
            notify(line)
        return status
    finally:
        remove_if_empty(made)


def _running(env: Env, engine: Engine, spec: JobSpec, job: Job) -> registry.RunningJob:
    init = registry.only_child(job.pid)
    return registry.RunningJob(
        env_id=env.id, env_name=env.name, engine=engine.name, namespaces=spec.namespaces,
        rootless=spec.rootless, network=spec.network, argv=spec.argv, started=time.time(),
        launcher_pid=os.getpid(), launcher_start=start_time(os.getpid()), pid=job.pid,
        init_pid=init if init is not None else job.pid,
        cgroup=job.cgroup.path if job.cgroup is not None else None,
        allow=list(spec.sandbox.allow), allow_sockets=list(spec.sandbox.allow_sockets))


def find_running_job(store: Store, env_name: str | None) -> registry.RunningJob:
    """The running job `agentctl exec` means: the one in env `env_name`; with no name, the one
    whose env manages the current directory, or the only one running."""
    jobs = registry.running(store.run_dir)
    if env_name is not None:
        env = store.get(env_name)  # EnvNotFound: the user mistyped
        for job in jobs:
            if job.env_id == env.id:
                return job
        raise UsageError(f"no job is running in env {env.name}; start one with agentctl run")
    if not jobs:
        raise UsageError("no job is running; start one with agentctl run")
    here = os.getcwd()
    mine = [j for j in jobs if any(is_within(here, r.path) for r in store.get(j.env_id).roots)]
    if len(mine) == 1 or len(jobs) == 1:
        return (mine or jobs)[0]
    names = ", ".join(j.env_name for j in (mine or jobs))
    raise UsageError(f"jobs run in several envs ({names}); name one: agentctl exec ENV -- CMD")


def exec_in_job(store: Store, env_name: str | None, argv: list[str], notify: Notify) -> int:
    """`agentctl exec`: run `argv` in the view of the job running in an env, confined as that
    job is (its namespaces, allows, sockets and network; its cgroup), beside it."""
    if not argv:
        raise UsageError("no command given: agentctl exec [ENV] -- CMD [ARGS...]")
    job = find_running_job(store, env_name)
    env = store.get(job.env_id)
    if (os.geteuid() != 0) != job.rootless:
        raise UsageError(f"the job in env {env.name} was started by another user; run exec "
                         "as that user")
    engine = engine_named(job.engine, store)
    sandbox, variables = _view(store, env, engine, tuple(job.allow), tuple(job.allow_sockets))
    spec = JobSpec(
        argv=list(argv), sandbox=sandbox, engine=engine, rootless=job.rootless, env=variables,
        namespaces=job.namespaces, network=job.network,
        join=JoinTarget(job.init_pid, job.cgroup))
    if registry.only_child(job.pid) != job.init_pid or not job.alive():
        raise IsolationError("joining the job", f"the job in env {env.name} has ended")
    notify(f"env {env.name}, in the {job.engine} engine's job {job.pid} ({' '.join(job.argv)})")
    if job.engine != "filter":  # the job's view exists: nothing to start
        return run_job(spec)
    with serving(engine, env, store.run_dir) as on_ready:  # the filter learns this process
        return run_job(spec, on_ready)


@contextmanager
def serving(engine: Engine, env: Env, log_dir: str) -> Iterator[Callable[[Job], None]]:
    """Run the engine's host side (if it has one) around a job; yield what the launcher calls
    once the job exists, before it is released."""
    if not isinstance(engine, HostSide):
        yield lambda job: None
        return

    def job_started(job: Job) -> None:
        engine.job_started(job.pid, job.cgroup.path if job.cgroup is not None else None)

    try:
        engine.start(env, log_dir)
        yield job_started
    finally:
        engine.stop()
