"""Every counter of stats() moves when its event happens."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest

from crossws_channels import _outbox
from crossws_channels.drivers.base import Deliver, Ready
from crossws_channels.drivers.local import LocalDriver
from crossws_channels.errors import BackplaneOverloaded, MessageTooLarge
from tests.conftest import ErrorLog
from tests.test_semantics import DownDriver, StalledDriver


class ReconnectingDriver(LocalDriver):
    """The local driver, whose ``deliver`` a test can tell of a lost and regained
    subscription, as the layer's supervisor does for a network driver."""

    last: ClassVar[ReconnectingDriver | None] = None
    deliver: Deliver

    async def listen(self, deliver: Deliver, ready: Ready, /) -> None:
        self.deliver = deliver
        ReconnectingDriver.last = self
        await super().listen(deliver, ready)


async def test_traffic_counters(make_layer: Any) -> None:
    """published, relayed_in and delivered count what moves."""
    a, b = make_layer(), make_layer()
    mine, theirs = await a.new_channel(), await b.new_channel()
    await a.group_add("room", mine)
    await b.group_add("room", theirs)
    await a.group_send("room", {"type": "x"})
    await a.send(theirs, {"type": "direct"})
    await asyncio.wait_for(b.receive(theirs), 2)
    await asyncio.wait_for(b.receive(theirs), 2)
    stats_a, stats_b = a.stats(), b.stats()
    assert stats_a["published"] == 2
    assert stats_a["delivered"] == 1  # its own member
    assert stats_b["relayed_in"] == 2
    assert stats_b["delivered"] == 2
    assert stats_a["instance_id"] == a.instance_id and stats_a["driver"] == "local"
    assert stats_a["connected"] is True


async def test_drop_counters(make_layer: Any, errors: ErrorLog) -> None:
    """dropped.full, dropped.expired and refused.too_large, with errors.delivery."""
    layer = make_layer(capacity=1, expiry=0.2, max_message_size=100, on_error=errors)
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    await layer.group_send("room", {"type": "1"})
    await layer.group_send("room", {"type": "2"})  # full
    with pytest.raises(MessageTooLarge):
        await layer.send(channel, {"type": "big", "x": "y" * 200})
    await asyncio.sleep(0.4)  # "1" expires unread
    stats = layer.stats()
    assert stats["dropped.full"] == 1
    assert stats["dropped.expired"] == 1
    assert stats["refused.too_large"] == 1
    assert stats["errors.delivery"] == 2


async def test_backplane_failure_counters(make_layer: Any, errors: ErrorLog) -> None:
    """dropped.publish, errors.publish and errors.subscribe count a down backplane."""
    layer = make_layer(driver=DownDriver, on_error=errors)
    for _ in range(3):
        await layer.group_send("room", {"type": "x"})
    await asyncio.sleep(0.3)
    stats = layer.stats()
    assert stats["dropped.publish"] == 3
    assert stats["errors.publish"] >= 1  # a failed write loses what it carried
    assert stats["errors.subscribe"] >= 2
    assert stats.get("subscribed", 0) == 0
    assert stats["connected"] is False


async def test_connection_counters(make_layer: Any) -> None:
    """subscribed (each time the subscription came up), disconnects (each time an
    established one broke) and reconnects (each outage that ended) follow the
    subscription's events; a failure during an outage only counts as an error."""
    layer = make_layer(driver=ReconnectingDriver)
    await layer.new_channel()
    driver = ReconnectingDriver.last
    assert driver is not None
    driver.deliver.connection_lost(ConnectionResetError("gone"))
    assert layer.stats()["connected"] is False
    driver.deliver.connection_lost(ConnectionResetError("still gone"))  # same outage
    driver.deliver.connection_made()
    stats = layer.stats()
    assert (stats["subscribed"], stats["disconnects"], stats["reconnects"]) == (2, 1, 1)
    assert stats["errors.subscribe"] == 2
    assert stats["connected"] is True


async def test_overload_counter(
    make_layer: Any, errors: ErrorLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages that can't be relayed in time are dropped, counted and reported."""
    monkeypatch.setattr(_outbox, "HIGH_WATER", 5)
    monkeypatch.setattr(_outbox, "ROOM_TIMEOUT", 0.1)
    layer = make_layer(driver=StalledDriver, on_error=errors)
    for n in range(20):
        await layer.group_send("room", {"type": "n", "n": n})
    assert layer.stats()["dropped.overloaded"] > 0
    assert errors.of(BackplaneOverloaded, "publish")


async def test_sizes(make_layer: Any) -> None:
    """channels, queued, receivers, groups and memberships describe what is held now."""
    layer = make_layer()
    one, two = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("a", one)
    await layer.group_add("b", one)
    await layer.group_add("b", two)
    await layer.send(one, {"type": "x"})
    waiting = asyncio.ensure_future(layer.receive(two))
    await asyncio.sleep(0)
    stats = layer.stats()
    assert (stats["channels"], stats["queued"], stats["receivers"]) == (2, 1, 1)
    assert (stats["groups"], stats["memberships"]) == (2, 3)
    waiting.cancel()


def test_counts_from_the_home_loop_and_from_threads_add_up() -> None:
    """What the subscription counts without a lock and what any thread counts with one
    show as one number."""
    import threading

    from crossws_channels._reporting import Stats

    stats = Stats()

    def count() -> None:
        for _ in range(1000):
            stats.incr("delivered")

    threads = [threading.Thread(target=count) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(1000):
        stats.incr_home("delivered")
        stats.incr_home("relayed_in", 2)
    for thread in threads:
        thread.join()
    assert stats.snapshot() == {"delivered": 5000, "relayed_in": 2000}


def test_home_counters_show_once_counted() -> None:
    """The relay's per-message counters are there from the start, at zero: stats()
    shows them only once something was counted, as for any other counter."""
    from crossws_channels._reporting import Stats

    stats = Stats()
    assert stats.snapshot() == {}
    stats.home["delivered"] += 3
    stats.incr_home("published")
    stats.incr_home("something.else", 2)
    assert stats.snapshot() == {"delivered": 3, "published": 1, "something.else": 2}
