"""Worker channels in JetStream: one work-queue stream per worker channel.

A stream with work-queue retention keeps a message until one consumer acknowledges it,
and hands each message to one member of a consumer: every instance of the cluster pulls
from the same durable consumer, so each message is received once in the whole cluster.
The stream is made on the first push with ``max_msgs`` = the channel's capacity and
``discard=new``, so a push to a full channel is refused by the server (``send`` raises
``ChannelFull``), and ``max_age`` = the layer's ``expiry``, so what nobody reads goes
away by itself; a message is stored, so one sent before any receiver exists waits.

Pushing (:mod:`.pushing`) and pulling (:mod:`.pulling`) avoid a round trip per message
where they can; every answer comes back on one private inbox (:mod:`.inbox`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from .connection import Connection
from .inbox import Inbox
from .options import NatsNames
from .pulling import Pulls
from .pushing import UNKNOWN, Pushes, StreamGone

__all__ = ["WorkerStreams"]

logger = logging.getLogger("crossws_channels.drivers.nats")

CONSUMER = "workers"
# Receivers acknowledge or hand back (-NAK) what they pulled within a fraction of a
# second; only a message pulled by a process that died waits this long to be redelivered.
ACK_WAIT = 10.0
# JetStream's error code for a stream already made with another configuration.
STREAM_NAME_IN_USE = 10058
REQUEST_TIMEOUT = 5.0
DRAIN_TIMEOUT = 2.0
# A receiver of a channel with no stream yet (nothing was ever sent to it) looks again
# after this long, then twice as long each time up to the most: the first message sent
# is picked up within that, not a whole pop timeout later.
ABSENT_FIRST, ABSENT_MOST = 0.01, 0.25


class WorkerStreams:
    """This driver's side of the cluster's worker channels (see the module docstring)."""

    def __init__(self, connection: Connection, names: NatsNames, replicas: int = 1) -> None:
        self._connection = connection
        self._names = names
        self._replicas = replicas
        self._inbox = Inbox()
        self._client: Any = None
        self._capacity: dict[str, int] = {}
        self._pushes: dict[str, Pushes] = {}
        self._pulls: dict[str, Pulls] = {}
        self._absent: dict[str, float] = {}  # channels with no stream: the next wait
        # Where a failure the driver handles itself goes (the layer's, once listening).
        self.report: Callable[[Exception], None] = _log

    async def _ready(self) -> Any:
        client = await self._connection.get()
        if client is not self._client:
            # A new client (the layer's loop changed): nothing of the old one carries on.
            self._discard()
            await self._inbox.ready(client)
            self._client = client
        return client

    async def _ensure(self, channel: str, capacity: int, expires: float) -> int:
        """Make (or update) ``channel``'s stream; return how many messages it holds."""
        from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig
        from nats.js.errors import BadRequestError

        js = self._client.jetstream(timeout=REQUEST_TIMEOUT)
        config = StreamConfig(
            name=self._names.stream(channel),
            subjects=[self._names.queue_subject(channel)],
            retention=RetentionPolicy.WORK_QUEUE,
            discard=DiscardPolicy.NEW,
            max_msgs=capacity,
            max_age=float(max(1, math.ceil(expires - time.time()))),
            num_replicas=self._replicas,
            description=f"crossws_channels worker channel {channel!r} of {self._names.broadcast!r}",
        )
        try:
            info = await js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
            # Made by an instance with another capacity or expiry: the latest config wins.
            info = await js.update_stream(config)
        self._capacity[channel] = capacity
        state = getattr(info, "state", None)
        return int(getattr(state, "messages", 0) or 0)

    async def _pushes_for(self, channel: str, capacity: int | None, expires: float) -> Pushes:
        """``channel``'s pushes, its stream made or updated for ``capacity`` first (None:
        the stream exists and is left as it is, for an item given back)."""
        client = await self._ready()
        pushes = self._pushes.get(channel)
        if pushes is not None and capacity in (None, self._capacity.get(channel)):
            return pushes
        # Unknown fill: awaited pushes until the next look.
        stored = UNKNOWN if capacity is None else await self._ensure(channel, capacity, expires)
        if pushes is not None:
            pushes.seen(stored)
            return pushes

        async def remake() -> None:
            await self._ensure(channel, self._capacity.get(channel, capacity or 1), expires)

        pushes = Pushes(
            self._inbox,
            self._names.queue_subject(channel),
            self._names.stream(channel),
            client,
            stored,
            lambda error: self.report(error),
            remake,
        )
        self._pushes[channel] = pushes
        return pushes

    async def push(self, channel: str, item: str, capacity: int, expires: float) -> bool:
        data = item.encode("utf-8")
        for attempt in (1, 2):
            pushes = await self._pushes_for(channel, capacity, expires)
            try:
                return await pushes.push(data, capacity, expires)
            except StreamGone:
                # The stream is gone (a flush by another instance): make it again, once.
                self._capacity.pop(channel, None)
                self._forget_pulls(channel)
                if attempt == 2:
                    raise
        return False  # not reached

    async def pop(self, channel: str, timeout: float) -> str | None:
        pulls = await self._pulls_for(channel)
        if pulls is None:
            # No stream yet: nothing was ever sent. Look again soon.
            wait = self._absent.get(channel, ABSENT_FIRST)
            self._absent[channel] = min(wait * 2, ABSENT_MOST)
            await asyncio.sleep(min(wait, timeout))
            return None
        self._absent.pop(channel, None)
        item = await pulls.pop(timeout)
        if pulls.gone:
            # The stream or its consumer was deleted (a flush elsewhere): look it up again.
            self._forget_pulls(channel)
        return item

    def take(self, channel: str) -> str | None:
        """An item of ``channel`` acknowledged and not handed over yet, or None."""
        pulls = self._pulls.get(channel)
        return None if pulls is None else pulls.take()

    async def _pulls_for(self, channel: str) -> Pulls | None:
        from nats.js.errors import NotFoundError

        pulls = self._pulls.get(channel)
        if pulls is not None:
            return pulls
        client = await self._ready()
        js = client.jetstream(timeout=REQUEST_TIMEOUT)
        stream = self._names.stream(channel)
        try:
            await js.consumer_info(stream, CONSUMER)
        except NotFoundError:
            from nats.js.api import AckPolicy, ConsumerConfig

            try:
                await js.add_consumer(
                    stream,
                    ConsumerConfig(
                        durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT
                    ),
                )
            except NotFoundError:
                return None
        pulls = self._pulls[channel] = Pulls(self._inbox, client, stream, CONSUMER)
        return pulls

    def _forget_pulls(self, channel: str) -> None:
        pulls = self._pulls.pop(channel, None)
        if pulls is not None:
            pulls.leftovers()

    async def give_back(self, channel: str, item: str) -> None:
        """Push ``item`` again: JetStream appends, so it goes to the tail, not the head."""
        pushes = await self._pushes_for(channel, None, time.time() + 60)
        if not await pushes.push_now(item.encode("utf-8")):
            raise RuntimeError(f"worker channel {channel!r} is full: a returned item is lost")

    async def flush(self) -> None:
        """Delete every worker-channel stream of this cluster, and nothing else."""
        client = await self._ready()
        js = client.jetstream(timeout=REQUEST_TIMEOUT)
        prefix = self._names.stream_prefix
        for info in await js.streams_info():
            name = info.config.name
            if name and name.startswith(prefix):
                await js.delete_stream(name)
        self._discard(flushed=True)

    def _discard(self, flushed: bool = False) -> None:
        """Drop what this driver knows of streams (they were ``flushed``, or the client
        is gone)."""
        for pushes in self._pushes.values():
            pushes.discard()
        lost = sum(len(pulls.leftovers()) for pulls in self._pulls.values())
        if lost and not flushed:
            self.report(ConnectionError(f"{lost} worker messages taken by an old client are lost"))
        self._pushes.clear()
        self._pulls.clear()
        self._capacity.clear()

    async def close(self) -> None:
        """Finish what is on its way, push back what was taken but never received."""
        pushes, self._pushes = self._pushes, {}
        for channel_pushes in pushes.values():
            await channel_pushes.drain(DRAIN_TIMEOUT)
            channel_pushes.close()
        pulls, self._pulls = self._pulls, {}
        for channel, channel_pulls in pulls.items():
            await channel_pulls.release()
            for item in channel_pulls.leftovers():
                try:
                    await self.give_back(channel, item)
                except Exception as exc:
                    self.report(exc)
        await self._inbox.close()
        self._client = None


def _log(error: Exception) -> None:
    logger.warning("nats worker channel: %s", error)
