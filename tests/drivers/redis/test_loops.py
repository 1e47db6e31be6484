"""The redis driver on many short-lived event loops: nothing may leak from one to the next."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from crossws_channels.drivers.redis import RedisDriver
from tests.drivers.collector import Collector
from tests.drivers.listening import listen
from tests.drivers.redis.support import client_list, named, unique

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CYCLES = 2000


@pytest.mark.timeout(300)
def test_create_publish_close_on_fresh_loops_leaks_nothing(redis_url: str) -> None:
    """Thousands of create-subscribe-publish-close cycles, each on its own asyncio.run
    loop, leave no connection open in CLIENT LIST and no task behind."""
    token = unique("cycle")
    channel = unique("c")
    leftovers: list[set[asyncio.Task[object]]] = []

    async def cycle(i: int) -> None:
        driver = RedisDriver(f"{token}-{i}", {"channel": channel, "url": redis_url})
        got = Collector()
        await listen(driver, got)
        await driver.publish(f"m{i}")
        if i % 10 == 0:
            await driver.queue_pop("jobs", 0)
        await got.wait_for(lambda c: len(c.raw) == 1)
        await driver.close()
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        if tasks:
            leftovers.append(tasks)

    baseline = len(client_list(redis_url))
    started = time.monotonic()
    for i in range(CYCLES):
        asyncio.run(cycle(i))
        if i == CYCLES // 2:
            assert client_list(redis_url, named(token)) == []
    elapsed = time.monotonic() - started
    gc.collect()
    after = len(client_list(redis_url))
    print(
        f"\n{CYCLES} fresh-loop cycles in {elapsed:.1f} s; CLIENT LIST: {baseline} before, "
        f"{after} after (the shared server has other clients), "
        f"{len(client_list(redis_url, named(token)))} of this test's"
    )
    assert leftovers == []
    assert client_list(redis_url, named(token)) == []
    # Other sessions use the shared server too: allow for their churn, not for a leak,
    # which would be thousands.
    assert after <= baseline + 20


def test_a_client_object_serves_drivers_on_successive_loops(redis_url: str) -> None:
    """One client object in CONFIG serves drivers built on one loop after another (as the
    layer does when its loop ends): the driver copies its settings and never uses it,
    so nothing is tied to a dead loop, and the client itself opens nothing."""
    import redis.asyncio

    name = unique("shared-client")
    client = redis.asyncio.Redis.from_url(redis_url, client_name=name)
    channel = unique("c")

    async def cycle(i: int) -> None:
        driver = RedisDriver(unique("i"), {"channel": channel, "client": client})
        got = Collector()
        await listen(driver, got)
        await driver.publish(f"m{i}")
        assert await driver.queue_push("jobs", f"j{i}", 10, time.time() + 10)
        assert await driver.queue_pop("jobs", 1) == f"j{i}"
        await got.wait_for(lambda c: c.raw == [f"m{i}".encode()])
        await driver.close()

    for i in range(5):
        asyncio.run(cycle(i))
    assert client_list(redis_url, named(name)) == []
    pool = client.connection_pool
    assert not pool._available_connections
    assert not pool._in_use_connections
