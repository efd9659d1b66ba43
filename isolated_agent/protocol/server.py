"""A control-port server on a Unix socket, on trio (the client is in client.py).

The server checks every connection's credentials before reading a byte, answers each request
frame with exactly one reply frame, and survives anything a client sends: malformed frames,
oversized lengths and unknown codes get an ERROR frame and the connection is closed; a handler
that raises gets an ERROR frame and the daemon goes on. The socket is created mode 0600.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio  # type: ignore[import-untyped]

from isolated_agent.protocol.frames import (
    Code,
    Frame,
    FrameReader,
    ProtocolError,
    error_frame,
)
from isolated_agent.protocol.peer import PeerCred, peer_cred, refusal

log = logging.getLogger(__name__)

Handler = Callable[[Frame, PeerCred], Awaitable[Frame]]
Refusal = Callable[[PeerCred], "str | None"]

_READ_SIZE = 65536


async def bind_unix_socket(path: str) -> trio.socket.SocketType:
    """Bind a listening socket at `path`, replacing a stale one, usable by us alone.

    Bound synchronously: the umask is the process's, and an await between setting and
    restoring it would let another task (a FUSE request creating a file) run under it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # no window in which the socket is open to others
    try:
        plain.bind(path)
    except BaseException:
        plain.close()
        raise
    finally:
        os.umask(old_umask)
    plain.listen(64)
    return trio.socket.from_stdlib_socket(plain)


async def serve(
    path: str,
    handler: Handler,
    refuse: Refusal = refusal,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    listener = trio.SocketListener(await bind_unix_socket(path))
    task_status.started()
    await trio.serve_listeners(
        lambda stream: _connection(stream, handler, refuse), [listener]
    )


async def _connection(stream: trio.SocketStream, handler: Handler, refuse: Refusal) -> None:
    async with stream:
        peer = peer_cred(stream.socket)
        reason = refuse(peer)
        if reason is not None:
            log.warning("refused control connection from pid %d: %s", peer.pid, reason)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(error_frame(reason).encode())
            return
        reader = FrameReader()
        while True:
            try:
                data = await stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                frames = reader.feed(data)
            except ProtocolError as e:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(error_frame(str(e)).encode())
                return
            for frame in frames:
                reply = await _answer(handler, frame, peer)
                try:
                    await stream.send_all(reply.encode())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return


async def _answer(handler: Handler, frame: Frame, peer: PeerCred) -> Frame:
    if frame.code is Code.HEARTBEAT:
        return Frame(Code.ACK)
    try:
        return await handler(frame, peer)
    except Exception as e:  # a handler bug must not take the daemon down
        log.exception("control handler failed on %s", frame.code.name)
        return error_frame(f"internal error: {e!r}")
