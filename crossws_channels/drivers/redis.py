"""The ``redis`` driver: the relay over Redis pub/sub, worker channels in Redis lists.

One driver per layer instance. It publishes group broadcasts on the pub/sub channel
named exactly ``channel`` (shared with crossws's ``redis({channel})``), direct sends on
a channel only the owning instance subscribes to, and keeps worker-channel queues under
this cluster's key prefix (see :class:`WireNames`). It holds:

- one connection for publishes: a batch of them is packed into one buffer, written at
  once, and its replies read under one timeout;
- one connection for queue pushes (a Lua script) and returns;
- one subscribe connection, read by a supervised listener task without a timeout per
  message, and watched for silence by a watchdog that PINGs it;
- a few connections for blocking pops, so a waiting ``BLPOP`` never holds up a publish;
- a client over a pool of its own for the odd command (``flush``).

All of them are made from the settings of ``url`` or of the ``client`` passed in (see
:class:`ConnectionFactory`); a client passed in is never used itself. Every method runs
on the event loop the layer drives it from; ``close()`` releases everything the driver
opened on that loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from crossws_channels.errors import ConfigurationError

from ._redis_config import DRIVER_KEYS, RedisOptions, WireNames
from ._redis_conn import (
    CLOSE_TIMEOUT,
    CommandConnection,
    Connection,
    ConnectionFactory,
    ReplyReader,
    bounded,
    bulk,
    disconnect_quietly,
    pack,
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
# than the socket timeout: a half-open connection is noticed within their sum (and a
# quarter of the smaller of the two, how often the watchdog looks).
IDLE_PING_INTERVAL = 10.0

# The header of a PUBLISH command, before the channel name; the message follows it.
_PUBLISH = b"*3\r\n" + bulk(b"PUBLISH")
_PING = pack(b"PING")

# Packed PUBLISH headers remembered for direct sends (one per target instance).
_HEADER_MEMORY = 1024


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
        self._connections = connections = ConnectionFactory(settings, self.options.connector)
        command_name = connections.command_name(f"crossws_channels:cmd:{instance_id}")
        self._client = connections.client(command_name)
        self._publisher = CommandConnection(connections, command_name)
        self._broadcast_header = _publish_header(self.names.broadcast)
        # The packed PUBLISH header of each target instance, computed once per instance.
        self._direct_header = functools.lru_cache(maxsize=_HEADER_MEMORY)(self._new_direct_header)
        self._closed = False
        self._deliver: Deliver | None = None
        self._listener: asyncio.Task[None] | None = None
        self._subscriber: Connection | None = None
        self._heard = 0  # reads that brought replies on the subscription, for the watchdog
        self._paused = False  # the layer asked the reader to wait (backpressure)
        pusher = CommandConnection(connections, command_name)
        self._queues = WorkerQueues(pusher, connections, self.names, instance_id)

    def __repr__(self) -> str:
        return f"<RedisDriver channel={self.options.channel!r} instance={self.instance_id!r}>"

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError("the redis driver is closed")

    # Relay out

    async def publish(self, envelope: str, /) -> None:
        """PUBLISH ``envelope`` on the cluster's broadcast channel."""
        self._require_open()
        packed = _publish_command(self._broadcast_header, envelope)
        _raise_first(await self._publisher.execute(packed, 1))

    async def publish_to(self, instance_id: str, envelope: str, /) -> None:
        """PUBLISH ``envelope`` on the channel only ``instance_id`` subscribes to."""
        self._require_open()
        packed = _publish_command(self._direct_header(instance_id), envelope)
        _raise_first(await self._publisher.execute(packed, 1))

    async def publish_batch(self, batch: Sequence[Outgoing], /) -> None:
        """PUBLISH every message of ``batch``, in order, in one write and one round trip.

        Raises the first error Redis replied with (after reading every reply), or the
        error that broke the exchange; nothing is sent again.
        """
        self._require_open()
        if not batch:
            return
        broadcast = self._broadcast_header
        parts = [
            _publish_command(broadcast if target is None else self._direct_header(target), env)
            for target, env in batch
        ]
        _raise_first(await self._publisher.execute(b"".join(parts), len(parts)))

    def _new_direct_header(self, instance_id: str) -> bytes:
        return _publish_header(self.names.direct(instance_id))

    # Relay in

    async def subscribe(self, deliver: Deliver, /) -> None:
        """Subscribe to the broadcast and this instance's direct channel; return once
        Redis confirmed both, then keep the subscription alive in a background task."""
        self._require_open()
        if self._listener is not None:
            raise RuntimeError("the redis driver is already subscribed")
        self._deliver = deliver
        connection, replies = await self._open_subscription()
        if self._closed:  # close() ran while we were connecting
            await disconnect_quietly(connection)
            raise RuntimeError("the redis driver was closed while subscribing")
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(connection, replies),
            name=f"crossws_channels redis listener {self._direct}",
        )

    async def _open_subscription(self) -> tuple[Connection, ReplyReader]:
        """Connect and SUBSCRIBE; return once Redis confirmed both channels."""
        connections = self._connections
        connection = connections(f"crossws_channels:sub:{self.instance_id}")
        self._subscriber = connection
        bound = connections.connect_timeout + connections.socket_timeout
        try:
            async with bounded(bound):
                await connection.connect()
                replies = ReplyReader(connection, connections)
                await connection.send_command("SUBSCRIBE", self.names.broadcast, self._direct)
                confirmed = 0
                while confirmed < 2:
                    for reply in await replies.read():
                        if _kind(reply) == b"subscribe":
                            confirmed += 1
                        else:
                            self._handle(reply)
        except BaseException as exc:
            await disconnect_quietly(connection, nowait=True)
            if self._subscriber is connection:
                self._subscriber = None
            if isinstance(exc, TimeoutError):
                raise TimeoutError(
                    f"Redis did not accept the connection and confirm SUBSCRIBE within {bound:g} s"
                ) from None
            raise
        return connection, replies

    async def _listen(self, connection: Connection, replies: ReplyReader) -> None:
        """Pump messages into ``deliver``; on failure, reconnect and resubscribe."""
        try:
            while True:
                try:
                    await self._pump(connection, replies)
                except Exception as exc:
                    connection, replies = await self._recover(connection, exc)
        finally:
            if self._subscriber is not None:
                await disconnect_quietly(self._subscriber, nowait=True)
                self._subscriber = None

    async def _recover(
        self, broken: Connection, error: Exception
    ) -> tuple[Connection, ReplyReader]:
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
                opened = await self._open_subscription()
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
            return opened

    async def _pump(self, connection: Connection, replies: ReplyReader) -> None:
        """Read the subscription until it fails, or until the watchdog gives up on it."""
        reader = asyncio.get_running_loop().create_task(
            self._read(replies), name=f"crossws_channels redis reader {self._direct}"
        )
        try:
            await self._watch(connection, reader)
        finally:
            reader.cancel()
            await asyncio.wait([reader])
            if not reader.cancelled():
                reader.exception()  # retrieved: the watchdog's own error is the one raised

    async def _read(self, replies: ReplyReader) -> NoReturn:
        # The hot path: no timer (the watchdog bounds silence), and every message that
        # one socket read brought handled in one go. When the layer asks it to wait (a
        # channel is full while its consumer reads), the reader stops reading: Redis
        # keeps the rest in this client's output buffer until it resumes.
        read = replies.read
        deliver = self._deliver
        if deliver is None:
            raise RuntimeError("the redis driver reads before subscribe() set deliver")
        while True:
            batch = await read()
            self._heard += 1
            for reply in batch:
                if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                    data = reply[2]
                    try:
                        wait = deliver(data)
                    except Exception:
                        # Deliver promises not to raise; if it does anyway, the listener
                        # must live on.
                        logger.exception("deliver raised on a %d-byte message", len(data))
                        continue
                    if wait is not None:
                        self._paused = True
                        try:
                            await wait
                        finally:
                            self._paused = False
                            self._heard += 1

    async def _watch(self, connection: Connection, reader: asyncio.Task[NoReturn]) -> None:
        """Return (raising) when ``reader`` fails, or when the connection has been
        silent for ``health_check_interval`` and then left a PING unanswered for the
        socket timeout: silence may be a quiet channel or a dead peer, and a PING tells
        them apart."""
        loop = asyncio.get_running_loop()
        interval = self._connections.health_check_interval or IDLE_PING_INTERVAL
        patience = self._connections.socket_timeout
        tick = min(interval, patience) / 4
        heard = self._heard
        quiet_since = loop.time()
        pinged_at: float | None = None
        while True:
            await asyncio.wait([reader], timeout=tick)
            if reader.done():
                reader.result()  # raises what broke the connection
            now = loop.time()
            if self._heard != heard or self._paused:
                heard, quiet_since, pinged_at = self._heard, now, None
            elif pinged_at is not None:
                if now - pinged_at >= patience:
                    raise TimeoutError(f"no reply to PING within {patience:g} s")
            elif now - quiet_since >= interval:
                async with bounded(patience):
                    await connection.send_packed_command(_PING, check_health=False)
                pinged_at = now

    def _handle(self, reply: Any) -> None:
        """Deliver ``reply`` if it is a message (while subscribing; ``_read`` inlines it)."""
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
        """Append ``item`` unless ``capacity`` unexpired items wait; atomic (Lua), on a
        connection of its own."""
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
        self._require_open()
        client = self._client
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
        closing = [connection.close() for connection in self._queues.release()]
        closing.append(self._publisher.close())
        if self._subscriber is not None:
            closing.append(disconnect_quietly(self._subscriber))
        self._subscriber = None
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


def _publish_header(channel: str) -> bytes:
    """``PUBLISH <channel>`` in RESP, the part of the command before the message."""
    return _PUBLISH + bulk(channel.encode("utf-8"))


def _publish_command(header: bytes, envelope: str) -> bytes:
    """The whole PUBLISH command: ``header`` (from :func:`_publish_header`) and the message."""
    return header + bulk(envelope.encode("utf-8"))


def _raise_first(replies: list[Any]) -> None:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


def _kind(reply: Any) -> bytes | None:
    if isinstance(reply, list) and reply and isinstance(reply[0], bytes):
        return reply[0]
    return None
