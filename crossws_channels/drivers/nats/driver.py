"""The ``nats`` driver: the relay over NATS subjects, worker channels in JetStream.

One driver per layer instance, over one NATS connection (:mod:`.connection`). Group
broadcasts are published on the subject named exactly ``channel``, sends to one
instance's channels on ``<channel>.instance.<instance id>``, which only that instance
subscribes to, and messages for a topic (routing "groups") on ``<channel>.<topic>``,
which the instances with the topic's groups subscribe to: the server delivers each
message to those only. Worker channels are JetStream streams (:mod:`.queues`). The
driver's connection doesn't hear its own messages (``no_echo``); the layer's heartbeat,
sent to this instance, travels over a second connection (:mod:`.loopback`).

See ``docs/drivers/nats.md``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from crossws_channels.errors import ConfigurationError

from ..base import Deliver, Outgoing, Ready, Topic
from .chunks import split
from .connection import CONNECT_TIMEOUT, Connection, ConnectionLost, hears_itself
from .inlet import Inlet
from .loopback import Loopback
from .options import DRIVER_KEYS, NatsNames, NatsOptions
from .queues import WorkerStreams
from .reader import Client, Handler, subscribe

__all__ = ["NatsDriver"]

logger = logging.getLogger("crossws_channels.drivers.nats")

# Topic subjects kept encoded, past which they are encoded afresh.
TOPIC_SUBJECTS_KEPT = 65536


class NatsDriver:
    """Relays a cluster's envelopes through NATS; see the module docstring.

    ``options`` (from CONFIG): ``channel``; ``url`` (``nats://host:4222``, several
    separated by commas for a cluster) or ``client`` (a connected
    ``nats.aio.client.Client``, which stays the user's); ``connect``, more keyword
    arguments for ``nats.connect()`` (credentials, TLS, ...); ``stream_replicas``, the
    servers of a NATS cluster that keep each worker channel's stream.
    """

    OPTIONS: frozenset[str] = DRIVER_KEYS
    # nats-py's publish appends to its write buffer, which its flusher task writes out.
    buffers = True
    # The driver's own connection is made with no_echo; a passed client that echoes
    # brings a send to this instance back all the same.
    echoes = False

    def __init__(self, instance_id: str, options: Mapping[str, Any]) -> None:
        try:
            import nats  # noqa: F401
        except ImportError as exc:
            raise ConfigurationError(
                f"'nats' needs nats-py (pip install 'crossws_channels[nats]'): {exc}",
                key="driver",
            ) from exc
        self.options = NatsOptions.from_mapping(options)
        if not isinstance(instance_id, str) or not instance_id:
            raise ConfigurationError("the instance id must be a non-empty string")
        self.instance_id = instance_id
        self.names = NatsNames.for_channel(self.options.channel)
        self._direct = self.names.direct(instance_id)
        self._broadcast = self.names.broadcast.encode()
        self._connection = Connection(self.options, f"crossws_channels:{instance_id}")
        self._loopback = Loopback(self.options, f"crossws_channels:{instance_id}:loopback")
        self._queues = WorkerStreams(self._connection, self.names, self.options.stream_replicas)
        self._closed = False
        # The topic subjects this instance listens to (routing "groups"), kept across
        # connections, each with its subscription on the live one.
        self._topics: dict[str, Any] = {}
        self._live: tuple[Any, Any] | None = None  # the listening client, its callback
        self._topic_subjects: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"<NatsDriver channel={self.options.channel!r} instance={self.instance_id!r}>"

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError("the nats driver is closed")

    # Relay out

    async def publish(self, envelope: str, /) -> None:
        """Publish ``envelope`` on the cluster's broadcast subject."""
        if self.publish_now(None, envelope):
            return  # the common case, without a coroutine of nats-py's
        self._require_open()
        client = await self._connection.get()
        await self._send(client, self.names.broadcast, envelope.encode("utf-8"))

    def publish_now(self, target: str | None, envelope: str, /) -> bool:
        """Publish without a coroutine when the driver's own client is connected."""
        live = self._live
        # Called on the loop listen runs on (the Deliver contract): while listening,
        # its client is the one to use, without asking asyncio which loop this is.
        client = live[0] if live is not None else self._connection.ready
        if type(client) is not Client or self._closed:
            return False
        if target is None:
            subject = self._broadcast
        elif type(target) is Topic:
            subject = self._topic_subjects.get(target) or self._topic_subject(target)
        elif target == self.instance_id and not hears_itself(client):
            return False  # by the loopback connection (publish_to)
        else:
            subject = self.names.direct(target).encode()
        return client.post(subject, envelope.encode("utf-8"))

    def _topic_subject(self, topic: str) -> bytes:
        """``topic``'s subject, encoded, remembered (routing "groups" asks per message)."""
        subjects = self._topic_subjects
        if len(subjects) >= TOPIC_SUBJECTS_KEPT:
            subjects.clear()
        subject = subjects[topic] = self.names.topic(topic).encode()
        return subject

    async def publish_to(self, instance_id: str, envelope: str, /) -> None:
        """Publish ``envelope`` on the subject only ``instance_id`` subscribes to."""
        self._require_open()
        client = await self._connection.get()
        if instance_id == self.instance_id and not hears_itself(client):
            client = await self._loopback.client()
        await self._send(client, self.names.direct(instance_id), envelope.encode("utf-8"))

    async def publish_batch(self, batch: Sequence[Outgoing], /) -> None:
        """Publish every message of ``batch``, in order: nats-py writes them together."""
        self._require_open()
        client = await self._connection.get()
        names = self.names
        for target, envelope in batch:
            if target is None:
                subject = names.broadcast
            elif type(target) is Topic:
                subject = names.topic(target)
            elif target == self.instance_id and not hears_itself(client):
                # As publish_to does: by the loopback connection.
                loopback = await self._loopback.client()
                await self._send(loopback, names.direct(target), envelope.encode("utf-8"))
                continue
            else:
                subject = names.direct(target)
            await self._send(client, subject, envelope.encode("utf-8"))

    async def publish_topic(self, topic: str, envelope: str, /) -> None:
        """Publish ``envelope`` on ``topic``'s subject."""
        self._require_open()
        client = await self._connection.get()
        await self._send(client, self.names.topic(topic), envelope.encode("utf-8"))

    async def _send(self, client: Any, subject: str, data: bytes) -> None:
        limit = client.max_payload
        if len(data) <= limit:
            await client.publish(subject, data)
            return
        # Larger than the server takes in one message: in parts (see .chunks).
        for part, headers in split(self.instance_id, data, limit):
            await client.publish(subject, part, headers=headers)

    # Topics

    async def listen_to(self, topics: Sequence[str], /) -> None:
        """Subscribe to ``topics``' subjects too; return once the server has them."""
        self._require_open()
        added = []
        for topic in topics:
            subject = self.names.topic(topic)
            if subject not in self._topics:
                self._topics[subject] = None
                added.append(subject)
        live = self._live
        if live is None or not added:
            return
        client, inlet = live
        for subject in added:
            if subject in self._topics and self._topics[subject] is None:
                self._topics[subject] = await subscribe(client, subject, inlet)
        await _confirmed(client)

    async def stop_listening(self, topics: Sequence[str], /) -> None:
        """Unsubscribe from ``topics``' subjects."""
        self._require_open()
        for topic in topics:
            subscription = self._topics.pop(self.names.topic(topic), None)
            if subscription is not None:
                await _unsubscribe(subscription)

    # Relay in

    async def listen(self, deliver: Deliver, ready: Ready, /) -> None:
        """Subscribe to the broadcast and this instance's subjects, then deliver until
        the connection breaks (then raise; the layer listens again once it is back)."""
        self._require_open()
        connection = self._connection
        client = await connection.wait_connected(CONNECT_TIMEOUT)

        self._queues.report = lambda error: deliver.report(error, "publish")
        # One inlet for all the relay's subjects: they are delivered in the order the
        # server sent them, and held back together (backpressure).
        inlet: Handler = Inlet(deliver)
        subscriptions = []
        try:
            for subject in (self.names.broadcast, self._direct):
                subscriptions.append(await subscribe(client, subject, inlet))
            for subject in list(self._topics):
                self._topics[subject] = await subscribe(client, subject, inlet)
            self._live = (client, inlet)
            await _confirmed(client)
            ready()
            await connection.until_lost(client)
            raise ConnectionLost("the connection to NATS broke")
        finally:
            # nats-py would restore them after reconnecting; the next listen subscribes
            # afresh, once, when the layer is ready for it.
            self._live = None
            for subject, subscription in list(self._topics.items()):
                if subscription is not None:
                    subscriptions.append(subscription)
                    self._topics[subject] = None
            for subscription in subscriptions:
                await _unsubscribe(subscription)

    # Worker channels

    async def queue_push(self, channel: str, item: str, capacity: int, expires: float, /) -> bool:
        self._require_open()
        return await self._queues.push(channel, item, capacity, expires)

    async def queue_pop(self, channel: str, timeout: float, /) -> str | None:
        self._require_open()
        return await self._queues.pop(channel, timeout)

    def queue_take(self, channel: str, /) -> str | None:
        """An item already pulled and acknowledged (pulls come in batches), or None."""
        if self._closed:
            return None
        return self._queues.take(channel)

    async def queue_return(self, channel: str, item: str, /) -> None:
        self._require_open()
        await self._queues.give_back(channel, item)

    async def flush(self) -> None:
        """Delete this cluster's worker-channel streams; nothing else."""
        self._require_open()
        await self._queues.flush()

    # Shutdown

    async def close(self) -> None:
        """Close the driver's connection (never a client the user passed)."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self._queues.close(), CONNECT_TIMEOUT)
        except Exception as exc:
            logger.debug("releasing the worker streams failed: %s", exc)
        await self._loopback.close()
        await self._connection.close()


async def _confirmed(client: Any) -> None:
    """Return once the server has what the client sent so far (subscriptions).

    ``flush()`` waits for the answer to a PING, but nats-py (2.16) writes that PING ahead
    of the commands it still holds: the first round trip lets those out, and the second
    PING, sent after them, is answered only once the server has them.
    """
    await client.flush(timeout=CONNECT_TIMEOUT)
    await client.flush(timeout=CONNECT_TIMEOUT)


async def _unsubscribe(subscription: Any) -> None:
    try:
        await subscription.unsubscribe()
    except Exception as exc:
        logger.debug("unsubscribing failed: %s", exc)
