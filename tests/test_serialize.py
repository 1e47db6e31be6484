"""Channels messages survive the trip through envelope data exactly, or are refused."""

from __future__ import annotations

import enum
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crossws_channels import serialize
from crossws_channels.envelope import SyncMessage, decode_envelope, encode_envelope

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(alphabet=st.characters(codec=None))
    | st.binary(max_size=32),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
messages = st.dictionaries(st.text(max_size=12), values, max_size=6).map(
    lambda extra: {"type": "test.message", **extra}
)


def same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN and tells int, float, bool and bytes apart."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@given(messages)
def test_messages_round_trip_through_the_envelope(message: dict[str, Any]) -> None:
    """Any valid message comes out of dumps → envelope → loads unchanged."""
    data = serialize.dumps(message)
    envelope = decode_envelope(encode_envelope("me", SyncMessage("", "group", data)))
    assert envelope is not None
    assert same(serialize.loads(envelope.msg.data), message)


def test_text_messages_travel_as_json_text() -> None:
    """A message without bytes is plain JSON text, readable by a crossws peer."""
    assert serialize.dumps({"type": "chat", "text": "hé", "n": [1, 2.5, None, True]}) == (
        '{"type":"chat","text":"hé","n":[1,2.5,null,true]}'
    )


def test_bytes_and_nan_travel_as_binary() -> None:
    """Bytes (and floats JSON can't spell) switch to the binary form."""
    for message in ({"type": "b", "data": b"\x00"}, {"type": "f", "x": float("nan")}):
        data = serialize.dumps(message)
        assert isinstance(data, bytes) and data.startswith(serialize.BINARY_MARKER)


def test_tuples_arrive_as_lists_and_subclasses_as_base_types() -> None:
    """Tuples become lists and IntEnum becomes int, as with other layers."""

    class Colour(enum.IntEnum):
        RED = 1

    assert serialize.loads(
        serialize.dumps({"type": "t", "v": (1, Colour.RED), "b": bytearray(b"x")})
    ) == {
        "type": "t",
        "v": [1, 1],
        "b": b"x",
    }


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        ({"type": "t", "when": object()}, "message['when'] is of type object"),
        (
            {"type": "t", "nested": [{"deep": {1, 2}}]},
            "message['nested'][0]['deep'] is of type set",
        ),
        ({"type": "t", 1: "x"}, "key of type int"),
        ({"type": "t", "d": {b"k": 1}}, "key of type bytes"),
        ({"type": "t", "b": b"x", "big": 2**70}, "cannot send message"),
        (["type", "t"], "must be a dict"),
    ],
)
def test_unserializable_messages_are_refused_with_a_clear_type_error(
    message: Any, fragment: str
) -> None:
    """Values a message may not hold raise TypeError naming where they are."""
    with pytest.raises(
        TypeError, match=fragment.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
    ):
        serialize.dumps(message)


def test_non_message_data_is_rejected_on_load() -> None:
    """Binary data without the marker, or JSON that isn't an object, is not a message."""
    for data, reason in ((b"\x00\x01", "marker"), ("[1]", "not a message"), ("3", "not a message")):
        with pytest.raises(ValueError, match=reason):
            serialize.loads(data)


def test_payload_size_counts_utf8_bytes() -> None:
    """Sizes are wire bytes, not characters."""
    assert serialize.payload_size("é" * 10) == 20
    assert serialize.payload_size(b"abc") == 3


def test_a_relayed_item_is_decoded_once_and_still_checked() -> None:
    """relayed_template hands over a Channels message already decoded, and what
    relayed_payload would for anything else (a crossws peer's text, binary data)."""
    text = serialize.dumps({"type": "job", "n": [1, 2]})
    item = serialize.relayed_template(SyncMessage("", "jobs", text))
    assert isinstance(item, serialize.Template)
    first, second = item.copy(), item.copy()
    first["n"].append(3)
    assert second == {"type": "job", "n": [1, 2]}
    for data in ("plain text", '{"no": "type"}', '{"type": 1}', "[1]"):
        message = SyncMessage("ns", "jobs", data)
        assert serialize.relayed_template(message) == serialize.relayed_payload(message)
    binary = serialize.dumps({"type": "job", "blob": b"\x00"})
    assert serialize.relayed_template(SyncMessage("", "jobs", binary)) == binary
