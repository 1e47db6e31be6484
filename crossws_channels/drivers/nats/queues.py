"""Worker channels in JetStream: one work-queue stream per worker channel.

A stream with work-queue retention keeps a message until one consumer acknowledges it,
and hands each message to one member of a consumer: every instance of the cluster pulls
from the same durable consumer, so each message is received once in the whole cluster.
The stream is made on the first push with ``max_msgs`` = the channel's capacity and
``discard=new``, so a push to a full channel is refused by the server (``send`` raises
``ChannelFull``), and ``max_age`` = the layer's ``expiry``, so what nobody reads goes
away by itself; a message is stored, so one sent before any receiver exists waits.

A popped message is acknowledged, and the acknowledgement confirmed by the server, before
it is handed to the layer: a message whose acknowledgement did not go through is
redelivered to another receiver later instead of being received twice.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from .connection import Connection
from .options import NatsNames

__all__ = ["WorkerStreams"]

CONSUMER = "workers"
# JetStream's error code for a stream already made with another configuration, and for
# "maximum messages exceeded" on a stream that discards new messages.
STREAM_NAME_IN_USE = 10058
MAX_MESSAGES = 10077
ACK_TIMEOUT = 2.0
REQUEST_TIMEOUT = 5.0


class WorkerStreams:
    """This driver's side of the cluster's worker channels (see the module docstring)."""

    def __init__(self, connection: Connection, names: NatsNames, replicas: int = 1) -> None:
        self._connection = connection
        self._names = names
        self._replicas = replicas
        # Worker channels whose stream this driver made or checked, with its capacity.
        self._ready: dict[str, int] = {}
        self._pulls: dict[str, Any] = {}

    async def _js(self) -> Any:
        client = await self._connection.get()
        return client.jetstream(timeout=REQUEST_TIMEOUT)

    async def _ensure(self, js: Any, channel: str, capacity: int, expires: float) -> None:
        if self._ready.get(channel) == capacity:
            return
        from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig
        from nats.js.errors import BadRequestError

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
            await js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise
            # Made by an instance with another capacity or expiry: the latest config wins.
            await js.update_stream(config)
        self._ready[channel] = capacity

    async def push(self, channel: str, item: str, capacity: int, expires: float) -> bool:
        from nats.js.errors import APIError, NoStreamResponseError

        js = await self._js()
        for attempt in (1, 2):
            await self._ensure(js, channel, capacity, expires)
            try:
                await js.publish(
                    self._names.queue_subject(channel),
                    item.encode("utf-8"),
                    stream=self._names.stream(channel),
                )
            except NoStreamResponseError:
                # The stream is gone (a flush by another instance): make it again, once.
                self._ready.pop(channel, None)
                self._pulls.pop(channel, None)
                if attempt == 2:
                    raise
                continue
            except APIError as exc:
                if exc.err_code == MAX_MESSAGES:
                    return False
                raise
            return True
        return False  # not reached

    async def pop(self, channel: str, timeout: float) -> str | None:
        from nats.errors import TimeoutError as NatsTimeout

        pull = await self._pull(channel)
        if pull is None:
            await asyncio.sleep(timeout)  # no stream yet: nothing was ever sent
            return None
        try:
            messages = await pull.fetch(1, timeout=max(timeout, 0.01))
        except NatsTimeout:
            return None
        except Exception:
            # The stream or its consumer may be gone (a flush elsewhere): look it up again.
            self._pulls.pop(channel, None)
            raise
        message = messages[0]
        await message.ack_sync(timeout=ACK_TIMEOUT)
        return bytes(message.data).decode("utf-8")

    async def _pull(self, channel: str) -> Any:
        from nats.js.errors import NotFoundError

        pull = self._pulls.get(channel)
        if pull is not None:
            return pull
        js = await self._js()
        try:
            pull = await js.pull_subscribe(
                self._names.queue_subject(channel),
                durable=CONSUMER,
                stream=self._names.stream(channel),
            )
        except NotFoundError:
            return None
        self._pulls[channel] = pull
        return pull

    async def give_back(self, channel: str, item: str) -> None:
        """Publish ``item`` again: JetStream appends, so it goes to the tail, not the head."""
        js = await self._js()
        await js.publish(
            self._names.queue_subject(channel),
            item.encode("utf-8"),
            stream=self._names.stream(channel),
        )

    async def flush(self) -> None:
        """Delete every worker-channel stream of this cluster, and nothing else."""
        js = await self._js()
        prefix = self._names.stream_prefix
        for info in await js.streams_info():
            name = info.config.name
            if name and name.startswith(prefix):
                await js.delete_stream(name)
        self.forget()

    def forget(self) -> None:
        self._ready.clear()
        self._pulls.clear()

    async def close(self) -> None:
        pulls, self._pulls = list(self._pulls.values()), {}
        for pull in pulls:
            try:
                await pull.unsubscribe()
            except Exception:
                pass
