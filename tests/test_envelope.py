"""The envelope: byte-compatible with crossws, and a decoder that never raises."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossws_channels.envelope import (
    Envelope,
    SyncMessage,
    decode_envelope,
    encode_envelope,
    encode_frame,
)
from tests.node.crossws import run_node

# Any text, lone surrogates and control characters included.
any_text = st.text(alphabet=st.characters(codec=None, categories=None), max_size=40)
messages = st.builds(SyncMessage, any_text, any_text, st.one_of(any_text, st.binary(max_size=64)))


def test_encode_matches_the_crossws_example() -> None:
    """The text is exactly crossws's: same keys, same order, no spaces."""
    text = encode_envelope("a", SyncMessage("", "t", "x"))
    assert text == '{"id":"a","msg":{"namespace":"","topic":"t","binary":false,"data":"x"}}'


def test_binary_data_is_base64_with_binary_true() -> None:
    """Bytes travel as standard base64 and come back as bytes."""
    text = encode_envelope("a", SyncMessage("ns", "t", b"\x00\xff\x10"))
    assert text == '{"id":"a","msg":{"namespace":"ns","topic":"t","binary":true,"data":"AP8Q"}}'
    assert decode_envelope(text) == Envelope("a", SyncMessage("ns", "t", b"\x00\xff\x10"))


def test_escapes_follow_json_stringify() -> None:
    """Non-ASCII stays raw, control characters use JSON.stringify's escapes, lone surrogates too."""
    text = encode_envelope("i", SyncMessage("", "t", 'é"\\\n\x01\x7f\ud800\ud83d\ude00'))
    assert '"data":"é\\"\\\\\\n\\u0001\x7f\\ud800😀"' in text
    text.encode("utf-8")  # always valid UTF-8


@given(st.text(max_size=20), messages)
def test_round_trip(instance_id: str, msg: SyncMessage) -> None:
    """decode(encode(x)) gives x back, for text and binary data."""
    decoded = decode_envelope(encode_envelope(instance_id, msg))
    assert decoded is not None

    # A surrogate pair written by Python as two code points reads back as one character,
    # as it would in JavaScript; compare through UTF-16 to see past that.
    def utf16(value: str | bytes) -> str | bytes:
        return value.encode("utf-16-le", "surrogatepass") if isinstance(value, str) else value

    assert utf16(decoded.id) == utf16(instance_id)
    assert utf16(decoded.msg.topic) == utf16(msg.topic)
    assert utf16(decoded.msg.namespace) == utf16(msg.namespace)
    assert utf16(decoded.msg.data) == utf16(msg.data)


def test_frame_extras_survive_and_crossws_fields_stay_first() -> None:
    """seq and exp are appended after msg; the envelope part is unchanged."""
    msg = SyncMessage("", "g", "{}")
    text = encode_frame("me", msg, seq=7, expires=12.5)
    assert text.startswith(encode_envelope("me", msg)[:-1] + ",")
    assert decode_envelope(text) == Envelope("me", msg, 7, 12.5)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "null",
        "[]",
        "{}",
        '"x"',
        "{",
        '{"id":1,"msg":{"namespace":"","topic":"t","data":"x"}}',
        '{"id":"a","msg":"x"}',
        '{"id":"a","msg":{"namespace":"","topic":"t"}}',
        '{"id":"a","msg":{"namespace":0,"topic":"t","data":"x"}}',
        '{"id":"a","msg":{"namespace":"","topic":"t","data":7}}',
        '{"id":"a","msg":{"namespace":"","topic":"t","binary":true,"data":"%%%"}}',
        '{"id":"a","msg":{"namespace":"","topic":"t","binary":true,"data":"A"}}',
        '{"id":"a","msg":{"namespace":"","topic":"t","data":"x"},"seq":NaN}',
        b"\xff\xfe\x00",
        "[" * 100_000,
    ],
)
def test_malformed_input_is_none(raw: str | bytes) -> None:
    """Anything that is not a valid envelope decodes to None."""
    assert decode_envelope(raw) is None


