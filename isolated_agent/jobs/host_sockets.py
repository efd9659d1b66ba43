"""Which of the host's unix sockets a job must not reach.

A read-only bind mount does not stop connect(2): a job that can name a host daemon's socket can
talk to it, and with docker.sock, containerd, podman, libvirt or systemd's private socket that
is host root. So the view built for a job (sandbox.py) covers every pathname socket the host is
listening on with an inert file: connect() then fails with ECONNREFUSED, as for a daemon that
is not running.

Which sockets: every bound pathname socket that the kernel lists in /proc/net/unix, for every
network namespace we can see (a daemon in a container or in rootless docker's namespace binds
its socket in another one, at a path the job can still name). Left reachable:

- sockets beneath the job's writable paths (its managed roots, --allow paths, private /tmp):
  what lives there is the job's business, and sockets a test suite creates in the project work;
- --allow-socket paths: the user names them (e.g. $SSH_AUTH_SOCK);
- NAME_SERVICE_SOCKETS: the daemons the C library asks for user, group and host names, which a
  program needs to work at all and which answer queries only, and the system log.

Abstract sockets have no path; Landlock's scoping keeps a job away from the host's (confine.py),
and `--network none` gives the job a network namespace, with an abstract namespace, of its own.

A socket bound after the job started is not covered (its path is not listed yet); the README
says so.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable

from isolated_agent.env.store import is_within

# Query-only services the C library talks to on its own (nss), and the log.
NAME_SERVICE_SOCKETS = (
    "/run/nscd/socket",
    "/var/run/nscd/socket",
    "/run/systemd/userdb",  # io.systemd.Multiplexer, io.systemd.DynamicUser, ...
    "/run/systemd/resolve/io.systemd.Resolve",
    "/var/lib/sss/pipes/nss",
    "/dev/log",
    "/run/systemd/journal/socket",
    "/run/systemd/journal/dev-log",
)


def bound_socket_paths(proc: str = "/proc") -> set[str]:
    """The absolute paths of every unix socket bound in a network namespace we can see."""
    tables = {f"{proc}/net/unix"}
    seen: set[str] = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(proc):
            if not entry.name.isdigit():
                continue
            try:
                namespace = os.readlink(f"{proc}/{entry.name}/ns/net")
            except OSError:  # gone, or another user's (as for the job itself: not visible)
                continue
            if namespace not in seen:
                seen.add(namespace)
                tables.add(f"{proc}/{entry.name}/net/unix")
    paths: set[str] = set()
    for table in tables:
        with contextlib.suppress(OSError), open(table, "rb") as f:
            paths.update(parse_unix_table(f.read()))
    return paths


def parse_unix_table(table: bytes) -> set[str]:
    """The pathname sockets of one /proc/net/unix table (abstract ones start with "@")."""
    paths = set()
    for line in table.splitlines()[1:]:
        fields = line.split(maxsplit=7)
        if len(fields) == 8 and fields[7].startswith(b"/"):
            paths.add(os.fsdecode(fields[7]))
    return paths


def kept_sockets(allowed: Iterable[str]) -> list[str]:
    """The real paths of the sockets a job always reaches: `allowed` (--allow-socket) and the
    name services."""
    return [os.path.realpath(p) for p in (*allowed, *NAME_SERVICE_SOCKETS)]


def sockets_to_mask(
    bound: Iterable[str], writable: Iterable[str], allowed: Iterable[str]
) -> list[str]:
    """The sockets a job's view must cover: `bound` less those beneath a writable path, those
    the user allowed and the name services (all real paths, compared without symlinks)."""
    writable = [os.path.realpath(p) for p in writable]
    kept = kept_sockets(allowed)
    masked: set[str] = set()
    for path in bound:
        real = os.path.realpath(path)
        if any(is_within(real, w) for w in writable) or any(is_within(real, k) for k in kept):
            continue
        masked.add(real)
    return sorted(masked)


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False
