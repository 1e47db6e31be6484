"""The redis driver through outages, on a private redis-server the tests kill and restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import pytest

from crossws_channels.drivers.redis import RedisDriver
from tests.drivers.collector import Collector
from tests.drivers.listening import listen
from tests.drivers.redis.support import kill_subscriber, paused, raw_client, subscribed, unique
from tests.servers import RedisServer
from tests.waiting import eventually_async

pytestmark = [pytest.mark.redis, pytest.mark.slow]

logger = logging.getLogger(__name__)


async def _until_relayed(url: str, channel: str, got: Collector, timeout: float = 10.0) -> float:
    """Publish probes every 20 ms until one arrives; return the seconds it took."""
    started = time.monotonic()
    async with raw_client(url, socket_connect_timeout=0.5) as raw:
        while True:
            probe = unique("probe").encode()
            # The server may not accept connections yet.
            with contextlib.suppress(Exception):
                await raw.publish(channel, probe)
            await asyncio.sleep(0.02)
            if probe in got.raw:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"nothing relayed within {timeout} s")


async def test_client_kill_of_the_subscribe_connection(redis_server: RedisServer) -> None:
    """After CLIENT KILL of its subscribe connection the driver reports the loss once,
    resubscribes, reports it is back once, and relays again."""
    channel = unique("c")
    instance = unique("killed")
    async with subscribed(redis_server.url, channel, instance) as (_driver, got):
        assert kill_subscriber(redis_server.url, instance) == 1
        await got.wait_for(lambda c: c.made == 1)
        took = await _until_relayed(redis_server.url, channel, got)
        assert len(got.lost) == 1
        assert got.made == 1
        logger.info("relaying resumed %.3f s after CLIENT KILL", took)


async def test_the_layer_logs_an_outage_once_and_its_end_once(
    make_layer: Any, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A killed subscription is one warning in the layer's log and one line when it is
    back, and the layer counts one reconnection."""
    caplog.set_level(logging.INFO, logger="crossws_channels")
    layer = make_layer(driver="redis", url=redis_server.url)
    await layer.new_channel()  # subscribes
    await eventually_async(lambda: layer.stats().get("subscribed") == 1, what="subscribed")
    assert kill_subscriber(redis_server.url, layer.instance_id) == 1
    await eventually_async(lambda: layer.stats().get("reconnects") == 1, what="reconnected")
    logged = [r for r in caplog.records if r.name == "crossws_channels"]
    assert [r.levelname for r in logged] == ["WARNING", "INFO"]
    assert "subscribe failed" in logged[0].getMessage()
    assert "subscription restored" in logged[1].getMessage()


async def test_restart_reports_once_and_resumes_within_two_seconds(
    redis_server: RedisServer,
) -> None:
    """A Redis restart with 1.5 s of downtime is one connection_lost and one
    connection_made, and relaying resumes within 2 s of Redis answering again."""
    channel = unique("c")
    async with subscribed(redis_server.url, channel) as (_driver, got):
        await _until_relayed(redis_server.url, channel, got)
        redis_server.stop()
        await got.wait_for(lambda c: len(c.lost) == 1)
        await asyncio.sleep(1.5)  # many reconnect attempts fail meanwhile
        assert len(got.lost) == 1
        assert got.made == 0
        await asyncio.to_thread(redis_server.start)  # returns once the port accepts
        took = await _until_relayed(redis_server.url, channel, got)
        print(f"\nrelaying resumed {took:.3f} s after the restarted Redis accepted connections")
        assert took < 2.0
        assert len(got.lost) == 1
        assert got.made == 1


async def test_every_outage_is_reported_once(redis_server: RedisServer) -> None:
    """Three outages in a row make three connection_lost/connection_made pairs."""
    channel = unique("c")
    async with subscribed(redis_server.url, channel) as (_driver, got):
        for outage in range(1, 4):
            await asyncio.to_thread(redis_server.restart, 0.3)
            await got.wait_for(lambda c, n=outage: c.made == n)
            await _until_relayed(redis_server.url, channel, got)
        assert len(got.lost) == 3
        assert got.made == 3


async def test_hung_server_is_noticed_by_the_health_check(redis_server: RedisServer) -> None:
    """A server that stops answering (SIGSTOP: the socket stays open) is declared lost
    after the idle PING goes unanswered, and the subscription recovers when it resumes."""
    channel = unique("c")
    url = f"{redis_server.url}?health_check_interval=1&socket_timeout=0.5"
    assert redis_server.process is not None
    async with subscribed(url, channel) as (_driver, got):
        started = time.monotonic()
        with paused(redis_server.process.pid):
            await got.wait_for(lambda c: len(c.lost) == 1, timeout=5)
            noticed = time.monotonic() - started
        assert noticed < 3.0
        await got.wait_for(lambda c: c.made == 1, timeout=10)
        await _until_relayed(redis_server.url, channel, got)


async def test_a_quiet_healthy_subscription_is_kept(redis_server: RedisServer) -> None:
    """A subscription with no traffic answers the watchdog's PINGs and is never given
    up, however many intervals pass."""
    channel = unique("c")
    url = f"{redis_server.url}?health_check_interval=1&socket_timeout=0.3"
    async with subscribed(url, channel) as (_driver, got):
        await asyncio.sleep(3.5)  # three PINGs, each answered within 0.3 s
        assert got.lost == []
        async with raw_client(redis_server.url) as raw:
            stats = await raw.info("commandstats")
        assert stats["cmdstat_ping"]["calls"] >= 3
        await _until_relayed(redis_server.url, channel, got)