def test_binary_flag_uses_javascript_truthiness() -> None:
    """As in crossws, any truthy "binary" (even {} or "no") means base64."""
    for flag, expected in [
        ("{}", b"\x00"),
        ('"no"', b"\x00"),
        ("1", b"\x00"),
        ("0", "AA=="),
        ('""', "AA=="),
    ]:
        raw = f'{{"id":"a","msg":{{"namespace":"","topic":"t","binary":{flag},"data":"AA=="}}}}'
        decoded = decode_envelope(raw)
        assert decoded is not None and decoded.msg.data == expected


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), st.binary()))
def test_decode_never_raises_on_random_input(raw: str | bytes) -> None:
    """Random text and bytes never make decode raise."""
    assert decode_envelope(raw) is None or isinstance(decode_envelope(raw), Envelope)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(
    st.fixed_dictionaries(
        {
            "id": json_values,
            "msg": st.fixed_dictionaries(
                {},
                optional={
                    "namespace": json_values,
                    "topic": json_values,
                    "binary": json_values,
                    "data": json_values,
                },
            )
            | json_values,
        },
        optional={"seq": json_values, "exp": json_values},
    )
)
def test_decode_never_raises_on_wrong_types(document: object) -> None:
    """Envelopes with fields of the wrong types decode to None or to valid values."""
    decoded = decode_envelope(json.dumps(document))
    if decoded is not None:
        assert isinstance(decoded.id, str) and isinstance(decoded.msg.topic, str)
        assert isinstance(decoded.msg.data, (str, bytes))


@settings(max_examples=400)
@given(messages, st.data())
def test_decode_never_raises_on_mutated_envelopes(msg: SyncMessage, data: st.DataObject) -> None:
    """Valid envelopes with characters deleted, inserted or replaced never make decode raise."""
    text = encode_envelope("instance", msg)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(text)))
        action = data.draw(st.sampled_from(["delete", "insert", "replace", "truncate"]))
        char = data.draw(st.characters(codec=None))
        if action == "delete":
            text = text[:position] + text[position + 1 :]
        elif action == "insert":
            text = text[:position] + char + text[position:]
        elif action == "replace":
            text = text[:position] + char + text[position + 1 :]
        else:
            text = text[:position]
    decoded = decode_envelope(text)
    assert decoded is None or isinstance(decoded, Envelope)
    decode_envelope(text.encode("utf-8", "surrogatepass"))


_NODE_COMPARE = """
import { encodeEnvelope, decodeEnvelope } from "crossws/sync";
let input = "";
for await (const chunk of process.stdin) input += chunk;
const { encode, decode } = JSON.parse(input);
const fromB64 = (s) => Uint8Array.from(Buffer.from(s, "base64"));
const encoded = encode.map(([id, ns, topic, data, b64]) =>
  encodeEnvelope(id, { namespace: ns, topic, data: b64 === null ? data : fromB64(b64) }));
const decoded = decode.map((raw) => {
  const e = decodeEnvelope(raw);
  if (!e) return null;
  const d = e.msg.data;
  return [e.id, e.msg.namespace, e.msg.topic,
    typeof d === "string" ? d : null,
    typeof d === "string" ? null : Buffer.from(d).toString("base64")];
});
process.stdout.write(JSON.stringify({ encoded, decoded }));
"""


