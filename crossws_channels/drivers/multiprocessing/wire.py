"""The wire format between the multiprocessing driver and its relay.

Every message is one frame: a 4-byte big-endian length, then that many bytes, of which
the first is the operation code. Envelopes and queue items travel as raw UTF-8 bytes, so
binary payloads (already base64 inside the envelope) and any text survive as they are,
and the relay forwards a broadcast frame to the other instances without parsing it.

Requests that expect an answer (``PUSH``, ``POP``, ``FLUSH``) carry a request id chosen by
the client; the relay answers each with exactly one ``REPLY``. A ``CANCEL`` of a pending
``POP`` is answered by that ``POP``'s own ``REPLY`` (empty if the relay withdrew it in
time), so a client always learns whether an item is on its way back to it.
"""

from __future__ import annotations

import struct
from typing import Any, Final

__all__ = [
    "CANCEL",
    "FLUSH",
    "HELLO",
    "MAX_FRAME",
    "MAX_HELLO_FRAME",
    "MESSAGE",
    "POP",
    "PROTOCOL_VERSION",
    "PUBLISH_TO",
    "PUSH",
    "REFUSED",
    "REPLY",
    "RETURN",
    "WELCOME",
    "FrameReader",
    "ProtocolError",
]

PROTOCOL_VERSION: Final = 1

# Operation codes. MESSAGE is used both ways: a client sends it to broadcast, and the
# relay forwards the very same frame bytes to every other instance.
HELLO: Final = 0x01  # client: version, pid, channel, instance id
WELCOME: Final = 0x02  # relay: its pid
REFUSED: Final = 0x03  # relay: reason; then it closes the connection
MESSAGE: Final = 0x10  # envelope
PUBLISH_TO: Final = 0x11  # client: target instance id, envelope
PUSH: Final = 0x20  # client: req, capacity, expires, channel, item
POP: Final = 0x21  # client: req, timeout, channel
RETURN: Final = 0x22  # client: expires, channel, item
CANCEL: Final = 0x23  # client: req of a pending POP
FLUSH: Final = 0x24  # client: req
REPLY: Final = 0x30  # relay: req, status, expires, data

# Large enough for any Channels message; small enough that a corrupt length prefix can't
# make a process allocate gigabytes.
MAX_FRAME: Final = 64 * 1024 * 1024
# The largest hello (a channel name is at most 65,535 bytes): what a connection may send
# before it has said who it is, so that one which never does holds little memory.
MAX_HELLO_FRAME: Final = 80 * 1024

_HEADER = struct.Struct("!IB")
_LENGTH = struct.Struct("!I")
_SHORT = struct.Struct("!H")
_HELLO = struct.Struct("!HI")
_REQ = struct.Struct("!I")
_PUSH = struct.Struct("!IId")
_POP = struct.Struct("!Id")
_RETURN = struct.Struct("!d")
_REPLY = struct.Struct("!IBd")

_U32_MAX: Final = 0xFFFFFFFF


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


def _frame(op: int, *parts: bytes) -> bytes:
    size = 1 + sum(len(part) for part in parts)
    if size > MAX_FRAME:
        raise ValueError(f"a {size}-byte frame exceeds the relay's limit of {MAX_FRAME} bytes")
    return _HEADER.pack(size, op) + b"".join(parts)


def _short_str(value: str) -> bytes:
    data = value.encode("utf-8", "surrogatepass")
    if len(data) > 0xFFFF:
        raise ValueError(f"name of {len(data)} bytes is too long for the relay protocol")
    return _SHORT.pack(len(data)) + data


def _read_short_str(body: memoryview, offset: int) -> tuple[str, int]:
    if len(body) < offset + 2:
        raise ProtocolError("truncated frame")
    (size,) = _SHORT.unpack_from(body, offset)
    end = offset + 2 + size
    if len(body) < end:
        raise ProtocolError("truncated frame")
    return bytes(body[offset + 2 : end]).decode("utf-8", "surrogatepass"), end


def _unpack(fmt: struct.Struct, body: memoryview) -> tuple[Any, ...]:
    if len(body) < fmt.size:
        raise ProtocolError("truncated frame")
    return fmt.unpack_from(body)


# Frames a client sends.


def hello(channel: str, instance_id: str, pid: int) -> bytes:
    return _frame(
        HELLO,
        _HELLO.pack(PROTOCOL_VERSION, pid & _U32_MAX),
        _short_str(channel),
        instance_id.encode("utf-8", "surrogatepass"),
    )


