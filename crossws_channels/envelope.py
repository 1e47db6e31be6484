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
from collections.abc import Callable
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]
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
    return encode_frame_after(frame_head(instance_id, msg.namespace, msg.topic), msg.data)


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
    head = frame_head(instance_id, msg.namespace, msg.topic)
    return encode_frame_after(head, msg.data, seq=seq, expires=expires, ask=ask, sent=sent)


def frame_head(instance_id: str, namespace: str, topic: str) -> str:
    """The text every envelope from ``instance_id`` on ``topic`` starts with, up to the
    value of ``binary``: a sender can keep it for the topics it sends on often."""
    return (
        '{"id":'
        + _json_string(instance_id)
        + ',"msg":{"namespace":'
        + _json_string(namespace)
        + ',"topic":'
        + _json_string(topic)
        + ',"binary":'
    )


def encode_frame_after(
    head: str,
    data: str | bytes,
    *,
    seq: int | None = None,
    expires: float | None = None,
    ask: bool = False,
    sent: int | None = None,
) -> str:
    """:func:`encode_frame` for the envelope that starts with ``head``
    (:func:`frame_head`)."""
    if isinstance(data, str):
        text = head + 'false,"data":' + _json_string(data) + "}"
    else:
        text = head + 'true,"data":"' + base64.b64encode(data).decode("ascii") + '"}'
    if seq is not None:
        text += f',"seq":{seq:d}'
    if expires is not None:
        text += f',"exp":{expires!r}'
    if ask:
        text += ',"ask":true'
    if sent is not None:
        text += f',"ts":{sent:d}'
    return text + "}"


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JavaScript's JSON.parse does not.
    raise ValueError(name)


def json_reader(decoder: json.JSONDecoder) -> Callable[[str], Any]:
    """``decoder.decode``, faster for text that is one object and nothing around it (what
    a layer writes): the decoder's two regular-expression matches for whitespace before
    and after the value are skipped. Anything else goes to ``decode``, which reads it,
    or raises, as it always does."""
    scan = decoder.scan_once  # type: ignore[attr-defined]
    decode = decoder.decode

    def read(text: str) -> Any:
        if text[:1] == "{":
            try:
                value, end = scan(text, 0)
            except (StopIteration, ValueError):
                pass  # not JSON: decode() says why
            else:
                if end == len(text):
                    return value
        return decode(text)

    return read


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_read_json = json_reader(_decoder)
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
    fields = decode_fields(raw)
    if fields is None:
        return None
    instance_id, namespace, topic, data, seq, expires, ask, sent = fields
    return Envelope(instance_id, SyncMessage(namespace, topic, data), seq, expires, ask, sent)


# What decode_fields returns: the id, the message's namespace, topic and data, then seq,
# expires, ask and sent (as in Envelope).
Fields = tuple[str, str, str, "str | bytes", "int | None", "float | None", bool, "float | None"]


# An envelope exactly as a layer instance writes it (encode_frame): read by position,
# which costs a third less than building the whole JSON document. Anything else (another
# order of keys, whitespace, binary data, an id that needs escapes) goes to the JSON
# decoder; the two read the same text the same way.
_LAYOUT_HEAD = re.compile(
    r'\{"id":"([A-Za-z0-9]+)","msg":\{"namespace":"([^"\\\x00-\x1f]*)",'
    r'"topic":"([^"\\\x00-\x1f]*)","binary":false,"data":"'
)
_INT = r"(0|[1-9][0-9]*)"
_LAYOUT_TAIL = re.compile(
    r'\}(?:,"seq":' + _INT + r")?"
    r'(?:,"exp":(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?))?'
    r'(,"ask":true)?(?:,"ts":' + _INT + r")?\}"
)


def _by_layout(raw: str) -> Fields | None:
    head = _LAYOUT_HEAD.match(raw)
    if head is None:
        return None
    data, end = scanstring(raw, head.end())
    tail = _LAYOUT_TAIL.fullmatch(raw, end)
    if tail is None:
        return None
    seq, expires, ask, sent = tail.group(1, 2, 3, 4)
    return (
        head[1],
        head[2],
        head[3],
        data,
        None if seq is None else int(seq),
        None if expires is None else float(expires),
        ask is not None,
        int(sent) / 1e6 if sent is not None and sent != "0" else None,
    )


def decode_fields(raw: str | bytes | bytearray | memoryview) -> Fields | None:
    """:func:`decode_envelope`'s fields as a tuple, without the objects around them: what
    the layer reads every relayed message with (building the two frozen dataclasses
    would cost as much as parsing the JSON)."""
    try:
        if type(raw) is bytes:
            raw = raw.decode("utf-8")
        elif not isinstance(raw, str):
            raw = bytes(raw).decode("utf-8")
        fields = _by_layout(raw)
        if fields is not None:
            return fields
        parsed = _read_json(raw)
        if type(parsed) is not dict:
            return None
        instance_id = parsed.get("id")
        msg = parsed.get("msg")
        if type(instance_id) is not str or type(msg) is not dict:
            return None
        namespace = msg.get("namespace")
        topic = msg.get("topic")
        data = msg.get("data")
        if type(topic) is not str or type(namespace) is not str or type(data) is not str:
            return None
        payload: str | bytes = data
        binary = msg.get("binary")
        if binary is not False and _js_truthy(binary):
            decoded = _forgiving_base64(data)
            if decoded is None:
                return None
            payload = decoded
        seq = parsed.get("seq")
        expires = parsed.get("exp")
        sent = parsed.get("ts")
        return (
            instance_id,
            namespace,
            topic,
            payload,
            seq if type(seq) is int and seq >= 0 else None,
            None if expires is None else float(expires) if type(expires) in (int, float) else None,
            parsed.get("ask") is True,
            sent / 1e6 if type(sent) is int and sent > 0 else None,
        )
    except Exception:
        # Malformed input of any shape (bad UTF-8, bad JSON, nesting too deep for the
        # parser) is the caller's "not an envelope", never an exception.
        return None