@pytest.mark.slow
def test_byte_for_byte_equal_to_crossws_in_node() -> None:
    """crossws 0.4.17 in Node encodes every sample exactly as we do, and decodes alike."""
    samples = [
        ("a", "", "t", "x"),
        ("id-1", "chat", "room.1", '{"type":"chat.message","text":"héllo"}'),
        ("z", "n\u2028s", "t\u0000", '\x01\x1f\x7f"\\/\t'),
        ("lone", "", "t", "\ud800 and \udfff and \ud83d\ude00"),
        ("emoji", "", "🎉", "日本語 ✓"),
        ("bin", "", "t", b"\x00\x01\xfe\xff" * 10),
        ("empty-bin", "", "t", b""),
    ]
    encode = [
        [
            i,
            ns,
            topic,
            data if isinstance(data, str) else None,
            base64.b64encode(data).decode() if isinstance(data, bytes) else None,
        ]
        for i, ns, topic, data in samples
    ]
    ours = [encode_envelope(i, SyncMessage(ns, topic, data)) for i, ns, topic, data in samples]
    raws = [
        *ours,
        "garbage",
        "{}",
        '{"id":"a","msg":{"namespace":"","topic":"t","binary":1,"data":" QU J D "}}',
        '{"id":"a","msg":{"namespace":"","topic":"t","binary":true,"data":"QUJD="}}',
        '{"id":"a","msg":{"namespace":"","topic":"t","binary":true,"data":"QQ"}}',
        '{"id":"a","msg":{"namespace":"","topic":"t","binary":[],"data":"QQ=="}}',
        '{"id":"a","msg":{"namespace":"","topic":"t","binary":true,"data":"Q-_="}}',
        '{"id":"a","msg":{"namespace":"","topic":"t","data":"x"},"seq":3,"exp":1.5}',
    ]
    result = run_node(_NODE_COMPARE, {"encode": encode, "decode": raws})
    assert result["encoded"] == ours
    mine = []
    for raw in raws:
        decoded = decode_envelope(raw)
        if decoded is None:
            mine.append(None)
            continue
        data = decoded.msg.data
        mine.append(
            [
                decoded.id,
                decoded.msg.namespace,
                decoded.msg.topic,
                data if isinstance(data, str) else None,
                base64.b64encode(data).decode() if isinstance(data, bytes) else None,
            ]
        )
    assert result["decoded"] == mine


def test_envelopes_in_the_layers_own_layout_read_as_the_json_decoder_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """decode_fields reads a layer's own envelopes by position; on every text, valid or
    broken, it agrees with the JSON decoder alone."""
    import random

    from crossws_channels import envelope

    rng = random.Random(5)
    chars = ["a", "Z", "0", '"', "\\", "\n", "\x01", "\u00e9", "\ud800", "\U0001f600", " ", "u"]

    def text(n: int) -> str:
        return "".join(rng.choice(chars) for _ in range(rng.randint(0, n)))

    by_layout = envelope._by_layout
    read_by_layout = 0
    for _ in range(5000):
        msg = SyncMessage(
            rng.choice(["", "ns", text(3)]),
            rng.choice(["g", "!x", text(6)]),
            rng.choice([text(40), rng.randbytes(5), ""]),
        )
        extras: dict[str, Any] = {}
        if rng.random() < 0.7:
            extras["seq"] = rng.choice([0, 1, 10**12])
        if rng.random() < 0.3:
            extras["expires"] = rng.choice([0.0, 12.5, 1.7e9 + rng.random(), -3.0, 1e300, 1e-7])
        if rng.random() < 0.2:
            extras["ask"] = True
        if rng.random() < 0.5:
            extras["sent"] = rng.choice([0, 1, 1796347133398386])
        raw = encode_frame(rng.choice(["abc123", "A", text(5)]), msg, **extras)
        if rng.random() < 0.3:
            at = rng.randrange(len(raw))
            raw = (
                raw[:at]
                + rng.choice(["", " ", "}", '"', ',"x":1', "\\u12", "0", "-"])
                + raw[at + 1 :]
            )
        fast = envelope.decode_fields(raw)
        monkeypatch.setattr(envelope, "_by_layout", lambda _: None)
        assert envelope.decode_fields(raw) == fast, raw
        monkeypatch.setattr(envelope, "_by_layout", by_layout)
        try:
            read_by_layout += by_layout(raw) is not None
        except ValueError:
            pass
    assert read_by_layout > 1000  # the layout's own path was taken, often
