"""How the driver sends to its own instance: a second connection, for publishing only.

The driver's connection is made with ``no_echo`` (:mod:`.connection`): without it every
``group_send`` came back to its sender, which read and dropped it (a third of what a
sender does in a burst), and the server delivered each message twice. What an instance
must hear from itself, the layer's heartbeat, then can't come back over that connection:
it is published over this one instead, opened on first use and kept. The heartbeat still
proves what it is for: that the server delivers to the instance's subscriptions.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .connection import CONNECT_TIMEOUT, connect_options
from .options import NatsOptions

__all__ = ["Loopback"]

logger = logging.getLogger("crossws_channels.drivers.nats")


class Loopback:
    """A publishing connection to the same servers, with the same credentials."""

    def __init__(self, options: NatsOptions, name: str) -> None:
        self._options = options
        self._name = name
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Lock | None = None

    async def client(self) -> Any:
        """The connection, opened if need be (on the running loop)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # One made on a loop that is gone can only be abandoned.
            self._client, self._loop, self._opening = None, loop, asyncio.Lock()
        assert self._opening is not None
        async with self._opening:
            client = self._client
            if client is None or client.is_closed:
                import nats

                options = {"error_cb": _on_error, **connect_options(self._options, self._name)}
                self._client = client = await nats.connect(**options)
        return client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None or client.is_closed or self._loop is not asyncio.get_running_loop():
            return
        try:
            await asyncio.wait_for(client.close(), CONNECT_TIMEOUT)
        except Exception as exc:
            logger.debug("closing the nats loopback connection failed: %s", exc)


async def _on_error(error: Exception) -> None:
    # nats-py logs each failed reconnection attempt as an error by default; the main
    # connection's outage is what the layer reports.
    logger.debug("nats loopback connection error: %s", error)
