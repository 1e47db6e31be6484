"""Channels message dicts to envelope data and back.

A message that holds no bytes travels as its JSON text, which is what a crossws peer
sharing the backplane expects to see. A message that holds bytes (or a float JSON can't
spell, such as NaN) travels as binary data: a four-byte marker followed by msgpack.

Serializing also validates: a message is refused with :class:`TypeError` at the call if
it holds anything a Channels message may not (ASGI messages hold str, bytes, int, float,
bool, None, and lists and dicts of those, with str keys).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgpack

from .envelope import json_reader

if TYPE_CHECKING:
    from .envelope import SyncMessage

__all__ = [
    "BINARY_MARKER",
    "Template",
    "copy_message",
    "dumps",
    "loads",
    "payload_size",
    "relayed_payload",
    "relayed_template",
]

# 0xC1 is the one byte msgpack never emits, so no plain msgpack document, and no
# UTF-8 text, starts with this marker by accident.
BINARY_MARKER = b"\xc1cw1"

Message = dict[str, Any]


class _NotJSON(Exception):
    """Raised from the JSON encoder's fallback to leave the fast path."""


def _not_json(value: object) -> Any:
    raise _NotJSON


def _make_json_encode() -> Callable[[Any], str]:
    """JSON text of a message, compact, NaN refused, anything else JSON can't take
    raising :class:`_NotJSON`.

    ``JSONEncoder.encode`` builds a new C encoder for every call (a third of the cost
    of a small message); this one is built once. It keeps no record of the containers
    being encoded: a message that contains itself fails with RecursionError, as the
    check of its values would anyway.
    """
    make = json.encoder.c_make_encoder  # type: ignore[attr-defined]
    if make is None:  # an interpreter without the C accelerator
        return json.JSONEncoder(
            ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_not_json
        ).encode
    encode = make(
        None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )

    def encode_message(value: Any) -> str:
        return "".join(encode(value, 0))

    return encode_message


_json_encode = _make_json_encode()
_json_decode = json_reader(json.JSONDecoder())
_ALLOWED = "str, bytes, int, float, bool, None, and lists and dicts of those with str keys"


def _walk(value: object, path: str) -> bool:
    """Check ``value`` is a valid message value; return True if it needs binary form.

    Subclasses of the allowed types (IntEnum, str subclasses, bytearray) are accepted and
    travel as their base type.
    """
    if isinstance(value, (str, int)) or value is None:  # bool is an int
        return False
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return True
    if isinstance(value, dict):
        binary = False
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"cannot send message: {path} has a key of type {type(key).__name__} "
                    f"({key!r}); message dict keys must be str"
                )
            binary = _walk(item, f"{path}[{key!r}]") or binary
        return binary
    if isinstance(value, (list, tuple)):
        binary = False
        for index, item in enumerate(value):
            binary = _walk(item, f"{path}[{index}]") or binary
        return binary
    raise TypeError(
        f"cannot send message: {path} is of type {type(value).__name__}; a Channels "
        f"message may hold only {_ALLOWED}"
    )


def _str_keys(value: dict[Any, Any]) -> bool:
    """True if every dict key in ``value`` (at any depth) is a str: the cheap check left
    to do once the JSON encoder has accepted every value."""
    for key in value:
        if type(key) is not str and not isinstance(key, str):
            return False
    return _str_keys_in(value.values())


# The values the check of keys needn't look into.
_LEAVES = frozenset((str, int, float, bool, type(None)))


def _str_keys_in(values: Iterable[Any]) -> bool:
    """True if every dict among ``values`` and their nested lists has only str keys."""
    for item in values:
        if type(item) in _LEAVES:
            continue
        if isinstance(item, dict):
            if not _str_keys(item):
                return False
        elif isinstance(item, (list, tuple)) and not _str_keys_in(item):
            return False
    return True


