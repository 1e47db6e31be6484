"""What arrives from the backplane is bounded: a rogue publisher on the cluster's Redis
channel can't make the layer decode an oversized envelope, poison the loss counters with
forged sequence numbers, or hand consumers msgpack extension objects."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest
import redis.asyncio as redis_py

from crossws_channels import serialize
from crossws_channels._frames import GROUPS, pack_groups, unpack_groups
from crossws_channels._inbound import envelope_limit
from crossws_channels.envelope import SyncMessage, encode_envelope, encode_frame
from crossws_channels.errors import MalformedMessage
from tests.conftest import ErrorLog
from tests.waiting import eventually_async

pytestmark = pytest.mark.redis


async def subscribed_member(make_layer: Any, redis_url: str, errors: ErrorLog) -> Any:
    """A layer on Redis with one member of group ``room``, once it is subscribed."""
    layer = make_layer(driver="redis", url=redis_url, on_error=errors)
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    await eventually_async(lambda: layer.stats().get("subscribed") == 1, what="subscribed")
    return layer, channel


async def rogue_publish(redis_url: str, channel: str, *envelopes: str | bytes) -> None:
    client = redis_py.Redis.from_url(redis_url)
    try:
        for envelope in envelopes:
            await client.publish(channel, envelope)
    finally:
        await client.aclose()


def numbered(sender: str, seq: int, message: dict[str, Any]) -> str:
    return encode_frame(sender, SyncMessage("", "room", serialize.dumps(message)), seq=seq)


def test_the_bound_leaves_room_for_the_largest_real_envelope() -> None:
    """A message of exactly max_message_size, of the content escaping grows most, makes an
    envelope within the bound."""
    size = 64 * 1024
    for filler in ('"', "\\", "\x01", "\U0001f600"):
        text = filler * size
        while serialize.payload_size(serialize.dumps({"type": "x", "v": text})) > size:
            text = text[: len(text) * 9 // 10]
        envelope = encode_envelope(
            "abcdefghijkl", SyncMessage("", "room", serialize.dumps({"type": "x", "v": text}))
        )
        assert len(envelope) <= envelope_limit(size), filler
    binary = serialize.dumps({"type": "x", "v": b"\xff" * (size - 64)})
    assert len(encode_envelope("abcdefghijkl", SyncMessage("", "room", binary))) <= envelope_limit(
        size
    )


async def test_an_oversized_envelope_is_dropped_before_decoding(
    make_layer: Any, redis_url: str, errors: ErrorLog
) -> None:
    """An envelope past the bound (here 20 MiB, max_message_size being 1 MiB) is dropped,
    counted and reported once, and what follows is delivered."""
    layer, channel = await subscribed_member(make_layer, redis_url, errors)
    huge = numbered("rogue1234567", 1, {"type": "huge", "blob": "x" * (20 * 1024 * 1024)})
    after = numbered("rogue1234567", 2, {"type": "after"})
    await rogue_publish(redis_url, layer.config.channel, huge, after)
    assert (await asyncio.wait_for(layer.receive(channel), 5))["type"] == "after"
    assert layer.stats()["dropped.oversized"] == 1
    assert "dropped.malformed" not in layer.stats()
    await eventually_async(lambda: errors.of(MalformedMessage, "delivery"), what="a report")
    (report,) = errors.of(MalformedMessage, "delivery")
    assert "over the" in str(report) and "max_message_size" in str(report)


async def test_forged_sequence_numbers_do_not_count_as_loss(
    make_layer: Any, redis_url: str, errors: ErrorLog
) -> None:
    """A sender's number jumping to near 2**64 is not counted as lost messages, is reported
    in one aggregated report, and does not hide the sender's real gaps afterwards."""
    layer, channel = await subscribed_member(make_layer, redis_url, errors)
    sender = "spoofed12345"
    forged = [numbered(sender, 2**64 - n, {"type": "forged"}) for n in range(1, 51)]
    await rogue_publish(
        redis_url,
        layer.config.channel,
        numbered(sender, 1, {"type": "first"}),
        *forged,
        numbered(sender, 5, {"type": "fifth"}),  # 2, 3 and 4 never came: a real gap
    )
    got = [(await asyncio.wait_for(layer.receive(channel), 5))["type"] for _ in range(52)]
    assert got[0] == "first" and got[-1] == "fifth"
    stats = layer.stats()
    assert stats["implausible_seq"] == 50
    assert stats["lost"] == 3

    def reported() -> int:
        return sum(int(str(r).split()[0]) for r in errors.of(MalformedMessage, "delivery"))

    # The first at once, the rest together a moment later: one sender, a handful of reports.
    await eventually_async(lambda: reported() == 50, what="all 50 reported")
    reports = errors.of(MalformedMessage, "delivery")
    assert len(reports) <= 2 and all(sender in str(r) for r in reports)


