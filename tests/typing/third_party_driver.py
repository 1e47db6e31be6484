"""A complete crossws_channels driver in one page: relaying over Redis pub/sub."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import redis.asyncio as redis

from crossws_channels.drivers import Deliver, DriverFactory, Ready
from crossws_channels.errors import ConfigurationError


class TinyRedisDriver:
    """Relays every envelope over one Redis pub/sub channel."""

    # Option names besides "channel"; the layer rejects any other key for us.
    OPTIONS = frozenset({"url"})

    def __init__(self, instance_id: str, options: Mapping[str, Any]) -> None:
        # Validate here, at start-up, but open nothing: no event loop runs yet.
        url = options.get("url")
        if not isinstance(url, str) or not url.startswith("redis://"):
            raise ConfigurationError(f"must be a redis:// URL, got {url!r}", key="url")
        self._url = url
        self._topic = f"tiny-driver:{options['channel']}"
        self._client: redis.Redis | None = None

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(self._url)
        return self._client

    async def publish(self, envelope: str, /) -> None:
        # Raising is fine: the layer reports the failure with stage "publish".
        await self._redis().publish(self._topic, envelope)

    async def listen(self, deliver: Deliver, ready: Ready, /) -> None:
        # aclosing() unsubscribes and releases the connection however listen() ends.
        pubsub = self._redis().pubsub(ignore_subscribe_messages=True)
        async with contextlib.aclosing(pubsub):
            # If Redis is down this raises: the layer reports it and calls listen again
            # later, with backoff. The same when the connection drops below.
            await pubsub.subscribe(self._topic)
            ready()
            async for message in pubsub.listen():
                # Raw bytes as they came: the layer decodes, validates and drops our echo.
                wait = deliver(message["data"])
                if wait is not None:
                    # A full channel whose consumer reads: read on once it has caught up.
                    # Meanwhile Redis holds what is sent to us.
                    await wait

    async def close(self) -> None:
        # The layer has stopped listen() by now: only the client is left.
        if self._client is not None:
            await self._client.aclose()


# mypy checks here that the class satisfies the driver protocol.
factory: DriverFactory = TinyRedisDriver
