"""Who is on the other end of a control socket, and may they talk to us (DESIGN §8)?

The kernel tells us the peer's pid, uid and gid (SO_PEERCRED), as they were when it connected,
and they cannot be forged. A daemon serves its own user and root only, and never a process
inside a job: a job must not be able to reconfigure the machinery that contains it.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    """Works on a plain socket and on a trio socket alike (both have getsockopt)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid, uid, gid)


def in_a_job(pid: int) -> bool:
    """True when `pid` belongs to an agentctl job, or cannot be placed with certainty.

    A kernel-engine job lives in its own pid namespace (a peer there shows as pid 0 when it is
    not visible from ours) and in an `isolated-agent-*` cgroup; a filter-engine job in such a
    cgroup. A process we cannot inspect is treated as inside: fail closed.
    """
    if pid <= 0:
        return True
    try:
        if os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid"):
            return True
        with open(f"/proc/{pid}/cgroup") as f:
            return any("/isolated-agent-" in line for line in f)
    except OSError:
        return True


def refusal(peer: PeerCred) -> str | None:
    """Why this peer may not use our control port, or None when it may."""
    if peer.uid not in (0, os.geteuid()):
        return f"uid {peer.uid} may not use this control port"
    if in_a_job(peer.pid):
        return "processes inside a job may not use the control port"
    return None
