"""BackplaneChannelLayer on the redis driver through outages of a private redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from crossws_channels.layer import BackplaneChannelLayer
from tests.drivers.redis.support import unique
from tests.servers import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

Reports = list[tuple[str, str]]


@asynccontextmanager
async def layers(
    url: str, count: int
) -> AsyncIterator[tuple[list[BackplaneChannelLayer], Reports]]:
    """``count`` layers of one fresh cluster on ``url``, and the (error, stage) reports
    their ``on_error`` hook received."""
    reports: Reports = []

    def on_error(error: Exception, stage: str) -> None:
        reports.append((type(error).__name__, stage))

    channel = unique("c")
    made = [
        BackplaneChannelLayer(driver="redis", channel=channel, url=url, on_error=on_error)
        for _ in range(count)
    ]
    try:
        yield made, reports
    finally:
        for layer in made:
            await layer.close()


async def _receive(layer: BackplaneChannelLayer, channel: str, timeout: float) -> Any:
    try:
        return await asyncio.wait_for(layer.receive(channel), timeout)
    except asyncio.TimeoutError:
        return None


async def _until_relayed(
    send: Callable[[int], Any], layer: BackplaneChannelLayer, member: str, timeout: float
) -> float:
    """Send numbered probes until one arrives at ``member``; return the seconds it took."""
    started = time.monotonic()
    probe = 0
    while time.monotonic() - started < timeout:
        probe += 1
        await send(probe)
        if await _receive(layer, member, 0.05) is not None:
            return time.monotonic() - started
    raise AssertionError(f"nothing relayed within {timeout} s")


async def test_restart_keeps_local_delivery_and_reports_each_outage_once(
    redis_server: RedisServer,
) -> None:
    """While Redis is down, group_send and send never raise and still deliver locally;
    the outage is reported once (subscribe) and failed relays once (publish), not per
    message; relaying resumes within 2 s of Redis answering again."""
    async with layers(f"{redis_server.url}?socket_connect_timeout=0.5", 2) as ((a, b), reports):
        here = await a.new_channel()
        there = await b.new_channel()
        await a.group_add("room", here)
        await b.group_add("room", there)
        await a.group_send("room", {"type": "before"})
        assert await _receive(a, here, 2) == {"type": "before"}
        assert await _receive(b, there, 2) == {"type": "before"}

        redis_server.stop()
        for i in range(20):
            await a.group_send("room", {"type": "during", "n": i})
            await a.send(here, {"type": "local", "n": i})
        received = [await _receive(a, here, 1) for _ in range(40)]
        assert [m["n"] for m in received if m["type"] == "during"] == list(range(20))
        assert [m["n"] for m in received if m["type"] == "local"] == list(range(20))
        await asyncio.sleep(1.0)
        assert reports.count(("ConnectionError", "subscribe")) == 2  # one per instance
        assert 1 <= sum(stage == "publish" for _, stage in reports) <= 2

        await asyncio.to_thread(redis_server.start)
        took = await _until_relayed(
            lambda n: a.group_send("room", {"type": "after", "n": n}), b, there, 10
        )
        print(
            f"\nlayer relaying resumed {took:.3f} s after the restarted Redis accepted connections"
        )
        assert took < 2.0
        assert reports.count(("ConnectionError", "subscribe")) == 2


async def test_redis_down_at_start_then_the_relay_joins(redis_server: RedisServer) -> None:
    """Redis unreachable at start-up: the layer starts, delivers locally without raising,
    and relays once Redis comes up."""
    redis_server.stop()
    async with layers(f"{redis_server.url}?socket_connect_timeout=0.5", 2) as ((a, b), reports):
        here = await a.new_channel()
        await a.group_add("room", here)
        await a.group_send("room", {"type": "local"})
        assert await _receive(a, here, 1) == {"type": "local"}
        assert ("ConnectionError", "subscribe") in reports

        await asyncio.to_thread(redis_server.start)
        await _until_relayed(
            lambda n: b.group_send("room", {"type": "relayed", "n": n}), a, here, 15
        )


async def test_malformed_backplane_traffic_is_reported_and_relaying_goes_on(
    redis_url: str,
) -> None:
    """Garbage published on the cluster's channel is dropped and reported with stage
    delivery; the subscription lives on and the next group_send still arrives."""
    import redis.asyncio

    async with layers(redis_url, 2) as ((a, b), reports):
        member = await b.new_channel()
        await b.group_add("room", member)
        raw = redis.asyncio.Redis.from_url(redis_url)
        try:
            for payload in (b"\xff\x00 random", b'{"id":"x","msg":{"topic":', b"[1,2,3]"):
                await raw.publish(a.config.channel, payload)
        finally:
            await raw.aclose()
        await a.group_send("room", {"type": "valid"})
        assert await _receive(b, member, 5) == {"type": "valid"}
        assert ("MalformedMessage", "delivery") in reports
        assert not any(stage == "subscribe" for _, stage in reports)


async def test_cancelled_worker_receives_lose_no_message(redis_url: str) -> None:
    """Receives on a worker channel cancelled again and again (consumers coming and
    going) lose nothing: every message is received exactly once in the end."""
    async with layers(redis_url, 2) as ((sender, receiver), _reports):
        jobs = unique("jobs")
        for i in range(100):
            await sender.send(jobs, {"type": "job", "n": i})
        received: list[int] = []
        deadline = time.monotonic() + 30
        while len(received) < 100 and time.monotonic() < deadline:
            # Short waits: many of them are cancelled just as a message is on its way.
            message = await _receive(receiver, jobs, 0.002)
            if message is not None:
                received.append(message["n"])
        assert sorted(received) == list(range(100))
        assert await _receive(receiver, jobs, 0.5) is None
