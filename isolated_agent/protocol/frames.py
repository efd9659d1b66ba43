"""The control-port wire format shared by every daemon (DESIGN §8).

A frame is

    +---------+------+----------------------+-----------------+
    | version | code | payload length (BE)  | payload         |
    | 1 byte  | 1 B  | 4 bytes, unsigned    | length bytes    |
    +---------+------+----------------------+-----------------+

The payload is JSON (an object) for every code but `BLOB`, whose payload is raw bytes. Codes are
single ASCII letters; those of the seed (heartbeat `0`, backup `B`, skip `b`, purge `D`) keep
their meaning. A reader that meets a wrong version, an unknown code, a length over
`MAX_PAYLOAD` or a payload that is not a JSON object raises `ProtocolError`: after a bad header
the stream cannot be resynchronised, so the peer answers with an ERROR frame and hangs up.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

VERSION = 1
HEADER = struct.Struct(">BBI")
MAX_PAYLOAD = 1 << 20  # 1 MiB: control messages are small; anything bigger is an attack or a bug


class Code(enum.Enum):
    HEARTBEAT = b"0"
    BACKUP = b"B"  # an item was staged: back it up
    SKIP = b"b"  # an item will not be backed up (excluded, too large)
    PURGE = b"D"  # the staged copy of an uploaded item may go (by id only)
    REGISTER_ENV = b"E"
    UNREGISTER_ENV = b"e"
    REGISTER_JOB = b"J"
    UNREGISTER_JOB = b"j"
    QUERY = b"Q"
    FREEZE = b"F"  # a live checkpoint: freeze the upper into the given directory (agentfs)
    ACK = b"A"
    ERROR = b"!"
    BLOB = b"X"  # raw bytes payload


_BY_BYTE = {code.value[0]: code for code in Code}


class ProtocolError(Exception):
    """The bytes received are not a valid frame."""


@dataclass(frozen=True)
class Frame:
    code: Code
    body: dict[str, Any] = field(default_factory=dict)
    blob: bytes = b""

    def encode(self) -> bytes:
        payload = self.blob if self.code is Code.BLOB else _dump(self.body)
        if len(payload) > MAX_PAYLOAD:
            raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        return HEADER.pack(VERSION, self.code.value[0], len(payload)) + payload


def error_frame(message: str) -> Frame:
    return Frame(Code.ERROR, {"error": message})


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


class FrameReader:
    """Incremental decoder: feed it bytes as they arrive, take whole frames out."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Frame | None:
        if len(self._buffer) < HEADER.size:
            return None
        version, code_byte, length = HEADER.unpack_from(self._buffer)
        if version != VERSION:
            raise ProtocolError(f"unsupported protocol version {version}")
        code = _BY_BYTE.get(code_byte)
        if code is None:
            raise ProtocolError(f"unknown frame code {code_byte:#04x}")
        if length > MAX_PAYLOAD:
            raise ProtocolError(f"frame length {length} exceeds {MAX_PAYLOAD}")
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        if code is Code.BLOB:
            return Frame(code, blob=payload)
        return Frame(code, _parse(payload))


def _parse(payload: bytes) -> dict[str, Any]:
    if not payload:
        return {}
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"payload is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("payload is not a JSON object")
    return body
