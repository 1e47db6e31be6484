"""The redis driver's worker-channel queues and flush, against the shared Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from crossws_channels.drivers.redis import RedisDriver
from tests.drivers.redis.support import raw_client, unique

pytestmark = pytest.mark.redis


@pytest.fixture
async def driver(redis_url: str) -> AsyncIterator[RedisDriver]:
    """A redis driver on a channel of its own (not subscribed: queues don't need it)."""
    made = RedisDriver(unique("i"), {"channel": unique("c"), "url": redis_url})
    try:
        yield made
    finally:
        await made.flush()
        await made.close()


def _soon(seconds: float = 30.0) -> float:
    return time.time() + seconds


async def test_fifo_and_timeout(driver: RedisDriver) -> None:
    """Items come out in the order they went in; an empty queue returns None after the
    timeout, and a zero timeout does not block."""
    for i in range(5):
        assert await driver.queue_push("jobs", f"job{i}", 100, _soon())
    assert [await driver.queue_pop("jobs", 1) for _ in range(5)] == [f"job{i}" for i in range(5)]
    started = time.monotonic()
    assert await driver.queue_pop("jobs", 0.3) is None
    assert 0.25 <= time.monotonic() - started < 1.5
    started = time.monotonic()
    assert await driver.queue_pop("jobs", 0) is None
    assert time.monotonic() - started < 0.5


async def test_pop_waits_for_a_push(driver: RedisDriver, redis_url: str) -> None:
    """A blocked pop returns an item pushed while it waits, from another instance."""
    other = RedisDriver(unique("i"), {"channel": driver.options.channel, "url": redis_url})
    try:
        waiting = asyncio.ensure_future(driver.queue_pop("jobs", 5))
        await asyncio.sleep(0.2)
        assert await other.queue_push("jobs", "late", 10, _soon())
        assert await asyncio.wait_for(waiting, 2) == "late"
    finally:
        await other.close()


async def test_long_pop_spans_several_blocking_slices(
    driver: RedisDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timeout longer than one BLPOP slice keeps waiting and still gets the item."""
    monkeypatch.setattr("crossws_channels.drivers.redis.queues.POP_SLICE", 0.2)
    waiting = asyncio.ensure_future(driver.queue_pop("jobs", 3))
    await asyncio.sleep(0.7)
    assert not waiting.done()
    assert await driver.queue_push("jobs", "late", 10, _soon())
    assert await asyncio.wait_for(waiting, 2) == "late"


async def test_capacity_is_atomic(driver: RedisDriver) -> None:
    """Concurrent pushes never exceed the capacity: exactly `capacity` are accepted."""
    results = await asyncio.gather(
        *(driver.queue_push("jobs", f"j{i}", 10, _soon()) for i in range(60))
    )
    assert results.count(True) == 10
    popped = [await driver.queue_pop("jobs", 0) for _ in range(11)]
    assert popped[-1] is None
    assert len(set(popped[:10])) == 10


async def test_each_item_goes_to_exactly_one_receiver(redis_url: str) -> None:
    """Two instances popping concurrently receive every item once between them."""
    channel = unique("c")
    a = RedisDriver(unique("a"), {"channel": channel, "url": redis_url})
    b = RedisDriver(unique("b"), {"channel": channel, "url": redis_url})
    received: list[str] = []

    async def receive(driver: RedisDriver) -> None:
        while (item := await driver.queue_pop("jobs", 0.5)) is not None:
            received.append(item)

    try:
        receivers = [asyncio.ensure_future(receive(d)) for d in (a, a, b, b)]
        for i in range(400):
            assert await a.queue_push("jobs", f"j{i}", 1000, _soon())
        await asyncio.gather(*receivers)
        assert sorted(received) == sorted(f"j{i}" for i in range(400))
    finally:
        await a.flush()
        await a.close()
        await b.close()


async def test_queue_keys_expire(driver: RedisDriver, redis_url: str) -> None:
    """The list key carries a TTL as long as its newest item's expiry, never forever."""
    assert await driver.queue_push("jobs", "a", 10, _soon(5))
    assert await driver.queue_push("jobs", "b", 10, _soon(20))
    assert await driver.queue_push("jobs", "c", 10, _soon(10))
    async with raw_client(redis_url) as raw:
        ttl = await raw.pttl(driver.names.queue("jobs"))
    assert 15_000 < ttl <= 20_000


async def test_expired_items_do_not_count_against_capacity(driver: RedisDriver) -> None:
    """Items past their expiry are purged by the next push, which then fits."""
    assert await driver.queue_push("jobs", "stale", 1, time.time() + 0.2)
    assert not await driver.queue_push("jobs", "fresh", 1, _soon())
    await asyncio.sleep(0.3)
    assert await driver.queue_push("jobs", "fresh", 1, _soon())
    assert await driver.queue_pop("jobs", 0) == "fresh"


async def test_returned_item_goes_back_to_the_head(driver: RedisDriver, redis_url: str) -> None:
    """queue_return puts an item back first in line, keeping the key alive for it."""
    for item in ("first", "second"):
        assert await driver.queue_push("jobs", item, 10, _soon(20))
    assert await driver.queue_pop("jobs", 0) == "first"
    assert await driver.queue_pop("jobs", 0) == "second"
    await driver.queue_return("jobs", "second")
    async with raw_client(redis_url) as raw:
        ttl = await raw.pttl(driver.names.queue("jobs"))
    assert 15_000 < ttl <= 20_000
    assert await driver.queue_push("jobs", "third", 10, _soon())
    assert await driver.queue_pop("jobs", 0) == "second"
    assert await driver.queue_pop("jobs", 0) == "third"


async def test_returned_item_of_unknown_origin(driver: RedisDriver, redis_url: str) -> None:
    """An item the driver did not pop itself still goes back, with a bounded TTL."""
    await driver.queue_return("jobs", "stray")
    async with raw_client(redis_url) as raw:
        ttl = await raw.pttl(driver.names.queue("jobs"))
    assert 0 < ttl <= 60_000
    assert await driver.queue_pop("jobs", 0) == "stray"


async def test_items_are_opaque_text(driver: RedisDriver) -> None:
    """Items with colons, digits, non-ASCII and megabytes come back unchanged."""
    items = ["123:456", ":", "", "žluť 🐎", "x" * (2 * 1024 * 1024)]
    for item in items:
        assert await driver.queue_push("jobs", item, 10, _soon())
    assert [await driver.queue_pop("jobs", 1) for _ in items] == items


async def test_a_blocked_pop_does_not_hold_up_publishes(driver: RedisDriver) -> None:
    """While several pops wait on empty queues, publishes go through at once."""
    pops = [asyncio.ensure_future(driver.queue_pop(f"idle{i}", 3)) for i in range(4)]
    await asyncio.sleep(0.2)
    started = time.monotonic()
    for _ in range(20):
        await driver.publish("x")
    await driver.queue_push("other", "job", 10, _soon())
    assert time.monotonic() - started < 1.0
    assert not any(pop.done() for pop in pops)
    for pop in pops:
        pop.cancel()
    await asyncio.gather(*pops, return_exceptions=True)


async def test_worker_channels_of_other_clusters_are_separate(redis_url: str) -> None:
    """A worker channel of the same name in another cluster is another queue."""
    a = RedisDriver(unique("i"), {"channel": unique("c"), "url": redis_url})
    b = RedisDriver(unique("i"), {"channel": unique("c"), "url": redis_url})
    try:
        assert await a.queue_push("jobs", "for-a", 10, _soon())
        assert await b.queue_pop("jobs", 0.2) is None
        assert await a.queue_pop("jobs", 0) == "for-a"
    finally:
        await a.close()
        await b.close()


async def test_flush_deletes_only_this_clusters_keys(redis_url: str) -> None:
    """flush() removes this cluster's queues and leaves every other key alone: another
    cluster's, one whose channel extends this one's, and the application's own."""
    base = unique("c")
    channels = [base, f"{base}:queue", f"{base}*", "*" + base]
    drivers = [RedisDriver(unique("i"), {"channel": c, "url": redis_url}) for c in channels]
    own_key = f"{base}:user-data"
    async with raw_client(redis_url) as raw:
        try:
            await raw.set(own_key, "keep", ex=60)
            for driver in drivers:
                for queue in ("jobs", "thumbs"):
                    assert await driver.queue_push(queue, "x", 10, _soon())
            await drivers[0].flush()
            assert await raw.exists(drivers[0].names.queue("jobs")) == 0
            assert await raw.exists(drivers[0].names.queue("thumbs")) == 0
            for driver in drivers[1:]:
                assert await raw.exists(driver.names.queue("jobs")) == 1
            assert await raw.get(own_key) == b"keep"
        finally:
            await raw.delete(own_key)
            for driver in drivers:
                await driver.flush()
                await driver.close()


async def test_flush_handles_many_keys(driver: RedisDriver, redis_url: str) -> None:
    """flush() pages through SCAN until every key of the cluster is gone."""
    for i in range(2500):
        await driver.queue_push(f"q{i}", "x", 1, _soon())
    await driver.flush()
    async with raw_client(redis_url) as raw:
        left = [key async for key in raw.scan_iter(match=driver.names.key_pattern, count=1000)]
    assert left == []