async def test_publish_raises_while_down_and_works_after(redis_server: RedisServer) -> None:
    """While Redis is down publish() raises (the layer reports it); once it is back, the
    driver's pooled connections recover by themselves."""
    channel = unique("c")
    async with subscribed(redis_server.url, channel) as (driver, got):
        await driver.publish("before")
        redis_server.stop()
        with pytest.raises(Exception, match=r"(?i)connect"):
            await driver.publish("during")
        with pytest.raises(Exception, match=r"(?i)connect"):
            await driver.queue_pop("w", 0.1)
        await asyncio.to_thread(redis_server.start)
        await got.wait_for(lambda c: c.made == 1)
        await driver.publish("after")
        await got.wait_for(lambda c: b"after" in c.raw)
        assert b"during" not in got.raw
        assert await driver.queue_push("w", "job", 5, time.time() + 5)
        assert await driver.queue_pop("w", 1) == "job"


async def test_publish_to_a_hung_server_times_out_and_recovers(redis_server: RedisServer) -> None:
    """A publish to a server that stopped answering raises TimeoutError within the socket
    timeout instead of hanging, and once the server answers again publishing works."""
    channel = unique("c")
    url = f"{redis_server.url}?socket_timeout=0.5"
    assert redis_server.process is not None
    async with subscribed(redis_server.url, channel) as (_listener, got):
        driver = RedisDriver(unique("i"), {"channel": channel, "url": url})
        try:
            await driver.publish("before")
            with paused(redis_server.process.pid):
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await driver.publish_batch([(None, "during-1"), (None, "during-2")])
                assert time.monotonic() - started < 2.0
            await driver.publish("after")
            await got.wait_for(lambda c: b"after" in c.raw)
        finally:
            await driver.close()


async def test_pushes_go_on_after_the_server_forgot_the_script(
    redis_server: RedisServer,
) -> None:
    """After SCRIPT FLUSH (as after a restart) a push sends its script again, once, and
    every item is queued exactly once."""
    driver = RedisDriver(unique("i"), {"channel": unique("c"), "url": redis_server.url})
    try:
        assert await driver.queue_push("w", "one", 5, time.time() + 5)
        async with raw_client(redis_server.url) as raw:
            await raw.script_flush()
        assert await driver.queue_push("w", "two", 5, time.time() + 5)
        await driver.queue_return("w", "zero")
        assert [await driver.queue_pop("w", 1) for _ in range(3)] == ["zero", "one", "two"]
        assert await driver.queue_pop("w", 0) is None
    finally:
        await driver.close()


async def test_pops_survive_a_restart_between_calls(redis_server: RedisServer) -> None:
    """An idle pop connection broken by a restart is replaced before it is used again."""
    channel = unique("c")
    driver = RedisDriver(unique("i"), {"channel": channel, "url": redis_server.url})
    try:
        assert await driver.queue_pop("w", 0.05) is None
        await asyncio.to_thread(redis_server.restart)
        assert await driver.queue_push("w", "job", 5, time.time() + 5)
        assert await driver.queue_pop("w", 1) == "job"
    finally:
        await driver.close()


async def test_redis_down_at_start_then_up(redis_server: RedisServer) -> None:
    """subscribe() raises while Redis is down and succeeds once it is up."""
    redis_server.stop()
    channel = unique("c")
    driver = RedisDriver(unique("i"), {"channel": channel, "url": redis_server.url})
    got = Collector()
    try:
        with pytest.raises(Exception, match=r"(?i)connect"):
            await listen(driver, got)
        await asyncio.to_thread(redis_server.start)
        await listen(driver, got)
        await driver.publish("up")
        await got.wait_for(lambda c: c.raw == [b"up"])
        assert got.lost == []
        assert got.made == 0
    finally:
        await driver.close()


async def test_sync_callers_do_not_wait_out_every_failure_of_a_known_outage(
    redis_server: RedisServer, make_layer: Any, errors: Any
) -> None:
    """A view calling group_send through async_to_sync while Redis hangs: the first call
    waits for the socket timeout, the ones after it return at once (local delivery
    included), the outage is reported once, and relaying resumes when Redis answers."""
    from asgiref.sync import async_to_sync

    layer = make_layer(
        driver="redis", url=f"{redis_server.url}?socket_timeout=1", heartbeat=0, on_error=errors
    )
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    await layer.group_send("room", {"type": "before"})
    await eventually_async(lambda: layer.stats().get("published") == 1, what="relayed")
    assert redis_server.process is not None
    calls: list[float] = []

    def view() -> None:
        group_send = async_to_sync(layer.group_send)
        for n in range(20):
            started = time.monotonic()
            group_send("room", {"type": "during", "n": n})
            calls.append(time.monotonic() - started)

    with paused(redis_server.process.pid):
        await asyncio.get_running_loop().run_in_executor(None, view)
        got = [await asyncio.wait_for(layer.receive(channel), 1) for _ in range(21)]
    assert [m.get("n") for m in got[1:]] == list(range(20))
    # The first call waits for its write to fail (the socket timeout), the rest don't.
    assert calls[0] < 3 and sum(calls[1:]) < 1.0, calls
    assert len([e for e, stage in errors.calls if stage == "publish"]) == 1
    published = layer.stats()["published"]
    await layer.group_send("room", {"type": "after"})
    await eventually_async(lambda: layer.stats()["published"] > published, what="relaying again")
    assert layer.stats()["connected"]
