"""The raw transports: what redis-py, psycopg and nats-py do without any channel layer.

A :class:`RawLink` listens on one name and publishes to others, one message per awaited
call (:meth:`RawLink.send`) or many per round trip (:meth:`RawLink.send_many`). These
are the reference points the layer is compared with: it can't relay faster than its
transport.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .env import Env

OnMessage = Callable[[str | bytes], None]


class RawLink(Protocol):
    async def listen(self, name: str, on_message: OnMessage) -> None:
        """Subscribe to ``name``; return once subscribed. Messages go to ``on_message``."""

    async def send(self, name: str, payload: str) -> None: ...

    async def send_many(self, name: str, payloads: Sequence[str]) -> None: ...

    async def close(self) -> None: ...


class RedisLink:
    """redis-py asyncio: PUBLISH on a command client, a PubSub for listening."""

    def __init__(self, url: str) -> None:
        import redis.asyncio

        self._client: Any = redis.asyncio.Redis.from_url(url)
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def listen(self, name: str, on_message: OnMessage) -> None:
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(name)

        async def read() -> None:
            async for message in self._pubsub.listen():
                if message["type"] == "message":
                    on_message(message["data"])

        self._reader = asyncio.get_running_loop().create_task(read())

    async def send(self, name: str, payload: str) -> None:
        await self._client.publish(name, payload)

    async def send_many(self, name: str, payloads: Sequence[str]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for payload in payloads:
                pipe.publish(name, payload)
            await pipe.execute()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self._pubsub is not None:
            await self._pubsub.aclose()
        await self._client.aclose()


class PgLink:
    """psycopg 3: NOTIFY on one autocommit connection, LISTEN on another.

    ``send_many`` uses psycopg's pipeline mode: one ``pg_notify()`` statement per message,
    sent back to back inside one transaction, results read once at the end. With
    ``batch``, it is instead a single statement for all of them,
    ``SELECT pg_notify(name, p) FROM unnest(payloads) p`` with the array in binary form:
    one round trip, one transaction, the fastest way PostgreSQL offers to NOTIFY many
    payloads.
    """

    def __init__(self, dsn: str, *, batch: bool = False) -> None:
        self._dsn = dsn
        self._batch = batch
        self._out: Any = None
        self._in: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def _sender(self) -> Any:
        if self._out is None:
            import psycopg

            self._out = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        return self._out

    async def listen(self, name: str, on_message: OnMessage) -> None:
        import psycopg
        from psycopg import sql

        self._in = await psycopg.AsyncConnection.connect(self._dsn, autocommit=True)
        await self._in.execute(sql.SQL("LISTEN {}").format(sql.Identifier(name)))

        async def read() -> None:
            async for notify in self._in.notifies():
                on_message(notify.payload)

        self._reader = asyncio.get_running_loop().create_task(read())

    async def send(self, name: str, payload: str) -> None:
        conn = await self._sender()
        await conn.execute("SELECT pg_notify(%s, %s)", (name, payload))

    async def send_many(self, name: str, payloads: Sequence[str]) -> None:
        conn = await self._sender()
        if self._batch:
            # %b: the array travels in binary form; as text, every quote in every payload
            # would be escaped by a regular expression on the client.
            await conn.execute(
                "SELECT count(pg_notify(%s, p)) FROM unnest(%b::text[]) AS p", (name, payloads)
            )
            return
        async with conn.pipeline(), conn.transaction():
            cursor = conn.cursor()
            for payload in payloads:
                await cursor.execute("SELECT pg_notify(%s, %s)", (name, payload))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        for conn in (self._in, self._out):
            if conn is not None:
                await conn.close()


class NatsLink:
    """nats-py: one connection; ``send`` publishes and waits for the server's answer to a
    ping (a publish alone is only buffered), ``send_many`` publishes all, then pings once."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._client: Any = None

    async def _connected(self) -> Any:
        if self._client is None:
            import nats

            self._client = await nats.connect(self._url)
        return self._client

    async def listen(self, name: str, on_message: OnMessage) -> None:
        client = await self._connected()

        async def received(message: Any) -> None:
            on_message(message.data)

        await client.subscribe(name, cb=received)
        await client.flush()

    async def send(self, name: str, payload: str) -> None:
        client = await self._connected()
        await client.publish(name, payload.encode())
        await client.flush()

    async def send_many(self, name: str, payloads: Sequence[str]) -> None:
        client = await self._connected()
        for payload in payloads:
            await client.publish(name, payload.encode())
        await client.flush()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


def open_link(key: str, env: Env) -> RawLink:
    if key.startswith("raw-redis") and env.redis_url is not None:
        return RedisLink(env.redis_url)
    if key.startswith("raw-pg") and env.pg_dsn is not None:
        return PgLink(env.pg_dsn, batch=key.endswith("-batch"))
    if key.startswith("raw-nats") and env.nats_url is not None:
        return NatsLink(env.nats_url)
    raise ValueError(f"{key!r} is not an available raw subject")


def pipelined(key: str) -> bool:
    """True for the raw subjects that send many messages per round trip."""
    return key.endswith(("-pipe", "-batch"))
