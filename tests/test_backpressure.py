"""The limits of backpressure, in one process (the local driver, across threads and
loops): how long a pause lasts, what a stalled consumer loses, how it recovers, what a
driver that ignores backpressure gets. tests/contract/test_bursts.py runs the bursts
themselves on every driver."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from channels.exceptions import ChannelFull

from crossws_channels.drivers.base import Deliver, Ready
from crossws_channels.drivers.local import LocalDriver
from crossws_channels.errors import (
    ChannelStalled,
    ConfigurationError,
    DeafSubscription,
    MessagesDropped,
    MessagesLost,
)
from crossws_channels.layer import BackplaneChannelLayer
from tests.conftest import ErrorLog
from tests.loops import OtherLoop
from tests.waiting import eventually_async

CAPACITY = 100


@pytest.fixture
def other() -> Iterator[OtherLoop]:
    """A second event loop on its own thread."""
    loop = OtherLoop()
    yield loop
    loop.close()


async def collect(layer: BackplaneChannelLayer, channel: str, count: int, idle: float) -> list[int]:
    """The ``n`` of what arrives on ``channel``: ``count`` of them, or until ``idle`` s of
    silence."""
    received: list[int] = []
    while len(received) < count:
        try:
            message = await asyncio.wait_for(layer.receive(channel), idle)
        except asyncio.TimeoutError:
            break
        received.append(message["n"])
    return received


async def burst(layer: BackplaneChannelLayer, group: str, count: int) -> None:
    for n in range(count):
        await layer.group_send(group, {"type": "burst", "n": n})


async def in_group(other: OtherLoop, layer: BackplaneChannelLayer, group: str) -> str:
    """A channel of ``layer`` (homed on ``other``'s loop) in ``group``."""
    channel = await other.run(layer.new_channel())
    await other.run(layer.group_add(group, channel))
    return channel


async def test_a_stalled_channel_takes_messages_again_once_it_drained(
    make_layer: Any, other: OtherLoop
) -> None:
    """After ChannelFull for a channel nobody read, sends succeed again once its
    consumer has read: the owner tells the sender itself."""
    sender, owner = make_layer(backpressure=0.3), make_layer(backpressure=0.3)
    channel = await other.run(owner.new_channel())
    for n in range(CAPACITY):
        await sender.send(channel, {"type": "x", "n": n})
    with pytest.raises(ChannelFull):
        await sender.send(channel, {"type": "x", "n": -1})
    with pytest.raises(ChannelFull):
        await sender.send(channel, {"type": "x", "n": -1})  # at once, this time
    assert await other.run(collect(owner, channel, CAPACITY, 1.0)) == list(range(CAPACITY))

    async def accepted() -> bool:
        try:
            await sender.send(channel, {"type": "x", "n": 0})
        except ChannelFull:
            await asyncio.sleep(0.02)
            return False
        return True

    deadline = time.monotonic() + 2.0
    while not await accepted():
        assert time.monotonic() < deadline, "the drained channel never took a send again"
    for n in range(1, CAPACITY):
        await sender.send(channel, {"type": "x", "n": n})
    assert await other.run(collect(owner, channel, CAPACITY, 1.0)) == list(range(CAPACITY))


async def test_a_member_that_stops_reading_holds_relaying_at_most_backpressure_seconds(
    make_layer: Any, other: OtherLoop, errors: ErrorLog
) -> None:
    """A member that read, then stopped, holds up relaying to its instance for at most
    `backpressure` seconds; then it is stalled (reported once), loses what is beyond its
    capacity, and the other members get everything."""
    sender = make_layer(backpressure=0.5)
    receiver = make_layer(backpressure=0.5, on_error=errors)
    live = await in_group(other, receiver, "room")
    quitter = await in_group(other, receiver, "room")
    # The quitter reads once, so it counts as reading, then stops.
    await sender.group_send("room", {"type": "burst", "n": -1})
    assert await other.run(collect(receiver, quitter, 1, 2.0)) == [-1]
    assert await other.run(collect(receiver, live, 1, 2.0)) == [-1]
    collecting = other.submit(collect(receiver, live, 2_000, 3.0))
    started = time.monotonic()
    await burst(sender, "room", 2_000)
    assert await asyncio.wait_for(collecting, 30) == list(range(2_000))
    assert time.monotonic() - started < 5  # one pause of 0.5 s, not one per message
    stats = receiver.stats()
    assert stats["stalled"] == 1
    assert len(errors.of(ChannelStalled, "delivery")) == 1
    # It kept its capacity and the one message that took it over, in order.
    kept = await other.run(collect(receiver, quitter, 5_000, 0.3))
    assert kept == list(range(CAPACITY + 1))
    assert stats["dropped.full"] == 2_000 - CAPACITY - 1


class _Ignoring:
    """A deliver whose caller never sees backpressure."""

    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self.report = deliver.report
        self.connection_lost = deliver.connection_lost
        self.connection_made = deliver.connection_made

    def __call__(self, raw: str | bytes, /) -> None:
        self._deliver(raw)


class IgnoringDriver(LocalDriver):
    """A driver written before backpressure: it ignores what deliver returns."""

    async def listen(self, deliver: Deliver, ready: Ready, /) -> None:
        await super().listen(_Ignoring(deliver), ready)


async def test_a_driver_that_ignores_backpressure_keeps_working_and_drops_as_before(
    make_layer: Any, other: OtherLoop
) -> None:
    """Without a driver that waits, a full member drops what is beyond its capacity (and
    at most one message over it), every drop counted; nothing breaks."""
    sender, receiver = make_layer(driver=IgnoringDriver), make_layer(driver=IgnoringDriver)
    member = await in_group(other, receiver, "room")
    await other.run(collect(receiver, member, 1, 0.05))  # it has read: it is reading
    await burst(sender, "room", 1_000)

    def settled() -> bool:
        stats = receiver.stats()
        return stats.get("delivered", 0) + stats.get("dropped.full", 0) == 1_000

    await eventually_async(settled, what="every message delivered or dropped")
    received = await other.run(collect(receiver, member, 2_000, 0.3))
    assert received == sorted(received) and len(received) >= CAPACITY
    assert receiver.stats()["dropped.full"] == 1_000 - len(received)


async def test_backpressure_off_drops_for_full_members_and_never_refuses_remote_sends(
    make_layer: Any, other: OtherLoop, errors: ErrorLog
) -> None:
    """`backpressure: 0` is the behaviour of Channels' in-memory layer: a full member
    misses the message, and a send to another instance's channel is checked there."""
    sender = make_layer(backpressure=0)
    receiver = make_layer(backpressure=0, on_error=errors)
    member = await in_group(other, receiver, "room")
    await other.run(collect(receiver, member, 1, 0.05))
    await burst(sender, "room", 500)
    for n in range(200):
        await sender.send(member, {"type": "direct", "n": n})  # never raises
    await eventually_async(
        lambda: (
            receiver.stats().get("delivered", 0) + receiver.stats().get("dropped.full", 0) == 700
        ),
        what="every message delivered or dropped",
    )
    assert len(await other.run(collect(receiver, member, 1_000, 0.3))) == CAPACITY
    assert receiver.stats()["dropped.full"] == 700 - CAPACITY
    assert errors.of(MessagesDropped, "delivery")


async def test_a_pause_is_no_reason_to_call_the_subscription_deaf(
    make_layer: Any, other: OtherLoop, errors: ErrorLog
) -> None:
    """A subscription paused for a full consumer doesn't read its own heartbeat either;
    that is not a deaf subscription."""
    sender = make_layer(backpressure=1.5)
    receiver = make_layer(backpressure=1.5, heartbeat=0.1, on_error=errors)
    quitter = await in_group(other, receiver, "room")
    await sender.group_send("room", {"type": "burst", "n": -1})
    assert await other.run(collect(receiver, quitter, 1, 2.0)) == [-1]
    await burst(sender, "room", 500)
    await eventually_async(lambda: receiver.stats().get("stalled"), what="a stall")
    await asyncio.sleep(0.3)  # heartbeats after the pause come back
    assert errors.of(DeafSubscription) == []
    assert receiver.stats().get("deaf", 0) == 0


class Intruder(LocalDriver):
    """Publishes hand-made envelopes on the cluster, as anyone on the backplane could."""

    async def spoof(self, texts: Sequence[str]) -> None:
        await self.publish_batch([(None, text) for text in texts])


async def test_gaps_from_many_made_up_senders_are_reported_a_few_times(
    make_layer: Any, errors: ErrorLog
) -> None:
    """Messages with 5,000 made-up sender ids, each skipping numbers: the losses are
    counted, and reported in one or two reports, not one per sender."""
    layer = make_layer(on_error=errors)
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    intruder = Intruder("intruder0000", {"channel": layer.config.channel})
    texts = []
    for i in range(5_000):
        sender = f"spoof{i:07d}"
        for seq in (1, 3):  # 2 never comes
            texts.append(
                f'{{"id":"{sender}","msg":{{"namespace":"","topic":"room","binary":false,'
                f'"data":"{{\\"type\\":\\"x\\"}}"}},"seq":{seq}}}'
            )
    await intruder.spoof(texts)
    await eventually_async(lambda: layer.stats().get("lost") == 5_000, what="5,000 counted")
    await layer.close()
    reports = errors.of(MessagesLost, "delivery")
    assert 1 <= len(reports) <= 3
    assert sum(report.count for report in reports) == 5_000


@pytest.mark.parametrize("value", [-1, 11, "1", True, float("nan")])
def test_backpressure_must_be_a_number_of_seconds(value: object) -> None:
    """An invalid `backpressure` fails when the layer is built, naming the setting."""
    with pytest.raises(ConfigurationError, match="backpressure"):
        BackplaneChannelLayer(driver="local", channel="x", backpressure=value)
