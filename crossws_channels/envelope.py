"""The relay's wire format: crossws's sync envelope.

Every message that crosses the backplane is one JSON object::

    {"id":"<instance id>","msg":{"namespace":"","topic":"chat","binary":false,"data":"..."}}

``id`` names the sending instance, so a receiver can ignore its own echo. ``data`` is
text, or base64 with ``"binary":true``. :func:`encode_envelope` produces the same text as
crossws's ``encodeEnvelope`` for the same input, and :func:`decode_envelope` accepts what
crossws's ``decodeEnvelope`` accepts, so a crossws server and a Django project can share
one backplane.

crossws_channels may append its own top-level keys after ``msg`` (``seq``, ``exp``,
``ask``, ``ts``); crossws ignores keys it does not know.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any

__all__ = ["Envelope", "SyncMessage", "decode_envelope", "encode_envelope"]


@dataclass(frozen=True, slots=True)
class SyncMessage:
    """One message as the seed defines it: a topic in a namespace, and its data."""

    namespace: str
    topic: str
    data: str | bytes


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded envelope: the sender's instance id and the message.

    ``seq``, ``expires``, ``ask`` and ``sent`` are crossws_channels' own additions: a
    sequence number (of the sender's broadcasts, or of its messages sent to channels), a
    wall-clock deadline, a request for credit (flow control of direct sends), and the
    wall-clock time it was sent (for the relay-lag histogram). They are ``None``
    (``False``) in envelopes from crossws.
    """

    id: str
    msg: SyncMessage
    seq: int | None = None
    expires: float | None = None
    ask: bool = False
    sent: float | None = None


# JavaScript strings are UTF-16: JSON.stringify writes a surrogate pair as the character
# it encodes and a lone surrogate as a lowercase \\udXXX escape. Python's encoder leaves
# surrogate code points raw, which would also make the text impossible to encode as UTF-8.
_SURROGATES = re.compile("[\ud800-\udfff]+")


def _js_surrogates(match: re.Match[str]) -> str:
    run = match.group()
    out: list[str] = []
    i = 0
    while i < len(run):
        high = ord(run[i])
        if 0xD800 <= high <= 0xDBFF and i + 1 < len(run) and 0xDC00 <= ord(run[i + 1]) <= 0xDFFF:
            low = ord(run[i + 1])
            out.append(chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)))
            i += 2
        else:
            out.append(f"\\u{high:04x}")
            i += 1
    return "".join(out)


def json_string(value: str) -> str:
    """``value`` as a JSON string literal, exactly as JavaScript's JSON.stringify writes it."""
    return _json_string(value)


def _json_string(value: str) -> str:
    text: str = encode_basestring(value)
    if not text.isascii() and _SURROGATES.search(text):
        text = _SURROGATES.sub(_js_surrogates, text)
    return text


def encode_envelope(instance_id: str, msg: SyncMessage) -> str:
    """Return the JSON text of the envelope for ``msg`` sent by ``instance_id``.

    The text is exactly what crossws's ``encodeEnvelope(id, msg)`` returns for the same
    values: keys in the same order, no spaces, binary data as standard base64.
    """
    data = msg.data
    if isinstance(data, str):
        binary = "false"
        encoded = _json_string(data)
    else:
        binary = "true"
        encoded = '"' + base64.b64encode(data).decode("ascii") + '"'
    return (
        '{"id":'
        + _json_string(instance_id)
        + ',"msg":{"namespace":'
        + _json_string(msg.namespace)
        + ',"topic":'
        + _json_string(msg.topic)
        + ',"binary":'
        + binary
        + ',"data":'
        + encoded
        + "}}"
    )


def encode_frame(
    instance_id: str,
    msg: SyncMessage,
    *,
    seq: int | None = None,
    expires: float | None = None,
    ask: bool = False,
    sent: int | None = None,
) -> str:
    """Encode an envelope with crossws_channels' optional keys appended (``sent``: the
    wall-clock time in microseconds, ``"ts"``)."""
    text = encode_envelope(instance_id, msg)
    if seq is None and expires is None and not ask and sent is None:
        return text
    extra = ""
    if seq is not None:
        extra += f',"seq":{seq:d}'
    if expires is not None:
        extra += f',"exp":{expires!r}'
    if ask:
        extra += ',"ask":true'
    if sent is not None:
        extra += f',"ts":{sent:d}'
    return text[:-1] + extra + "}"


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JavaScript's JSON.parse does not.
    raise ValueError(name)


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_B64_WHITESPACE = re.compile(r"[\t\n\f\r ]")
_B64_ALPHABET = re.compile(r"[A-Za-z0-9+/]*")


def _forgiving_base64(text: str) -> bytes | None:
    """Decode base64 the way the browser's ``atob`` does, or return None."""
    text = _B64_WHITESPACE.sub("", text)
    if len(text) % 4 == 0:
        if text.endswith("=="):
            text = text[:-2]
        elif text.endswith("="):
            text = text[:-1]
    if len(text) % 4 == 1 or not _B64_ALPHABET.fullmatch(text):
        return None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _js_truthy(value: object) -> bool:
    # In JavaScript every object and array is truthy, even an empty one.
    return isinstance(value, (dict, list)) or bool(value)


def decode_envelope(raw: str | bytes | bytearray | memoryview) -> Envelope | None:
    """Parse envelope text (or its UTF-8 bytes); return ``None`` if it is malformed.

    Accepts exactly what crossws's ``decodeEnvelope`` accepts. Never raises.
    """
    try:
        if not isinstance(raw, str):
            raw = bytes(raw).decode("utf-8")
        parsed = _decoder.decode(raw)
        if not isinstance(parsed, dict):
            return None
        instance_id = parsed.get("id")
        msg = parsed.get("msg")
        if not isinstance(instance_id, str) or not isinstance(msg, dict):
            return None
        namespace = msg.get("namespace")
        topic = msg.get("topic")
        data = msg.get("data")
        if not (isinstance(topic, str) and isinstance(namespace, str) and isinstance(data, str)):
            return None
        payload: str | bytes = data
        if _js_truthy(msg.get("binary")):
            decoded = _forgiving_base64(data)
            if decoded is None:
                return None
            payload = decoded
        seq = parsed.get("seq")
        expires = parsed.get("exp")
        sent = parsed.get("ts")
        return Envelope(
            instance_id,
            SyncMessage(namespace, topic, payload),
            seq if type(seq) is int and seq >= 0 else None,
            float(expires)
            if isinstance(expires, (int, float)) and not isinstance(expires, bool)
            else None,
            parsed.get("ask") is True,
            sent / 1e6 if type(sent) is int and sent > 0 else None,
        )
    except Exception:
        # Malformed input of any shape (bad UTF-8, bad JSON, nesting too deep for the
        # parser) is the caller's "not an envelope", never an exception.
        return None
