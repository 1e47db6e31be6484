"""The redis driver's view of a client library: what it calls, and the connections it opens.

redis-py and valkey-py share one API but ship partial types. The Protocols below name
exactly what the driver uses, so the rest of the driver is checked against them and
works with either library. Only ``Connection.connect/send_command/read_response/
disconnect`` are used below the client, the part of the API that has stayed put across
redis-py 5 to 8 and valkey-py 6.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, cast

from ._redis_config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_SOCKET_TIMEOUT, Connector

__all__ = [
    "CLOSE_TIMEOUT",
    "Client",
    "Connection",
    "ConnectionFactory",
    "disconnect_quietly",
    "pool_from_url",
    "safe_client_name",
]


class Connection(Protocol):
    """One Redis connection (``redis.asyncio.connection.AbstractConnection``)."""

    socket_timeout: float | None

    @property
    def is_connected(self) -> bool: ...

    async def connect(self) -> None: ...

    async def send_command(self, *args: Any, **kwargs: Any) -> None: ...

    async def read_response(
        self, disable_decoding: bool = ..., timeout: float | None = ...
    ) -> Any: ...

    async def can_read_destructive(self) -> bool: ...

    async def disconnect(self, nowait: bool = ...) -> None: ...


class Pool(Protocol):
    connection_class: type[Any]
    connection_kwargs: dict[str, Any]

    async def disconnect(self, inuse_connections: bool = ...) -> None: ...


class Pipeline(Protocol):
    def publish(self, channel: str, message: bytes) -> Any: ...

    async def execute(self, raise_on_error: bool = ...) -> list[Any]: ...

    async def reset(self) -> None: ...


class Script(Protocol):
    def __call__(
        self, keys: Sequence[str] | None = ..., args: Sequence[Any] | None = ...
    ) -> Awaitable[Any]: ...


class Client(Protocol):
    """An asyncio client: ``redis.asyncio.Redis`` or ``valkey.asyncio.Valkey``."""

    connection_pool: Pool

    def publish(self, channel: str, message: bytes) -> Awaitable[int]: ...

    def pipeline(self, transaction: bool = ...) -> Pipeline: ...

    def register_script(self, script: str) -> Script: ...

    def scan(
        self, cursor: int = ..., match: str | None = ..., count: int | None = ...
    ) -> Awaitable[tuple[int, list[Any]]]: ...

    def unlink(self, *names: Any) -> Awaitable[int]: ...

    async def aclose(self) -> None: ...


# Bound on closing one connection or pool: close() must not hang on a dead peer.
CLOSE_TIMEOUT = 2.0


def safe_client_name(name: str) -> str:
    """``name`` with what ``CLIENT SETNAME`` refuses (spaces, control, non-ASCII) replaced."""
    return "".join(c if "!" <= c <= "~" else "_" for c in name)


def pool_from_url(url: str, connector: Connector) -> Pool:
    """The connection settings ``url`` describes, with the driver's default timeouts.

    Only parses: the pool is a template for :class:`ConnectionFactory` and never connects.
    Query string values override the defaults (redis-py's rule for ``from_url``).
    """
    module = importlib.import_module(f"{connector}.asyncio")
    defaults: dict[str, Any] = {
        "socket_timeout": DEFAULT_SOCKET_TIMEOUT,
        "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT,
    }
    if not url.lower().startswith("unix:"):
        defaults["socket_keepalive"] = True
    return cast(Pool, module.ConnectionPool.from_url(url, **defaults))


class ConnectionFactory:
    """Makes the driver's connections from a client's (or a URL's) connection settings.

    The driver opens every connection it uses itself, copying the settings of the pool it
    was given (host, TLS, credentials, timeouts...): a client passed in is never
    used for I/O, so it can't be tied to an event loop the driver no longer runs on, and
    closing the driver never touches it. The copies override what the driver must
    control: raw bytes (a garbage payload must not fail decoding inside the parser),
    RESP2 (pub/sub messages arrive as plain replies), timeouts, and no automatic
    retries (a write retried after the server may have run it would relay a message
    twice).
    """

    def __init__(self, pool: Pool, connector: Connector) -> None:
        self._connector = connector
        self._class = pool.connection_class
        configured = dict(pool.connection_kwargs)
        kwargs = dict(configured)
        kwargs.update(
            decode_responses=False,
            protocol=2,
            health_check_interval=0,
            retry=None,
            retry_on_error=[],
            retry_on_timeout=False,
        )
        if kwargs.get("socket_connect_timeout") is None:
            kwargs["socket_connect_timeout"] = DEFAULT_CONNECT_TIMEOUT
        # RESP3-only extras of redis-py 8 don't apply to a RESP2 connection.
        if "maint_notifications_config" in kwargs:
            kwargs["maint_notifications_config"] = None
        kwargs.pop("maint_notifications_pool_handler", None)
        timeout = configured.get("socket_timeout")
        self.socket_timeout: float = float(timeout) if timeout else DEFAULT_SOCKET_TIMEOUT
        kwargs["socket_timeout"] = self.socket_timeout
        interval = configured.get("health_check_interval")
        self.health_check_interval: float | None = float(interval) if interval else None
        self.client_name: str | None = configured.get("client_name")
        self._kwargs = kwargs

    def __call__(self, client_name: str, socket_timeout: float | None = None) -> Connection:
        """One connection of the driver's own (subscribe, blocking pops)."""
        kwargs = dict(self._kwargs)
        kwargs["client_name"] = safe_client_name(client_name)
        kwargs["socket_timeout"] = socket_timeout or self.socket_timeout
        return cast(Connection, self._class(**kwargs))

    def client(self, client_name: str) -> Client:
        """A client for commands (publishes, scripts), over a pool of the driver's own.

        Its connections are named ``client_name`` unless the settings name them; they
        keep the configured health checks (a PING before a command on a connection idle
        for longer).
        """
        module = importlib.import_module(f"{self._connector}.asyncio")
        kwargs = dict(self._kwargs)
        kwargs["client_name"] = self.client_name or safe_client_name(client_name)
        kwargs["health_check_interval"] = self.health_check_interval or 0
        pool = module.ConnectionPool(connection_class=self._class, **kwargs)
        client_class = module.Redis if self._connector == "redis" else module.Valkey
        return cast(Client, client_class(connection_pool=pool))


async def disconnect_quietly(connection: Connection, *, nowait: bool = False) -> None:
    """Close ``connection``, which is being discarded: a failure to close is moot.

    ``nowait`` skips waiting for the socket to finish closing, for a connection that is
    already broken; otherwise the wait is bounded, so ``close()`` can't hang on a peer
    that stopped answering.
    """
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.disconnect(nowait=nowait), CLOSE_TIMEOUT)