def message(envelope: bytes) -> bytes:
    return _frame(MESSAGE, envelope)


def publish_to(instance_id: str, envelope: bytes) -> bytes:
    return _frame(PUBLISH_TO, _short_str(instance_id), envelope)


def push(req: int, channel: str, item: bytes, capacity: int, expires: float) -> bytes:
    capacity = min(max(capacity, 0), _U32_MAX)
    return _frame(PUSH, _PUSH.pack(req, capacity, expires), _short_str(channel), item)


def pop(req: int, channel: str, timeout: float) -> bytes:
    return _frame(POP, _POP.pack(req, timeout), channel.encode("utf-8", "surrogatepass"))


def return_(channel: str, item: bytes, expires: float) -> bytes:
    return _frame(RETURN, _RETURN.pack(expires), _short_str(channel), item)


def cancel(req: int) -> bytes:
    return _frame(CANCEL, _REQ.pack(req))


def flush(req: int) -> bytes:
    return _frame(FLUSH, _REQ.pack(req))


# Frames the relay sends.


def welcome(pid: int) -> bytes:
    return _frame(WELCOME, _REQ.pack(pid & _U32_MAX))


def refused(reason: str) -> bytes:
    return _frame(REFUSED, reason.encode("utf-8", "replace"))


def reply(req: int, ok: bool, data: bytes = b"", expires: float = 0.0) -> bytes:
    return _frame(REPLY, _REPLY.pack(req, 1 if ok else 0, expires), data)


# Decoders: each takes the body after the operation code.


def parse_hello(body: memoryview) -> tuple[int, int, str, str]:
    """Return ``(version, pid, channel, instance_id)``."""
    version, pid = _unpack(_HELLO, body)
    channel, end = _read_short_str(body, _HELLO.size)
    instance_id = bytes(body[end:]).decode("utf-8", "surrogatepass")
    return int(version), int(pid), channel, instance_id


def parse_publish_to(body: memoryview) -> tuple[str, memoryview]:
    target, end = _read_short_str(body, 0)
    return target, body[end:]


def parse_push(body: memoryview) -> tuple[int, int, float, str, bytes]:
    """Return ``(req, capacity, expires, channel, item)``."""
    req, capacity, expires = _unpack(_PUSH, body)
    channel, end = _read_short_str(body, _PUSH.size)
    return int(req), int(capacity), float(expires), channel, bytes(body[end:])


def parse_pop(body: memoryview) -> tuple[int, float, str]:
    """Return ``(req, timeout, channel)``."""
    req, timeout = _unpack(_POP, body)
    channel = bytes(body[_POP.size :]).decode("utf-8", "surrogatepass")
    return int(req), float(timeout), channel


def parse_return(body: memoryview) -> tuple[float, str, bytes]:
    """Return ``(expires, channel, item)``."""
    (expires,) = _unpack(_RETURN, body)
    channel, end = _read_short_str(body, _RETURN.size)
    return float(expires), channel, bytes(body[end:])


def parse_req(body: memoryview) -> int:
    (req,) = _unpack(_REQ, body)
    return int(req)


def parse_reply(body: memoryview) -> tuple[int, bool, float, bytes]:
    """Return ``(req, ok, expires, data)``."""
    req, status, expires = _unpack(_REPLY, body)
    return int(req), status == 1, float(expires), bytes(body[_REPLY.size :])


class FrameReader:
    """Splits a byte stream into whole frames (length prefix included)."""

    __slots__ = ("_buffer", "limit")

    def __init__(self, limit: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        # The largest frame accepted; the relay raises it once a connection said hello.
        self.limit = limit

    def feed(self, data: bytes, most: int | None = None) -> list[bytes]:
        """Add ``data``; return every frame it completes (at most ``most``), oldest first.

        Raises :class:`ProtocolError` for an empty or oversized frame: the stream can't be
        resynchronised after that, so the caller drops the connection.
        """
        buffer = self._buffer
        buffer += data
        available = len(buffer)
        frames: list[bytes] = []
        pos = 0
        limit = self.limit
        with memoryview(buffer) as view:
            while available - pos >= 4:
                (size,) = _LENGTH.unpack_from(view, pos)
                if size < 1 or size > limit:
                    raise ProtocolError(f"invalid frame length {size}")
                end = pos + 4 + size
                if end > available:
                    break
                frames.append(view[pos:end].tobytes())
                pos = end
                if most is not None and len(frames) >= most:
                    break
        # The view must be released before the bytearray can shrink.
        if pos:
            del buffer[:pos]
        return frames
