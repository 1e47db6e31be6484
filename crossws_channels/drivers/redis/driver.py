"""The ``redis`` driver: the relay over Redis pub/sub, worker channels in Redis lists.

One driver per layer instance. It publishes group broadcasts on the pub/sub channel
named exactly ``channel`` (shared with crossws's ``redis({channel})``), direct sends on
a channel only the owning instance subscribes to, messages for a topic (routing
"groups") on that topic's channel, which the instances with its groups subscribe to, and
keeps worker-channel queues under
this cluster's key prefix (see :class:`WireNames`). It holds:

- one connection for publishes: a batch of them is packed into one buffer, written at
  once, and its replies read under one timeout;
- one connection for queue pushes (a Lua script) and returns;
- one subscribe connection (:mod:`.subscription`), read without a timeout per message
  and watched for silence by a watchdog that PINGs it;
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
from collections.abc import Mapping, Sequence
from typing import Any

from crossws_channels.errors import ConfigurationError

from ..base import Deliver, Outgoing, Ready, Topic
from .connection import (
    CLOSE_TIMEOUT,
    CommandConnection,
    ConnectionFactory,
    Pool,
    bounded,
    check_pool_settings,
    check_url_settings,
    pool_from_url,
)
from .options import DRIVER_KEYS, RedisOptions, WireNames
from .queues import WorkerQueues
from .resp import bulk
from .sentinel import MasterLocator, sentinel_settings
from .subscription import Subscription

__all__ = ["RedisDriver", "RedisOptions", "WireNames"]

logger = logging.getLogger(__name__)

# The header of a PUBLISH command, before the channel name; the message follows it.
_PUBLISH = b"*3\r\n" + bulk(b"PUBLISH")

# How often, with sentinels, the driver asks them where the master is.
MASTER_CHECK = 1.0

# Packed PUBLISH headers remembered for direct sends, one per target instance (packing
# each command's header once is part of what took the sender's CPU per message from 50 to
# 11 µs: docs/benchmarks.md, "Where the time went").
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
        self._locator: MasterLocator | None = None
        self.instance_id = instance_id
        self.names = WireNames.for_channel(self.options.channel)
        settings: Pool
        if self.options.sentinel is not None:
            try:
                located = sentinel_settings(self.options.sentinel, self.options.connector)
                check_pool_settings(located)
                settings, self._locator = located, located.locator
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(f"can't be used: {exc}", key="master_kwargs") from exc
        elif self.options.url is not None:
            try:
                settings = pool_from_url(self.options.url, self.options.connector)
                check_url_settings(self.options.url, settings)
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
        self._topic_header = functools.lru_cache(maxsize=_HEADER_MEMORY)(self._new_topic_header)
        # The topic channels this instance listens to (routing "groups"), kept across
        # subscriptions.
        self._topics: set[str] = set()
        self._closed = False
        self._subscription: Subscription | None = None
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
        broadcast, direct, topic = self._broadcast_header, self._direct_header, self._topic_header
        parts = [
            _publish_command(
                broadcast
                if target is None
                else topic(target)
                if type(target) is Topic
                else direct(target),
                env,
            )
            for target, env in batch
        ]
        _raise_first(await self._publisher.execute(b"".join(parts), len(parts)))

    async def publish_topic(self, topic: str, envelope: str, /) -> None:
        """PUBLISH ``envelope`` on ``topic``'s channel."""
        self._require_open()
        packed = _publish_command(self._topic_header(topic), envelope)
        _raise_first(await self._publisher.execute(packed, 1))

    def _new_direct_header(self, instance_id: str) -> bytes:
        return _publish_header(self.names.direct(instance_id))

    def _new_topic_header(self, topic: str) -> bytes:
        return _publish_header(self.names.topic(topic))

    # Topics

    async def listen_to(self, topics: Sequence[str], /) -> None:
        """Subscribe to ``topics``' channels too; return once Redis confirmed them."""
        self._require_open()
        channels = [self.names.topic(topic) for topic in topics]
        self._topics.update(channels)
        subscription = self._subscription
        if subscription is not None:
            await subscription.add(channels)

    async def stop_listening(self, topics: Sequence[str], /) -> None:
        """Unsubscribe from ``topics``' channels."""
        self._require_open()
        channels = [self.names.topic(topic) for topic in topics]
        self._topics.difference_update(channels)
        subscription = self._subscription
        if subscription is not None:
            await subscription.remove(channels)

    # Relay in

    async def listen(self, deliver: Deliver, ready: Ready, /) -> None:
        """Subscribe to the broadcast channel, this instance's direct channel and its
        topics, then deliver until the connection is lost (then raise; the layer
        subscribes again)."""
        self._require_open()
        base = [self.names.broadcast, self.names.direct(self.instance_id)]
        subscription = Subscription(
            self._connections,
            f"crossws_channels:sub:{self.instance_id}",
            lambda: [*base, *self._topics],
        )
        self._subscription = subscription
        try:
            await subscription.open(deliver)
            ready()
            if self._locator is None:
                await subscription.run(deliver)
            else:
                await self._run_following_the_master(subscription, deliver)
        finally:
            if self._subscription is subscription:
                self._subscription = None
            await subscription.close()

    async def _run_following_the_master(self, subscription: Subscription, deliver: Deliver) -> None:
        """Run the subscription while asking the sentinels, every
        :data:`MASTER_CHECK` seconds, where the master is. When it moved (a failover),
        every connection starts afresh on the new one: a master demoted in a graceful
        failover keeps its clients for up to ten seconds more, and their messages would
        reach only each other."""
        loop = asyncio.get_running_loop()
        running = loop.create_task(subscription.run(deliver))
        try:
            while True:
                await asyncio.wait([running], timeout=MASTER_CHECK)
                if running.done():
                    running.result()  # raises what broke the subscription
                moved = await self._master_moved(subscription.address)
                if moved is not None:
                    await self._reset_connections()
                    raise ConnectionError(f"the master moved to {moved[0]}:{moved[1]}")
        finally:
            running.cancel()
            await asyncio.wait([running])
            if not running.cancelled():
                running.exception()

    async def _master_moved(self, address: tuple[str, int] | None) -> tuple[str, int] | None:
        assert self._locator is not None
        try:
            async with bounded(
                self._connections.connect_timeout + self._connections.socket_timeout
            ):
                master = await self._locator.locate()
        except Exception as exc:
            # No sentinel answered: not an outage of the master; asked again later.
            logger.debug("asking the sentinels for the master failed: %s", exc)
            return None
        found = (str(master[0]), int(master[1]))
        return found if address is not None and found != address else None

    async def _reset_connections(self) -> None:
        await asyncio.gather(
            self._publisher.reset(), *(c.reset() for c in self._queues.connections())
        )

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
        closing = [connection.close() for connection in self._queues.release()]
        closing.append(self._publisher.close())
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            closing.append(subscription.close())
        closing.append(self._close_client())
        await asyncio.gather(*closing)

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
