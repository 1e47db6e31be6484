"""The ``redis`` driver: the relay over Redis pub/sub, worker channels in Redis lists.

One driver per layer instance. It publishes group broadcasts on the pub/sub channel
named exactly ``channel`` (shared with crossws's ``redis({channel})``), direct sends on
a channel only the owning instance subscribes to, and keeps worker-channel queues under
this cluster's key prefix (see :class:`WireNames`). It holds:

- a command client, over a connection pool of its own, for publishes, pipelines and
  queue scripts;
- one subscribe connection, kept alive by a supervised listener task;
- a few connections for blocking pops, so a waiting ``BLPOP`` never holds up a publish.

All of them are made from the settings of ``url`` or of the ``client`` passed in (see
:class:`ConnectionFactory`); a client passed in is never used itself. Every method runs
on the event loop the layer drives it from; ``close()`` releases everything the driver
opened on that loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

from crossws_channels.errors import ConfigurationError

from ._redis_config import DRIVER_KEYS, RedisOptions, WireNames
from ._redis_conn import (
    CLOSE_TIMEOUT,
    Client,
    Connection,
    ConnectionFactory,
    disconnect_quietly,
    pool_from_url,
)
from ._redis_queue import WorkerQueues
from .base import Deliver, Outgoing

__all__ = ["RedisDriver", "RedisOptions", "WireNames"]

logger = logging.getLogger(__name__)

# Reconnecting: the first retry comes within 0.1 s, the wait doubles up to a second,
# and each wait is jittered between half and all of it so that a fleet of instances
# does not reconnect in lockstep. The one-second cap keeps relaying within about a
# second of Redis answering again.
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 1.0

# The subscribe connection pings after this long without traffic (unless the URL or
# client sets ``health_check_interval``) and gives up on it when the reply takes longer
# than the socket timeout: a half-open connection is noticed within their sum.
IDLE_PING_INTERVAL = 10.0


class RedisDriver:
    """Relays a cluster's envelopes through Redis; see the module docstring.

    ``RedisDriver(instance_id, options)`` validates ``options`` (``channel`` plus ``url``
    or ``client``, and ``connector``) and raises
    :class:`~crossws_channels.errors.ConfigurationError` for anything wrong; it opens
    nothing until ``subscribe`` or the first publish.
    """

    OPTIONS: frozenset[str] = DRIVER_KEYS
    """The CONFIG keys this driver reads (besides ``channel``), for the layer's messages."""

    def __init__(self, instance_id: str, options: Mapping[str, Any]) -> None:
        self.options = RedisOptions.from_mapping(options)
        self.instance_id = instance_id
        self.names = WireNames.for_channel(self.options.channel)
        self._direct = self.names.direct(instance_id)
        if self.options.url is not None:
            try:
                settings = pool_from_url(self.options.url, self.options.connector)
            except (ValueError, TypeError) as exc:
                # redis-py parses the URL and its query string here: a bad port, an
                # unknown or mistyped option.
                raise ConfigurationError(f"can't be used: {exc}", key="url") from exc
        else:
            settings = self.options.client.connection_pool
        self._connections = ConnectionFactory(settings, self.options.connector)
        self._client = self._connections.client(f"crossws_channels:cmd:{instance_id}")
        self._closed = False
        self._deliver: Deliver | None = None
        self._listener: asyncio.Task[None] | None = None
        self._subscriber: Connection | None = None
        self._queues = WorkerQueues(self._client, self._connections, self.names, instance_id)

    def __repr__(self) -> str:
        return f"<RedisDriver channel={self.options.channel!r} instance={self.instance_id!r}>"

    def _require_open(self) -> Client:
        if self._closed:
            raise RuntimeError("the redis driver is closed")
        return self._client

    # Relay out

    async def publish(self, envelope: str, /) -> None:
        """PUBLISH ``envelope`` on the cluster's broadcast channel."""
        await self._require_open().publish(self.names.broadcast, envelope.encode("utf-8"))

    async def publish_to(self, instance_id: str, envelope: str, /) -> None:
        """PUBLISH ``envelope`` on the channel only ``instance_id`` subscribes to."""
        await self._require_open().publish(self.names.direct(instance_id), envelope.encode("utf-8"))

    async def publish_batch(self, batch: Sequence[Outgoing], /) -> None:
        """PUBLISH every message of ``batch``, in order, in one pipelined round trip."""
        client = self._require_open()
        if not batch:
            return
        if len(batch) == 1:
            target, envelope = batch[0]
            name = self.names.broadcast if target is None else self.names.direct(target)
            await client.publish(name, envelope.encode("utf-8"))
            return
        # Not a transaction: MULTI/EXEC would buy nothing here and cost two commands.
        pipe = client.pipeline(transaction=False)
        try:
            for target, envelope in batch:
                name = self.names.broadcast if target is None else self.names.direct(target)
                pipe.publish(name, envelope.encode("utf-8"))
            await pipe.execute()
        finally:
            await pipe.reset()

    # Relay in

    async def subscribe(self, deliver: Deliver, /) -> None:
        """Subscribe to the broadcast and this instance's direct channel; return once
        Redis confirmed both, then keep the subscription alive in a background task."""
        self._require_open()
        if self._listener is not None:
            raise RuntimeError("the redis driver is already subscribed")
        self._deliver = deliver
        connection = await self._open_subscription()
        if self._closed:  # close() ran while we were connecting
            await disconnect_quietly(connection)
            raise RuntimeError("the redis driver was closed while subscribing")
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(connection), name=f"crossws_channels redis listener {self._direct}"
        )

    async def _open_subscription(self) -> Connection:
        connection = self._connections(f"crossws_channels:sub:{self.instance_id}")
        self._subscriber = connection
        try:
            await connection.connect()
            await connection.send_command("SUBSCRIBE", self.names.broadcast, self._direct)
            confirmed = 0
            while confirmed < 2:
                reply = await connection.read_response(timeout=self._connections.socket_timeout)
                if reply is None:
                    raise TimeoutError(
                        f"Redis did not confirm SUBSCRIBE within "
                        f"{self._connections.socket_timeout} s"
                    )
                if _kind(reply) == b"subscribe":
                    confirmed += 1
                else:
                    self._handle(reply)
        except BaseException:
            await disconnect_quietly(connection, nowait=True)
            if self._subscriber is connection:
                self._subscriber = None
            raise
        return connection

    async def _listen(self, connection: Connection) -> None:
        """Pump messages into ``deliver``; on failure, reconnect and resubscribe."""
        try:
            while True:
                try:
                    await self._pump(connection)
                except Exception as exc:
                    connection = await self._recover(connection, exc)
        finally:
            if self._subscriber is not None:
                await disconnect_quietly(self._subscriber, nowait=True)
                self._subscriber = None

    async def _recover(self, broken: Connection, error: Exception) -> Connection:
        await disconnect_quietly(broken, nowait=True)
        self._subscriber = None
        started = time.monotonic()
        logger.warning(
            "redis subscription for channel %r lost (%s: %s); reconnecting",
            self.options.channel,
            type(error).__name__,
            error,
        )
        self._notify("connection_lost", error)
        delay = BACKOFF_INITIAL
        attempts = 0
        while True:
            await asyncio.sleep(random.uniform(delay / 2, delay))
            attempts += 1
            try:
                connection = await self._open_subscription()
            except Exception as exc:
                logger.debug("redis resubscribe attempt %d failed: %s", attempts, exc)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            logger.info(
                "redis subscription for channel %r restored after %.2f s (%d attempt(s))",
                self.options.channel,
                time.monotonic() - started,
                attempts,
            )
            self._notify("connection_made")
            return connection

    async def _pump(self, connection: Connection) -> None:
        loop = asyncio.get_running_loop()
        interval = self._connections.health_check_interval or IDLE_PING_INTERVAL
        patience = self._connections.socket_timeout
        last_heard = loop.time()
        pinged_at: float | None = None
        while True:
            now = loop.time()
            due = last_heard + interval if pinged_at is None else pinged_at + patience
            reply = await connection.read_response(timeout=max(due - now, 0.01))
            now = loop.time()
            if reply is not None:
                last_heard, pinged_at = now, None
                self._handle(reply)
            elif pinged_at is not None:
                if now >= pinged_at + patience:
                    raise TimeoutError(f"no reply to PING within {patience} s")
            elif now >= last_heard + interval:
                # Silence may be a quiet channel or a dead peer; a PING tells them apart.
                await connection.send_command("PING", check_health=False)
                pinged_at = now

    def _handle(self, reply: Any) -> None:
        if _kind(reply) != b"message" or len(reply) != 3:
            return  # PING replies, subscription confirmations
        data = reply[2]
        deliver = self._deliver
        if deliver is None:
            return
        try:
            deliver(data)
        except Exception:
            # Deliver promises not to raise; if it does anyway, the listener must live on.
            logger.exception("deliver raised on a %d-byte message", len(data))

    def _notify(self, event: str, error: Exception | None = None) -> None:
        deliver = self._deliver
        if deliver is None:
            return
        try:
            if error is not None:
                deliver.connection_lost(error)
            else:
                deliver.connection_made()
        except Exception:
            logger.exception("deliver.%s raised", event)

    # Worker channels

    async def queue_push(self, channel: str, item: str, capacity: int, expires: float, /) -> bool:
        """Append ``item`` unless ``capacity`` unexpired items wait; atomic (Lua)."""
        self._require_open()
        return await self._queues.push(channel, item, capacity, expires)

    async def queue_pop(self, channel: str, timeout: float, /) -> str | None:
        """Pop the oldest item, waiting up to ``timeout`` s, on a connection of its own."""
        self._require_open()
        return await self._queues.pop(channel, timeout)

    async def queue_return(self, channel: str, item: str, /) -> None:
        """Put ``item`` back at the head of the queue, with its original deadline."""
        self._require_open()
        await self._queues.give_back(channel, item)

    async def flush(self) -> None:
        """Delete this cluster's keys (SCAN by prefix, UNLINK); nothing else."""
        client = self._require_open()
        cursor = 0
        while True:
            cursor, keys = await client.scan(cursor, match=self.names.key_pattern, count=1000)
            if keys:
                await client.unlink(*keys)
            if int(cursor) == 0:
                break
        self._queues.forget()

    # Shutdown

    async def close(self) -> None:
        """Stop listening and close every connection the driver opened (and a client
        its factory made), all at once and each within a bound; never a client object
        the user passed."""
        if self._closed:
            return
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        connections = self._queues.release()
        if self._subscriber is not None:
            connections.append(self._subscriber)
        self._subscriber = None
        closing = [disconnect_quietly(connection) for connection in connections]
        closing.append(self._close_client())
        await asyncio.gather(*closing)
        self._deliver = None

    async def _close_client(self) -> None:
        try:
            await self._client.aclose()
            # A pool handed to the client explicitly is not closed by aclose().
            await asyncio.wait_for(self._client.connection_pool.disconnect(), CLOSE_TIMEOUT)
            if self.options.owns_client and self.options.client is not None:
                # Made by the factory for this driver: never used, but ours to close.
                await self.options.client.aclose()
        except Exception:
            logger.warning("closing the redis driver's connection pool failed", exc_info=True)


def _kind(reply: Any) -> bytes | None:
    if isinstance(reply, list) and reply and isinstance(reply[0], bytes):
        return reply[0]
    return None
