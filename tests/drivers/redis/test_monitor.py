"""Monitoring over a real Redis: a silenced subscription is caught, lost messages counted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from crossws_channels.errors import DeafSubscription, MessagesLost
from tests.conftest import ErrorLog
from tests.drivers.redis.support import kill_subscriber
from tests.waiting import eventually_async

pytestmark = pytest.mark.redis


async def test_an_unsubscribed_connection_is_detected_and_renewed(
    make_layer: Any, redis_url: str, errors: ErrorLog
) -> None:
    """UNSUBSCRIBE sent on the driver's connection behind its back: the heartbeat notices
    the silence, it is reported once, and a new subscription relays again."""
    a = make_layer(driver="redis", url=redis_url)
    b = make_layer(driver="redis", url=redis_url, heartbeat=0.3, on_error=errors)
    theirs = await b.new_channel()
    await b.group_add("room", theirs)
    await a.group_send("room", {"type": "before"})
    assert await asyncio.wait_for(b.receive(theirs), 2) == {"type": "before"}

    # No server command unsubscribes another client: reach the driver's own connection
    # (the failure a proxy that lost the subscription causes).
    subscription = b._backplane._driver._subscription
    await subscription._connection.send_command("UNSUBSCRIBE")  # connected, not listening
    await a.group_send("room", {"type": "unheard"})
    await eventually_async(lambda: b.stats().get("reconnects"))
    assert len(errors.of(DeafSubscription, "subscribe")) == 1
    assert b.stats()["deaf"] == 1
    assert b._backplane._driver._subscription is not subscription  # subscribed anew
    await a.group_send("room", {"type": "after"})
    assert await asyncio.wait_for(b.receive(theirs), 2) == {"type": "after"}
    assert b.stats()["lost"] >= 1  # "unheard" is seen as a gap in a's numbering


async def test_messages_lost_in_an_outage_are_counted_exactly(
    make_layer: Any, redis_url: str, errors: ErrorLog
) -> None:
    """A subscriber whose connection is killed while a peer keeps publishing counts
    exactly the messages it never got."""
    a = make_layer(driver="redis", url=redis_url)
    b = make_layer(driver="redis", url=redis_url, on_error=errors)
    theirs = await b.new_channel()
    await b.group_add("room", theirs)
    received: list[int] = []

    async def consume() -> None:
        while True:
            received.append((await b.receive(theirs))["n"])

    consumer = asyncio.ensure_future(consume())
    sent = 0
    for _ in range(20):
        await a.group_send("room", {"type": "n", "n": sent})
        sent += 1
        await asyncio.sleep(0.005)
    assert kill_subscriber(redis_url, b.instance_id) == 1
    for _ in range(100):
        await a.group_send("room", {"type": "n", "n": sent})
        sent += 1
        await asyncio.sleep(0.005)
    await eventually_async(lambda: b.stats().get("reconnects"))
    await asyncio.sleep(0.1)
    await a.group_send("room", {"type": "n", "n": sent})  # a last one reveals any tail gap
    sent += 1
    await eventually_async(lambda: received and received[-1] == sent - 1)
    consumer.cancel()
    missing = sent - len(received)
    assert missing > 0
    assert b.stats()["lost"] == missing
    assert b.stats()["lost_by_sender"] == {a.instance_id: missing}
    assert sum(error.count for error in errors.of(MessagesLost, "delivery")) <= missing