def _msgpack_default(value: object) -> Any:
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def dumps(message: Message) -> str | bytes:
    """Serialize ``message`` to envelope data, refusing anything that can't round-trip."""
    if type(message) is not dict:
        if not isinstance(message, dict):
            raise TypeError(f"a message must be a dict, not {type(message).__name__}")
        message = dict(message)
    try:
        text = _json_encode(message)
    except (_NotJSON, ValueError, TypeError):
        # bytes, NaN, a bad key or an unsupported type: the walk tells which, with a path.
        pass
    else:
        # JSON silently turns non-str keys into strings, which would not round-trip.
        if not _str_keys(message):
            _walk(message, "message")  # raises, naming the key
        return text
    if not _walk(message, "message"):
        # Only possible for a type JSON refused but the walk accepted; be safe.
        raise TypeError(f"cannot send message: it holds a value outside {_ALLOWED}")
    try:
        packed: bytes = msgpack.packb(
            message, use_bin_type=True, default=_msgpack_default, unicode_errors="surrogatepass"
        )
    except (OverflowError, ValueError, TypeError) as exc:
        raise TypeError(f"cannot send message: {exc}") from exc
    return BINARY_MARKER + packed


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not a message value")


def loads(data: str | bytes) -> Message:
    """Deserialize envelope data produced by :func:`dumps`. Raises ValueError if invalid."""
    if isinstance(data, str):
        message = _json_decode(data)
    elif data[:4] == BINARY_MARKER:
        # The layer never sends extension types: refuse them (a Timestamp or ExtType from
        # someone else's publisher must not reach a consumer as a foreign object).
        message = msgpack.unpackb(
            data[4:],
            raw=False,
            strict_map_key=True,
            unicode_errors="surrogatepass",
            max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    else:
        raise ValueError("binary data without the crossws_channels marker")
    if type(message) is not dict:
        raise ValueError("data is not a message dict")
    return message


def relayed_payload(msg: SyncMessage) -> str | bytes:
    """The payload to queue for relayed ``msg``: its data if that is a Channels message,
    else the data of a crossws peer wrapped as one (``{"type": "crossws.message",
    "text"|"bytes": ..., "namespace": ...}``). Raises ValueError for binary data that
    claims to be a message and is not."""
    data = msg.data
    if isinstance(data, str):
        try:
            decoded = json.loads(data)
        except ValueError:
            decoded = None
        if type(decoded) is dict and isinstance(decoded.get("type"), str):
            return data
        return dumps({"type": "crossws.message", "text": data, "namespace": msg.namespace})
    if data[:4] == BINARY_MARKER:
        if not isinstance(loads(data).get("type"), str):
            raise ValueError("the message has no 'type'")
        return data
    return dumps({"type": "crossws.message", "bytes": data, "namespace": msg.namespace})


def relayed_template(msg: SyncMessage) -> Template | str | bytes:
    """:func:`relayed_payload`, already decoded when it is a Channels message in JSON:
    for an item only one receiver takes (a worker channel's), which is then decoded once
    instead of once to check it and once more to receive it."""
    data = msg.data
    if isinstance(data, str):
        try:
            decoded = loads(data)
        except (ValueError, RecursionError):
            decoded = None
        if decoded is not None and isinstance(decoded.get("type"), str):
            return Template(decoded)
    return relayed_payload(msg)


def payload_size(data: str | bytes) -> int:
    """Bytes ``data`` occupies on the wire before base64 or escaping."""
    if isinstance(data, bytes):
        return len(data)
    if data.isascii():
        return len(data)
    return len(data.encode("utf-8", "surrogatepass"))


# What a decoded message may nest (JSON and msgpack decode arrays as lists).
_CONTAINERS = (dict, list)


class Template:
    """A message decoded once for many receivers; each receives :func:`copy_message` of it.

    Decoding the same text for every member of a large group costs more than copying the
    decoded dict, and copying keeps what the layer promises: no two consumers share a
    mutable message.
    """

    __slots__ = ("flat", "message")

    def __init__(self, message: Message) -> None:
        self.message = message
        # Most Channels messages hold no dict or list: a shallow copy is then a full copy,
        # and dict.copy() runs in C.
        self.flat = not any(type(value) in _CONTAINERS for value in message.values())

    def copy(self) -> Message:
        """A copy of the message for one receiver."""
        if self.flat:
            return self.message.copy()
        return copy_message(self.message)


def _copy_list(value: list[Any]) -> list[Any]:
    out = []
    for item in value:
        kind = type(item)
        if kind is dict:
            item = copy_message(item)
        elif kind is list:
            item = _copy_list(item)
        out.append(item)
    return out


def copy_message(message: Message) -> Message:
    """A copy of a decoded message: new dicts and lists, the same immutable leaves."""
    out = {}
    for key, value in message.items():
        kind = type(value)
        if kind is dict:
            value = copy_message(value)
        elif kind is list:
            value = _copy_list(value)
        out[key] = value
    return out
