"""`agentctl commit`: apply an env's changes to the host — backed up first, crash-safe.

Steps, under the env's lock (so never while a job runs in the env: its `agentctl run` holds the
lock for the job's whole life, and commit refuses at once):

1. finish any commit of this env that was interrupted (journal.py);
2. read the changeset of the selected paths, plus the added or retyped directories on the way to
   them (a file cannot land in a directory the host lacks);
3. conflicts: refuse, listing them, when the host changed a path after the env took it over
   (`--force` applies anyway — the host's version is still backed up);
4. plan: removals deepest first, then puts parents first, each a self-checking operation;
5. journal the plan (durable), back up every host entry the plan replaces or removes (blobs and
   events durable), mark the journal — if the backup fails, nothing on the host was touched and
   the plan is forgotten;
6. apply the operations, flush the host's filesystems, mark the journal;
7. prune: what was committed leaves the env's layers; the env's view stays the same; remove the
   journal.

Privileges: by default no file reaches the host setuid, setgid or with file capabilities — a
job could otherwise plant a root-owned setuid program with `chmod 4755` (apply.py says how every
way to the host clears them). This holds for a host file that had them already and that the env
replaced: commit cannot tell a project's own setuid helper from a planted one, so it clears, and
reports every such path (`CommitResult.privileged`). `keep_privileges` (`--keep-setuid`) keeps
them. Directories keep setgid: it only makes new entries inherit the directory's group.

Paths longer than PATH_MAX (a job can build such a tree) go through the same steps: the changeset,
apply and prune, `backup.capture` and the store's `adopt` reach them through directory fds
(isolated_agent/system/fdpath.py), and the journal names them whole.

Conflict detection costs nothing at run time. Every change carries the upper entry that made it
(`Change.seen_from`); overlayfs creates that entry when the env first takes the path over — the
copy-up on the first write, the create, the whiteout of a delete — so its birth time (statx
`stx_btime`) is when the env last saw the host's version. A host entry whose ctime (which every
change of content, mode, owner, links or name moves forward, and which user space cannot set) is
later than that was changed by the host afterwards: a conflict. Where the layer's filesystem
records no birth time, the env's creation time stands in: earlier than any copy-up, so it can
only report more conflicts, never fewer. Not caught: a host change made after the job *read* a
file but before it first wrote it (nothing records reads), and a host file deleted after the env
modified it (the commit brings the env's version back, losing nothing).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from isolated_agent.backup import Backups
from isolated_agent.backup.capture import capture
from isolated_agent.env.apply import LINK, PUT, REMOVE, Applier, Op
from isolated_agent.env.changeset import (
    ADDED,
    DELETED,
    MODIFIED,
    Change,
    Changeset,
    Entry,
    read_changeset,
)
from isolated_agent.env.journal import APPLIED, BACKED_UP, Journal, journal_path, pending_env_ids
from isolated_agent.env.prune import prune
from isolated_agent.env.selection import Selection
from isolated_agent.env.store import Env, Store
from isolated_agent.errors import (
    AgentctlError,
    BackupError,
    CommitConflict,
    EnvBusy,
    EnvNotFound,
)
from isolated_agent.overlay.format import is_opaque_dir, taken_time_ns
from isolated_agent.system import fdpath, libc

Progress = Callable[[str, int, int], None]  # (phase, done, total)
Notify = Callable[[str], None]
_REPORT_EVERY = 64


@dataclass(frozen=True)
class Conflict:
    change: Change
    host_changed_ns: int  # the host entry's ctime
    env_saw_ns: int  # when the env took the path over


@dataclass(frozen=True)
class Privileged:
    change: Change
    privileges: tuple[str, ...]  # what the env's entry has: setuid, setgid, capabilities
    host_had: tuple[str, ...]  # what the host's entry it replaces has


@dataclass
class CommitResult:
    env: str
    commit_id: str | None = None
    changes: list[Change] = field(default_factory=list)  # what is (or would be) committed
    conflicts: list[Conflict] = field(default_factory=list)
    backed_up: int = 0
    backup_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    dry_run: bool = False
    resumed: bool = False
    rolled_back: bool = False
    # Entries that would make the host privileged (kept only with keep_privileges).
    privileged: list[Privileged] = field(default_factory=list)
    keep_privileges: bool = False

    def counts(self) -> dict[str, int]:
        result = {ADDED: 0, MODIFIED: 0, "T": 0, DELETED: 0}
        for change in self.changes:
            result[change.status] += 1
        return result


def commit(
    store: Store,
    env: Env,
    selection: Selection,
    *,
    force: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    notify: Notify | None = None,
    keep_privileges: bool = False,
) -> CommitResult:
    with store.lock(env, purpose="commit it"):
        earlier = _resume_locked(store, env, progress)
        if earlier is not None and notify is not None:
            notify(describe_recovery(earlier))
        changeset = read_changeset(env, selection)
        changes = _with_needed_dirs(changeset)
        result = CommitResult(env.name, changes=changes, dry_run=dry_run,
                              keep_privileges=keep_privileges)
        result.conflicts = find_conflicts(env, changes)
        result.privileged = find_privileged(changes)
        if dry_run:
            return result
        if not changes:
            # Nothing differs from the host: entries that ended identical to it (a touch, a
            # rewrite with the same bytes) are dropped; the env's view stays the same.
            prune(env, selection, set(), set(), [])
            return result
        if result.conflicts and not force:
            shown = [os.fsdecode(c.change.old.path if c.change.old else c.change.rel)
                     for c in result.conflicts]
            raise CommitConflict(
                f"{len(result.conflicts)} path(s) changed on the host after the env changed "
                "them; nothing was committed — review them with `agentctl diff`, then commit "
                "with --force to overwrite the host's version (it is backed up first)",
                shown,
            )
        commit_id = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)
        result.commit_id = commit_id
        backups = Backups.of_store(store.home)
        try:
            ops = build_ops(env, changeset, changes, os.stat(backups.local.blob_dir).st_dev,
                            keep_privileges=keep_privileges)
        except BaseException:
            backups.close()
            raise
        plan = {
            "format": 1,
            "commit_id": commit_id,
            "env_id": env.id,
            "env_name": env.name,
            "created": time.time(),
            "selection": None if selection.prefixes is None else [
                [root, os.fsdecode(rel)] for root, rel in selection.prefixes
            ],
            "ops": [op.to_json() for op in ops],
        }
        try:
            journal = Journal.create(journal_path(env.dir), plan)
        except BaseException:
            backups.close()
            raise
        try:
            stash = _back_up(backups, env, commit_id, ops, result, progress)
        except BaseException:
            backups.catalog.remove_commit(commit_id)
            journal.remove()
            backups.close()
            raise
        journal.mark(BACKED_UP, stash=stash)
        try:
            _finish(env, journal, backups, ops, resume=False, result=result, progress=progress)
        finally:
            backups.close()
        return result


def find_conflicts(env: Env, changes: list[Change]) -> list[Conflict]:
    """Changes whose host entry changed after the env took the path over (see the module)."""
    fallback = int(env.created * 1_000_000_000)
    seen_cache: dict[bytes, int] = {}
    conflicts: list[Conflict] = []
    for change in changes:
        if change.old is None:
            continue
        seen = seen_cache.get(change.seen_from)
        if seen is None:
            seen = taken_time_ns(change.seen_from) or fallback
            seen_cache[change.seen_from] = seen
        if change.old.ctime_ns > seen:
            conflicts.append(Conflict(change, change.old.ctime_ns, seen))
    return conflicts


def find_privileged(changes: list[Change]) -> list[Privileged]:
    """The changes that would give the host a setuid, setgid or capable file."""
    found: list[Privileged] = []
    for change in changes:
        privileges = change.privileges()
        if privileges:
            host_had = () if change.old is None else change.old.privileges()
            found.append(Privileged(change, privileges, host_had))
    return found


def _with_needed_dirs(changeset: Changeset) -> list[Change]:
    """The selected changes plus the added or retyped directories leading to them."""
    wanted = {(c.root, c.rel): c for c in changeset.changes}
    dirs = {(c.root, c.rel): c for c in changeset.context
            if c.new is not None and c.new.is_dir and c.status != MODIFIED}
    for change in changeset.changes:
        parts = change.rel.split(b"/")
        for depth in range(1, len(parts)):
            key = (change.root, b"/".join(parts[:depth]))
            if key in dirs:
                wanted[key] = dirs[key]
    return [wanted[key] for key in sorted(wanted)]


# -- the plan -----------------------------------------------------------------------------------


def build_ops(
    env: Env, changeset: Changeset, changes: list[Change], store_dev: int | None = None,
    *, keep_privileges: bool = False,
) -> list[Op]:
    """The operations that make the host what the env shows. `store_dev`: the device of the
    backup store; host files on it can be moved into the store instead of copied.
    `keep_privileges`: carry setuid/setgid bits and file capabilities to the host."""
    hosts = {root.index: os.fsencode(root.path) for root in env.roots}
    uppers = {root.index: os.fsencode(root.upper) for root in env.roots}
    layered = {root.index: bool(root.layers) for root in env.roots}
    root_devs = {root.index: os.stat(root.path).st_dev for root in env.roots}
    selection = changeset.selection
    opaque_cache: dict[bytes, bool] = {}

    def host_of(change: Change) -> bytes:
        return hosts[change.root] + b"/" + change.rel

    def movable(change: Change, new: Entry) -> bool:
        # A file can leave the layer by rename (no copy) when nothing else in the env links to
        # it, it is on the host's filesystem, and every opaque directory above it goes in this
        # commit as a whole (so prune can lift the mark and the file stays in the env's view).
        # An env with frozen layers copies: a frozen layer never changes, and taking a file out
        # of the upper would show the one beneath it (prune leaves such roots alone).
        if new.nlink != 1 or new.dev != root_devs[change.root] or layered[change.root]:
            return False
        parts = change.rel.split(b"/")
        for depth in range(1, len(parts)):
            ancestor = b"/".join(parts[:depth])
            upper_dir = uppers[change.root] + b"/" + ancestor
            if upper_dir not in opaque_cache:
                with fdpath.xattr_path(upper_dir) as short:
                    opaque_cache[upper_dir] = is_opaque_dir(short)
            if opaque_cache[upper_dir] and not selection.matches(change.root, ancestor):
                return False
        return True

    removals: list[Op] = []
    puts: list[Op] = []

    def stashable(old: Entry) -> bool:
        return old.kind == "file" and old.nlink == 1 and old.dev == store_dev

    def remove(change: Change, old: Entry) -> None:
        removals.append(Op(0, REMOVE, change.root, change.rel, host_of(change), old.kind,
                           identity_of(old), backup=True, stash=stashable(old)))

    def put(change: Change, new: Entry, old: Entry | None) -> None:
        op = Op(0, PUT, change.root, change.rel, host_of(change), new.kind,
                identity_of(old) if old is not None else None,
                backup=old is not None and not old.is_dir, source=new.path,
                mode=new.mode, uid=new.uid, gid=new.gid, atime_ns=new.atime_ns,
                mtime_ns=new.mtime_ns, rdev=new.rdev, source_ino=new.ino,
                keep_privileges=keep_privileges)
        op.move = new.kind == "file" and movable(change, new)
        op.stash = op.backup and old is not None and stashable(old)
        puts.append(op)

    for change in changes:
        old, new = change.old, change.new
        if change.status == DELETED:
            assert old is not None
            remove(change, old)
            continue
        assert new is not None
        if old is not None and old.is_dir != new.is_dir:
            remove(change, old)  # a type change across dir/non-dir: out first, then in
            put(change, new, None)
        else:
            put(change, new, old)

    removals.sort(key=lambda op: (op.root, op.rel), reverse=True)  # children before parents
    puts.sort(key=lambda op: (op.root, op.rel))  # parents before children
    _link_hard_links(puts, changeset, hosts, keep_privileges)
    ops = removals + puts
    for index, op in enumerate(ops):
        op.index = index
    return ops


def identity_of(entry: Entry) -> tuple[int, int, int]:
    return (entry.ino, entry.ctime_ns, entry.mode)


def _link_hard_links(
    puts: list[Op], changeset: Changeset, hosts: dict[int, bytes], keep_privileges: bool
) -> None:
    """Names the env linked together become hard links on the host too. The anchor is a host
    file that already has the content (an unchanged name of the same inode) or the first of the
    group to be written; the others are links to it. An unchanged host file that is privileged
    is no anchor unless privileges are kept: a new name of it would be a new privileged path
    (the group's first name is written, cleared, instead)."""
    groups: dict[tuple[int, int], list[Op]] = {}
    by_source: dict[bytes, Entry] = {
        c.new.path: c.new for c in changeset.changes + changeset.context if c.new is not None
    }
    for op in puts:
        entry = by_source.get(op.source or b"")
        if op.kind == "file" and entry is not None and entry.nlink > 1:
            groups.setdefault((entry.dev, entry.ino), []).append(op)
    for key, members in groups.items():
        unchanged = changeset.unchanged_links.get(key)
        if unchanged and not keep_privileges and by_source[members[0].source or b""].privileges():
            unchanged = None
        if unchanged:
            root, rel = unchanged[0]
            anchor = hosts[root] + b"/" + rel
            linked = members
        elif len(members) > 1:
            anchor = members[0].host
            linked = members[1:]
        else:
            continue
        for op in linked:
            op.action = LINK
            op.link_to = anchor
            op.move = False
            op.stash = False
        for op in members:
            op.move = False


# -- backing up, applying, finishing ------------------------------------------------------------


def _back_up(
    backups: Backups, env: Env, commit_id: str, ops: list[Op], result: CommitResult,
    progress: Progress | None,
) -> dict[int, str]:
    """Back up every host entry the ops replace or delete; returns the ops whose old file is
    only hashed and goes into the store itself when the op runs (op index -> sha256)."""
    paths = [op.host for op in ops if op.backup]
    adoptable = {op.host for op in ops if op.stash}
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None and (done % _REPORT_EVERY == 0 or done == len(paths)):
            progress("backing up", done, len(paths))

    try:
        captured = capture(backups, paths, reason="commit", env_id=env.id, env_name=env.name,
                           commit_id=commit_id, advance=advance, adoptable=adoptable)
    except BackupError as e:
        raise BackupError(f"{e}; nothing on the host was changed") from e
    except OSError as e:
        raise BackupError(
            f"cannot back up {os.fsdecode(e.filename or '')}: {e.strerror}; "
            "nothing on the host was changed"
        ) from e
    result.backed_up = len(captured.events)
    result.backup_bytes = sum(e.size for e in captured.events.values())
    return {op.index: captured.to_adopt[op.host] for op in ops
            if op.stash and op.host in captured.to_adopt}


def _finish(
    env: Env, journal: Journal, backups: Backups, ops: list[Op], *, resume: bool,
    result: CommitResult, progress: Progress | None,
) -> None:
    commit_id = str(journal.plan["commit_id"])
    if journal.phase == BACKED_UP:
        def rebackup(path: bytes) -> None:
            capture(backups, [path], reason="commit", env_id=env.id, env_name=env.name,
                    commit_id=commit_id)

        def forget(path: bytes, digest: str) -> None:
            backups.catalog.forget(commit_id, path, digest)

        applier = Applier(commit_id, rebackup, resume, journal.stash, backups.local.adopt,
                          forget)
        for done, op in enumerate(ops, start=1):
            applier.run(op)
            if progress is not None and (done % _REPORT_EVERY == 0 or done == len(ops)):
                progress("applying", done, len(ops))
        for op in reversed(ops):
            if op.action == PUT and op.kind == "dir" and op.index not in applier.problems:
                applier.finish_dir(op)
        _flush_hosts(env)
        journal.mark(APPLIED, sorted(applier.problems))
        result.problems = [applier.problems[i] for i in sorted(applier.problems)]
    else:
        result.problems = [
            f"{os.fsdecode(ops[i].host)}: could not be applied" for i in journal.failed
        ]
    failed = set(journal.failed)
    committed = {(op.root, op.rel) for op in ops if op.index not in failed}
    failed_paths = {(ops[i].root, ops[i].rel) for i in failed}
    moved = [op for op in ops if op.move and op.index not in failed]
    prune(env, _selection_of(journal.plan), committed, failed_paths, moved)
    journal.remove()


def _flush_hosts(env: Env) -> None:
    """One barrier per host filesystem: the data of every copied file is on disk before the
    env's copies of it are pruned."""
    seen: set[int] = set()
    for root in env.roots:
        try:
            fd = os.open(root.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            dev = os.fstat(fd).st_dev
            if dev not in seen:
                seen.add(dev)
                libc.syncfs(fd)
        finally:
            os.close(fd)


def _selection_of(plan: dict[str, object]) -> Selection:
    prefixes = plan.get("selection")
    if prefixes is None:
        return Selection(None)
    assert isinstance(prefixes, list)
    return Selection(tuple((int(root), os.fsencode(rel)) for root, rel in prefixes))


# -- recovery -----------------------------------------------------------------------------------


def resume(store: Store, env: Env, progress: Progress | None = None) -> CommitResult | None:
    """Finish (or roll back) an interrupted commit of `env`; None when there is none."""
    with store.lock(env, purpose="finish its interrupted commit"):
        return _resume_locked(store, env, progress)


def _resume_locked(store: Store, env: Env, progress: Progress | None) -> CommitResult | None:
    journal = Journal.read(journal_path(env.dir))
    if journal is None:
        return None
    commit_id = str(journal.plan["commit_id"])
    result = CommitResult(env.name, commit_id=commit_id, resumed=True)
    backups = Backups.of_store(store.home)
    try:
        if journal.phase not in (BACKED_UP, APPLIED):
            # Killed before every backup was durable: nothing on the host was touched yet.
            backups.catalog.remove_commit(commit_id)
            backups.local.sweep_temps()
            journal.remove()
            result.rolled_back = True
            return result
        ops = [Op.from_json(data) for data in journal.plan["ops"]]
        _finish(env, journal, backups, ops, resume=True, result=result, progress=progress)
        return result
    finally:
        backups.close()


def recover_pending(store: Store, notify: Notify) -> list[CommitResult]:
    """Finish every interrupted commit whose env is free (run before any command)."""
    results: list[CommitResult] = []
    for env_id in pending_env_ids(store.home):
        try:
            env = store.get(env_id)
        except EnvNotFound:
            continue
        try:
            result = resume(store, env)
        except EnvBusy:
            continue  # another agentctl is at it
        except AgentctlError as e:
            notify(f"the interrupted commit of env {env.name} could not be finished: {e}")
            continue
        if result is not None:
            notify(describe_recovery(result))
            results.append(result)
    return results


def describe_recovery(result: CommitResult) -> str:
    if result.rolled_back:
        return (
            f"an interrupted commit of env {result.env} was rolled back before it changed the "
            "host; commit again when you are ready"
        )
    text = f"finished the interrupted commit {result.commit_id} of env {result.env}"
    if result.problems:
        text += f" ({len(result.problems)} change(s) could not be applied and stay in the env)"
    return text