def test_msgpack_extension_types_are_refused() -> None:
    """Timestamps and other extension types are not message values: decoding refuses them."""
    for value in (msgpack.Timestamp(1, 0), msgpack.ExtType(5, b"x"), msgpack.ExtType(5, b"")):
        data = serialize.BINARY_MARKER + msgpack.packb({"type": "x", "v": value})
        with pytest.raises(ValueError, match="ext"):
            serialize.loads(data)
    fine = serialize.dumps({"type": "x", "v": b"\x00"})
    assert serialize.loads(fine) == {"type": "x", "v": b"\x00"}


async def test_a_relayed_extension_type_never_reaches_a_consumer(
    make_layer: Any, redis_url: str, errors: ErrorLog
) -> None:
    """A message carrying a msgpack Timestamp is dropped and reported, not delivered."""
    layer, channel = await subscribed_member(make_layer, redis_url, errors)
    poisoned = serialize.BINARY_MARKER + msgpack.packb({"type": "t", "at": msgpack.Timestamp(1, 0)})
    await rogue_publish(
        redis_url,
        layer.config.channel,
        encode_frame("rogue1234567", SyncMessage("", "room", poisoned), seq=1),
        numbered("rogue1234567", 2, {"type": "after"}),
    )
    assert (await asyncio.wait_for(layer.receive(channel), 5)) == {"type": "after"}
    assert layer.stats()["dropped.malformed"] == 1


def several(sender: str, seq: int | None, data: str | bytes) -> str:
    return encode_frame(sender, SyncMessage("", GROUPS, data), seq=seq)


def test_a_message_to_several_groups_unpacks_to_what_was_packed() -> None:
    """Text and binary messages, and the refusal of data that isn't groups + a message."""
    for payload in (serialize.dumps({"type": "t"}), serialize.dumps({"type": "t", "b": b"\n"})):
        assert unpack_groups(pack_groups(["a", "b.c"], payload)) == (["a", "b.c"], payload)
    for bad in ("", "[1]\n{}", '{"a": 1}\n{}', '["a"]', b"not json\n", '["a"\n]'):
        with pytest.raises(ValueError, match="not a list of groups"):
            unpack_groups(bad)


async def test_malformed_messages_to_several_groups_are_dropped_and_reported_once(
    make_layer: Any, redis_url: str, errors: ErrorLog
) -> None:
    """Un-numbered (not from a layer), group names that are not valid, a list that is
    not one: each dropped and counted, reported in one report, and what follows arrives."""
    layer, channel = await subscribed_member(make_layer, redis_url, errors)
    message = serialize.dumps({"type": "bad"})
    bad = [
        several("rogue1234567", None, pack_groups(["room"], message)),
        several("rogue1234567", 1, pack_groups(["room", "no spaces"], message)),
        several("rogue1234567", 2, "[] but not json\n{}"),
        several("rogue1234567", 3, pack_groups([], message)),
    ]
    good = several("rogue1234567", 4, pack_groups(["room"], serialize.dumps({"type": "good"})))
    await rogue_publish(redis_url, layer.config.channel, *bad, good)
    assert (await asyncio.wait_for(layer.receive(channel), 5))["type"] == "good"
    assert layer.stats()["dropped.malformed"] == 4
    await eventually_async(lambda: errors.of(MalformedMessage, "delivery"), what="a report")
    assert len(errors.of(MalformedMessage, "delivery")) == 1
