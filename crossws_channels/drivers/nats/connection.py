"""The nats driver's client: one connection per driver for everything it does.

NATS multiplexes publishes, subscriptions and JetStream requests over one connection,
so the driver needs no more (but for the heartbeat's way back, see :mod:`.loopback`).
The connection is made with ``no_echo``: the server never delivers what it publishes to
its own subscriptions, so that a sender's burst doesn't come back to it. nats-py
reconnects it by itself (to the next server of ``url`` in a cluster) and restores its
subscriptions; the driver watches the connection's state instead, so that the layer sees
every disconnection as an outage (reported once) and every reconnection as the
subscription coming back, as with the other drivers. A client the user passed in is used
as it is, and never closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .options import NatsOptions

__all__ = ["CONNECT_TIMEOUT", "Connection", "ConnectionLost", "connect_options", "hears_itself"]

logger = logging.getLogger("crossws_channels.drivers.nats")

CONNECT_TIMEOUT = 5.0
# How long nats-py waits between attempts on one server; -1 attempts: for ever, since
# a driver of a running layer never gives up (the layer reports the outage).
RECONNECT_TIME_WAIT = 0.5
POLL = 0.25


def connect_options(options: NatsOptions, name: str) -> dict[str, Any]:
    """The keyword arguments of nats-py's ``connect`` for one of the driver's
    connections: its servers and policy, then the user's ``connect`` options over them."""
    return {
        "servers": options.servers,
        "name": name,
        "connect_timeout": CONNECT_TIMEOUT,
        "reconnect_time_wait": RECONNECT_TIME_WAIT,
        "max_reconnect_attempts": -1,
        "no_echo": True,
        **options.connect,
    }


def hears_itself(client: Any) -> bool:
    """Whether ``client``'s subscriptions get what it publishes (no ``no_echo``)."""
    options = getattr(client, "options", None)
    return not (isinstance(options, dict) and options.get("no_echo"))


class ConnectionLost(ConnectionError):
    """The connection to NATS broke (nats-py is reconnecting)."""


class Connection:
    """The driver's NATS client, opened on first use, and whether it is connected."""

    def __init__(self, options: NatsOptions, name: str) -> None:
        self._options = options
        self._name = name
        self._client: Any = options.client
        self._owned = options.client is None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None
        self.disconnects = 0

    @property
    def client(self) -> Any:
        """The client, for statements that need it connected (:meth:`get`)."""
        return self._client

    @property
    def ready(self) -> Any:
        """The client if it is open on the running loop, else None (then :meth:`get`):
        what a publish needs, without a coroutine."""
        client = self._client
        if (
            client is None
            or self._loop is not asyncio.get_running_loop()
            or (self._owned and client.is_closed)
        ):
            return None
        return client

    async def get(self) -> Any:
        """The client, connecting it first if need be."""
        client = self.ready
        if client is not None:
            return client  # the common case: no lock to take
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and self._owned and self._client is not None:
                # Made on a loop that is gone: it can only be abandoned.
                self._client = None
            self._loop = loop
            self._opening = asyncio.Lock()
            self._changed = asyncio.Event()
        assert self._opening is not None
        async with self._opening:
            client = self._client
            if client is None or (self._owned and client.is_closed):
                self._client = client = await self._connect()
        return client

    async def _connect(self) -> Any:
        from .reader import Client

        options = connect_options(self._options, self._name)
        client = Client()
        await client.connect(
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_changed,
            closed_cb=self._on_changed,
            error_cb=self._on_error,
            **options,
        )
        return client

    async def _on_disconnected(self) -> None:
        self.disconnects += 1
        await self._on_changed()

    async def _on_changed(self) -> None:
        changed = self._changed
        if changed is not None:
            changed.set()
            self._changed = asyncio.Event()

    async def _on_error(self, error: Exception) -> None:
        logger.debug("nats client error: %s", error)

    async def wait_connected(self, timeout: float) -> Any:
        """The client once it is connected; ConnectionLost if it isn't within
        ``timeout`` seconds."""
        client = await self.get()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not client.is_connected:
            changed = self._changed
            remaining = deadline - loop.time()
            if changed is None or remaining <= 0:
                raise ConnectionLost("not connected to NATS")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, POLL))
            client = await self.get()
        return client

    async def until_lost(self, client: Any) -> None:
        """Return when ``client`` is no longer connected."""
        while client.is_connected:
            changed = self._changed
            if changed is None:
                return
            # A client the user passed in has no callbacks of ours: look now and then.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), POLL)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            # What was published last may still be in nats-py's buffer or the socket's:
            # round trips make sure the server has it before the connection goes (and a
            # user's client, left open, has sent what the layer gave it). Two, since
            # nats-py writes a flush's PING ahead of what it still holds.
            try:
                await client.flush(timeout=CONNECT_TIMEOUT)
                await client.flush(timeout=CONNECT_TIMEOUT)
            except Exception as exc:
                logger.debug("flushing the nats connection failed: %s", exc)
        if client is not None and self._owned and not client.is_closed:
            try:
                await asyncio.wait_for(client.close(), CONNECT_TIMEOUT)
            except Exception as exc:
                logger.debug("closing the nats connection failed: %s", exc)
