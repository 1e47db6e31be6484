"""The redis driver's subscription: one connection, from SUBSCRIBE until it is lost.

It subscribes to the cluster's broadcast channel, this instance's direct channel and the
topics the instance listens to (routing "groups"; more are added and removed while it
runs), and is read without a timeout per message, every message one socket read brought handled in
one go. A watchdog bounds silence instead: after ``health_check_interval`` (10 s unless
the URL or client sets it) without traffic it PINGs, and gives up on a connection whose
PING stays unanswered for the socket timeout. Redis keeps what is published for a
subscriber that does not read (backpressure) in that client's output buffer, so a pause
is not silence.

When the connection breaks, :meth:`Subscription.run` raises; the layer's supervisor
subscribes again, with a new :class:`Subscription`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, NoReturn

from ..base import Deliver
from .connection import Connection, ConnectionFactory, bounded, disconnect_quietly
from .resp import ReplyReader, pack

__all__ = ["IDLE_PING_INTERVAL", "SlotMoved", "Subscription"]

logger = logging.getLogger(__name__)

# The subscribe connection pings after this long without traffic (unless the URL or
# client sets ``health_check_interval``) and gives up on it when the reply takes longer
# than the socket timeout: a half-open connection is noticed within their sum (and a
# quarter of the smaller of the two, how often the watchdog looks).
IDLE_PING_INTERVAL = 10.0

_PING = pack(b"PING")


class SlotMoved(ConnectionError):
    """Redis Cluster took a shard channel off this connection (its slot moved): the
    subscription must be made again where the cluster now keeps it."""


class _Verbs:
    """The pub/sub commands and replies: plain, or sharded (Redis Cluster)."""

    def __init__(self, sharded: bool) -> None:
        prefix = b"s" if sharded else b""
        self.sharded = sharded
        self.subscribe = (prefix + b"subscribe").upper()
        self.unsubscribe = (prefix + b"unsubscribe").upper()
        self.subscribed = prefix + b"subscribe"
        self.unsubscribed = prefix + b"unsubscribe"
        self.message = prefix + b"message"

    def commands(self, verb: bytes, channels: list[str]) -> bytes:
        """One command for all ``channels``; one per channel when sharded, since the
        channels of one sharded command must share a slot."""
        words = [channel.encode("utf-8") for channel in channels]
        if self.sharded:
            return b"".join(pack(verb, word) for word in words)
        return pack(verb, *words)


class Subscription:
    """One subscribe connection, to ``channels()`` (read when it subscribes) and to
    what :meth:`add` adds; ``sharded``: SSUBSCRIBE on one node of a Redis Cluster."""

    def __init__(
        self,
        connections: ConnectionFactory,
        client_name: str,
        channels: Callable[[], list[str]],
        *,
        sharded: bool = False,
    ) -> None:
        self._connections = connections
        self._channels = channels
        self._verbs = _Verbs(sharded)
        self._name = client_name
        self._connection: Connection = connections(client_name)
        self._replies: ReplyReader | None = None
        self._heard = 0  # reads that brought replies, for the watchdog
        self._paused = False  # the layer asked the reader to wait (backpressure)
        # Set once the first SUBSCRIBE is confirmed (or failed): topics added meanwhile
        # wait for it, then go in a SUBSCRIBE of their own.
        self._opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        # Topic channels whose SUBSCRIBE the reader has yet to see confirmed.
        self._confirming: dict[bytes, list[asyncio.Future[None]]] = {}
        # Channels this side unsubscribed from: their unsubscribe reply is expected.
        self._leaving: set[bytes] = set()

    async def open(self, deliver: Deliver) -> None:
        """Connect and SUBSCRIBE; return once Redis confirmed every channel."""
        connections = self._connections
        connection = self._connection
        verbs = self._verbs
        bound = connections.connect_timeout + connections.socket_timeout
        try:
            async with bounded(bound):
                await connection.connect()
                replies = self._replies = ReplyReader(connection, connections.reply_error)
                channels = self._channels()
                if channels:
                    await connection.send_packed_command(
                        verbs.commands(verbs.subscribe, channels), check_health=False
                    )
                confirmed = 0
                while confirmed < len(channels):
                    for reply in await replies.read():
                        kind = _kind(reply)
                        if kind == verbs.subscribed:
                            confirmed += 1
                        elif kind == verbs.message and len(reply) == 3:
                            deliver(reply[2])  # arrived before the last confirmation
                        elif isinstance(reply, Exception):
                            raise reply  # MOVED: the slot is elsewhere now
        except TimeoutError:
            self._opened.set_result(False)
            raise TimeoutError(
                f"Redis did not accept the connection and confirm "
                f"{verbs.subscribe.decode()} within {bound:g} s"
            ) from None
        except BaseException:
            self._opened.set_result(False)
            raise
        self._opened.set_result(True)

    async def add(self, channels: list[str]) -> None:
        """SUBSCRIBE to more channels; return once Redis confirmed them, or the
        connection is gone (the next subscription has them)."""
        if not await asyncio.shield(self._opened) or not channels:
            return
        loop = asyncio.get_running_loop()
        waiting = []
        for channel in channels:
            future: asyncio.Future[None] = loop.create_future()
            self._confirming.setdefault(channel.encode("utf-8"), []).append(future)
            waiting.append(future)
        verbs = self._verbs
        try:
            async with bounded(self._connections.socket_timeout):
                await self._connection.send_packed_command(
                    verbs.commands(verbs.subscribe, channels), check_health=False
                )
        except Exception:
            self._release_confirmations()
            raise
        await asyncio.gather(*waiting)

    async def remove(self, channels: list[str]) -> None:
        """UNSUBSCRIBE from channels; what was in flight on them may still arrive."""
        if channels and self._opened.done() and self._opened.result():
            verbs = self._verbs
            self._leaving.update(channel.encode("utf-8") for channel in channels)
            async with bounded(self._connections.socket_timeout):
                await self._connection.send_packed_command(
                    verbs.commands(verbs.unsubscribe, channels), check_health=False
                )

    def _confirmed(self, channel: bytes) -> None:
        for future in self._confirming.pop(channel, ()):
            if not future.done():
                future.set_result(None)

    def _release_confirmations(self) -> None:
        confirming, self._confirming = self._confirming, {}
        for futures in confirming.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)

    async def run(self, deliver: Deliver) -> NoReturn:
        """Read until the connection fails, or until the watchdog gives up on it."""
        replies = self._replies
        if replies is None:
            raise RuntimeError("run() before open()")
        reader = asyncio.get_running_loop().create_task(
            self._read(replies, deliver), name=f"crossws_channels redis reader {self._name}"
        )
        try:
            await self._watch(reader)
        finally:
            self._release_confirmations()
            reader.cancel()
            await asyncio.wait([reader])
            if not reader.cancelled():
                reader.exception()  # retrieved: the watchdog's own error is the one raised

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the connection went (a sentinel-managed one: the master it was told of)."""
        host, port = (
            getattr(self._connection, "host", None),
            getattr(self._connection, "port", None),
        )
        return (host, int(port)) if isinstance(host, str) and port is not None else None

    async def close(self) -> None:
        await disconnect_quietly(self._connection, nowait=True)

    async def _read(self, replies: ReplyReader, deliver: Deliver) -> NoReturn:
        # The hot path: no timer (the watchdog bounds silence), and every message that
        # one socket read brought handled in one go. When the layer asks it to wait (a
        # channel is full while its consumer reads), the reader stops reading: Redis
        # keeps the rest in this client's output buffer until it resumes.
        read = replies.read
        verbs = self._verbs
        message = verbs.message
        while True:
            batch = await read()
            self._heard += 1
            for reply in batch:
                if type(reply) is not list or len(reply) != 3:
                    continue
                if reply[0] != message:
                    self._on_reply(reply)
                    continue
                data = reply[2]
                try:
                    wait = deliver(data)
                except Exception:
                    # Deliver promises not to raise; if it does anyway, the reader must
                    # live on.
                    logger.exception("deliver raised on a %d-byte message", len(data))
                    continue
                if wait is not None:
                    self._paused = True
                    try:
                        await wait
                    finally:
                        self._paused = False
                        self._heard += 1

    def _on_reply(self, reply: list[Any]) -> None:
        kind, channel = reply[0], reply[1]
        verbs = self._verbs
        if kind == verbs.subscribed:
            self._confirmed(channel)  # a topic added while running
        elif kind == verbs.unsubscribed:
            if channel in self._leaving:
                self._leaving.discard(channel)
            elif verbs.sharded:
                # Not asked for: the cluster moved the channel's slot to another node.
                raise SlotMoved(f"Redis Cluster moved {channel!r} to another node")

    async def _watch(self, reader: asyncio.Task[NoReturn]) -> NoReturn:
        """Raise when ``reader`` fails, or when the connection has been silent for
        ``health_check_interval`` and then left a PING unanswered for the socket
        timeout: silence may be a quiet channel or a dead peer, and a PING tells them
        apart."""
        loop = asyncio.get_running_loop()
        connections = self._connections
        interval = connections.health_check_interval or IDLE_PING_INTERVAL
        patience = connections.socket_timeout
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
                    await self._connection.send_packed_command(_PING, check_health=False)
                pinged_at = now


def _kind(reply: Any) -> bytes | None:
    if isinstance(reply, list) and reply and isinstance(reply[0], bytes):
        return reply[0]
    return None
