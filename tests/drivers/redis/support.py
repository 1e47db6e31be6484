"""Helpers shared by the redis driver's tests: unique names, a raw client, CLIENT LIST."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import redis
import redis.asyncio

from crossws_channels.drivers.redis import RedisDriver
from tests.drivers.collector import Collector
from tests.drivers.listening import listen


def unique(prefix: str = "t") -> str:
    """A name no other test or user of the shared Redis server has."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def client_list(
    url: str, match: Callable[[dict[str, Any]], bool] | None = None
) -> list[dict[str, Any]]:
    """``CLIENT LIST`` of the server at ``url`` (optionally filtered), from a sync client."""
    with redis.Redis.from_url(url) as client:
        entries: list[dict[str, Any]] = client.client_list()
    return [entry for entry in entries if match is None or match(entry)]


def named(token: str) -> Callable[[dict[str, Any]], bool]:
    """A ``client_list`` filter: connections whose name contains ``token``."""
    return lambda entry: token in str(entry.get("name", ""))


def kill_subscriber(url: str, instance_id: str) -> int:
    """``CLIENT KILL`` the driver's own subscribe connection; return how many were killed."""
    name = f"crossws_channels:sub:{instance_id}"
    killed = 0
    with redis.Redis.from_url(url) as client:
        for entry in client.client_list():
            if entry.get("name") == name:
                killed += int(client.client_kill_filter(_id=entry["id"]))
    return killed


@asynccontextmanager
async def raw_client(url: str, **kwargs: Any) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain redis-py asyncio client the test owns, closed afterwards."""
    client = redis.asyncio.Redis.from_url(url, **kwargs)
    try:
        yield client
    finally:
        await client.aclose()


async def pubsub_messages(pubsub: Any, count: int) -> list[bytes]:
    """The data of the next ``count`` messages a redis-py PubSub receives (skipping
    subscription confirmations), each within 2 s."""
    received: list[bytes] = []
    while len(received) < count:
        message = await pubsub.get_message(timeout=2)
        assert message is not None
        if message["type"] == "message":
            received.append(message["data"])
    return received


@asynccontextmanager
async def subscribed(
    url: str, channel: str, instance_id: str | None = None, **options: Any
) -> AsyncIterator[tuple[RedisDriver, Collector]]:
    """A redis driver listening on ``channel`` into a fresh collector, closed afterwards."""
    driver = RedisDriver(instance_id or unique("i"), {"channel": channel, "url": url, **options})
    collector = Collector()
    async with await listen(driver, collector):
        yield driver, collector


@contextmanager
def paused(process_pid: int) -> Iterator[None]:
    """SIGSTOP a (private) server for the block: it keeps its sockets but answers nothing."""
    os.kill(process_pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process_pid, signal.SIGCONT)
