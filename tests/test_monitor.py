"""Seeing into the relay: sequence gaps, deaf-subscription heartbeats, pings, resync."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from crossws_channels.drivers import local
from crossws_channels.drivers.base import Outgoing
from crossws_channels.drivers.local import LocalDriver
from crossws_channels.errors import DeafSubscription, MessagesLost
from tests.conftest import ErrorLog


class LossyDriver(LocalDriver):
    """The local driver, losing every third broadcast on the way (as a flaky network would)."""

    def __init__(self, instance_id: str, options: Any) -> None:
        super().__init__(instance_id, options)
        self.sent = 0

    async def _post(self, batch: Sequence[Outgoing]) -> None:
        kept = []
        for target, text in batch:
            if target is None and '"topic":"room"' in text:
                self.sent += 1
                if self.sent % 3 == 0:
                    continue
            kept.append((target, text))
        await super()._post(kept)


def silence(layer: Any) -> None:
    """Unsubscribe a layer's local-driver subscription behind the driver's back."""
    with local._lock:
        local._clusters[layer.config.channel].subscribers.pop(layer.instance_id)


async def test_gaps_in_a_senders_numbering_are_counted_and_reported(
    make_layer: Any, errors: ErrorLog
) -> None:
    """Messages lost in transit show up as a per-sender count and a delivery report."""
    a = make_layer(driver=LossyDriver)
    b = make_layer(driver=LossyDriver, on_error=errors)
    theirs = await b.new_channel()
    await b.group_add("room", theirs)
    for n in range(30):
        await a.group_send("room", {"type": "n", "n": n})
    received = []
    while True:
        try:
            received.append((await asyncio.wait_for(b.receive(theirs), 0.3))["n"])
        except asyncio.TimeoutError:
            break
    assert len(received) == 20
    stats = b.stats()
    # The first message starts the count, so only gaps after it are seen: 9 of 10.
    assert stats["lost"] == 9
    assert stats["lost_by_sender"] == {a.instance_id: 9}
    reported = errors.of(MessagesLost, "delivery")
    assert reported and all(error.sender == a.instance_id for error in reported)


async def test_no_gaps_on_a_lossless_relay(make_layer: Any) -> None:
    """A relay that loses nothing reports no loss, across groups, heartbeats and pings."""
    a, b = make_layer(heartbeat=0.1), make_layer(heartbeat=0.1)
    theirs = await b.new_channel()
    await b.group_add("room", theirs)
    for n in range(50):
        await a.group_send("room", {"type": "n", "n": n})
        await a.group_send("elsewhere", {"type": "n", "n": n})
        await b.receive(theirs)
    await a.ping(0.1)
    await asyncio.sleep(0.3)
    assert b.stats().get("lost", 0) == 0


async def test_a_deaf_subscription_is_detected_and_repaired(
    make_layer: Any, errors: ErrorLog
) -> None:
    """A silenced subscription misses its heartbeat, is reported, and is renewed."""
    a = make_layer()
    b = make_layer(heartbeat=0.2, on_error=errors)
    theirs = await b.new_channel()
    await b.group_add("room", theirs)
    silence(b)
    await a.group_send("room", {"type": "lost"})  # b is deaf: this one can't arrive
    for _ in range(60):
        if b.stats().get("reconnects"):
            break
        await asyncio.sleep(0.05)
    deaf = errors.of(DeafSubscription, "subscribe")
    assert len(deaf) == 1
    assert b.stats()["deaf"] == 1 and b.stats()["reconnects"] == 1
    await a.group_send("room", {"type": "after-repair"})
    assert await asyncio.wait_for(b.receive(theirs), 2) == {"type": "after-repair"}


async def test_resync_type_tells_local_channels_after_an_outage(make_layer: Any) -> None:
    """With resync_type, every local channel gets that message once the relay is back."""
    layer = make_layer(heartbeat=0.2, resync_type="relay.resync")
    one, two = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("room", one)
    waiting = asyncio.ensure_future(layer.receive(two))
    await asyncio.sleep(0)
    silence(layer)
    assert await asyncio.wait_for(waiting, 3) == {"type": "relay.resync"}
    assert await asyncio.wait_for(layer.receive(one), 1) == {"type": "relay.resync"}


async def test_no_resync_without_the_setting(make_layer: Any) -> None:
    """resync_type is off by default: consumers without a handler get nothing new."""
    layer = make_layer(heartbeat=0.2)
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    silence(layer)
    for _ in range(60):
        if layer.stats().get("reconnects"):
            break
        await asyncio.sleep(0.05)
    assert layer.stats()["reconnects"] == 1
    assert layer.stats()["queued"] == 0


async def test_ping_is_answered_by_every_live_instance(make_layer: Any) -> None:
    """A ping comes back from this instance and every other one, with stats on request."""
    a, b, c = make_layer(), make_layer(), make_layer()
    for layer in (b, c):
        await layer.new_channel()
    pongs = await a.ping(0.3, stats=True)
    assert {pong.instance_id for pong in pongs} == {a.instance_id, b.instance_id, c.instance_id}
    for pong in pongs:
        assert pong.rtt < 0.3
        assert pong.info["stats"]["instance_id"] == pong.instance_id
        assert pong.info["pid"] > 0


async def test_ping_of_another_cluster_sees_only_itself(make_layer: Any) -> None:
    """Instances of another channel don't answer."""
    a = make_layer(channel="ping-one")
    b = make_layer(channel="ping-two")
    await b.new_channel()
    assert [pong.instance_id for pong in await a.ping(0.2)] == [a.instance_id]
