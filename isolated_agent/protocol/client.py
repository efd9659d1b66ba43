"""The blocking control-port client: one request, one reply. No trio here: the CLI uses it."""

from __future__ import annotations

import contextlib
import socket

from isolated_agent.protocol.frames import Code, Frame, FrameReader, ProtocolError

_READ_SIZE = 65536


class ControlError(Exception):
    """The daemon answered with an ERROR frame, or the connection failed."""


def request(path: str, frame: Frame, timeout: float = 10.0) -> Frame:
    """Send one frame to the daemon at `path` and return its reply (blocking)."""
    reader = FrameReader()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            # A refusing daemon answers and hangs up without reading: its answer is waiting.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(frame.encode())
            while True:
                data = sock.recv(_READ_SIZE)
                if not data:
                    raise ControlError("the daemon closed the connection without answering")
                replies = reader.feed(data)
                if replies:
                    reply = replies[0]
                    break
    except OSError as e:
        raise ControlError(f"cannot reach the daemon at {path}: {e.strerror or e}") from e
    except ProtocolError as e:
        raise ControlError(f"the daemon sent a malformed reply: {e}") from e
    if reply.code is Code.ERROR:
        raise ControlError(str(reply.body.get("error", "unknown error")))
    return reply
