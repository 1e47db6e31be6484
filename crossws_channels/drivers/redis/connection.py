"""The redis driver's view of a client library: what it calls, and the connections it opens.

redis-py and valkey-py share one API but ship partial types. The Protocols below name
exactly what the driver uses, so the rest of the driver is checked against them and
works with either library. Below the client only ``Connection.connect/send_command/
send_packed_command/read_response/disconnect`` are used, the part of the API that has
stayed put across redis-py 5 to 8 and valkey-py 6. What goes further (reading replies
off the connection's stream, packing commands) is in :mod:`.resp`.

The driver's own connections have no socket timeout: redis-py would start a timer (and,
for writes, a task) for every reply read and every write, which costs more than the
rest of relaying a message. The driver bounds what it does itself instead: one timeout
per exchange (:class:`CommandConnection`, a batch of publishes and all its replies), and
a watchdog for the subscription, which waits for messages without any bound. The
subscription is read by :class:`ReplyReader`, many messages per socket read.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import math
import sys
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

from .options import DEFAULT_CONNECT_TIMEOUT, DEFAULT_SOCKET_TIMEOUT, Connector
from .resp import ReplyReader, resp2_settings

__all__ = [
    "CLOSE_TIMEOUT",
    "Client",
    "CommandConnection",
    "Connection",
    "ConnectionFactory",
    "Pool",
    "ask_once",
    "bounded",
    "bounded_compat",
    "check_pool_settings",
    "check_url_settings",
    "disconnect_quietly",
    "pool_from_url",
    "safe_client_name",
]


class Connection(Protocol):
    """One Redis connection (``redis.asyncio.connection.AbstractConnection``)."""

    @property
    def is_connected(self) -> bool: ...

    async def connect(self) -> None: ...

    async def send_command(self, *args: Any, **kwargs: Any) -> None: ...

    async def send_packed_command(self, command: bytes, check_health: bool = ...) -> None: ...

    async def read_response(
        self, disable_decoding: bool = ..., timeout: float | None = ...
    ) -> Any: ...

    async def disconnect(self, nowait: bool = ...) -> None: ...


class Pool(Protocol):
    connection_class: type[Any]
    connection_kwargs: dict[str, Any]

    async def disconnect(self, inuse_connections: bool = ...) -> None: ...


class Client(Protocol):
    """An asyncio client: ``redis.asyncio.Redis`` or ``valkey.asyncio.Valkey``."""

    connection_pool: Pool

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


# URL options that are a number of seconds or a count: checked here, since redis-py takes
# any number (a negative timeout fails every connection attempt later, for ever).
_POSITIVE_SECONDS = ("socket_timeout", "socket_connect_timeout", "timeout")
_NON_NEGATIVE = ("health_check_interval", "db")


def check_url_settings(url: str, pool: Pool) -> None:
    """Refuse, at start-up, what redis-py's ``from_url`` accepted but would fail on (or
    silently ignore) when connecting: an option no connection takes, a timeout that is
    not a positive number of seconds, a database that is not a number. Raises ValueError
    naming the option."""
    check_pool_settings(pool)
    parts = urlsplit(url)
    if parts.scheme.lower() in ("redis", "rediss", "valkey", "valkeys"):
        database = parts.path.strip("/")
        if database and not database.isdigit():
            raise ValueError(f"the database in the path must be a number, not {database!r}")


def check_pool_settings(pool: Pool) -> None:
    """Refuse connection settings a connection would fail on, or silently ignore: an
    option no connection takes, a timeout that is not a positive number of seconds.
    Raises ValueError naming the option."""
    kwargs: dict[str, Any] = dict(pool.connection_kwargs)
    accepted: set[str] = set()
    for cls in type.mro(pool.connection_class):
        init = cls.__dict__.get("__init__")
        if init is not None:
            accepted.update(inspect.signature(init).parameters)
    unknown = sorted(set(kwargs) - accepted - {"self", "kwargs"})
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not an option of a redis connection")
    for name in _POSITIVE_SECONDS + _NON_NEGATIVE:
        value = kwargs.get(name)
        if value is None:
            continue
        low_ok = value >= 0 if name in _NON_NEGATIVE else value > 0
        if not (isinstance(value, (int, float)) and math.isfinite(value) and low_ok):
            raise ValueError(f"{name}={value!r} is out of range")


class ConnectionFactory:
    """Makes the driver's connections from a client's (or a URL's) connection settings.

    The driver opens every connection it uses itself, copying the settings of the pool it
    was given (host, TLS, credentials...): a client passed in is never used for I/O, so
    it can't be tied to an event loop the driver no longer runs on, and closing the
    driver never touches it. The copies override what the driver must control: raw bytes
    (a garbage payload must not fail decoding inside the parser), RESP2 (pub/sub
    messages arrive as plain replies), timeouts, and no automatic retries (a write
    retried after the server may have run it would relay a message twice).
    """

    def __init__(self, pool: Pool, connector: Connector) -> None:
        self._connector = connector
        self._class = pool.connection_class
        configured = dict(pool.connection_kwargs)
        kwargs = resp2_settings(configured)
        kwargs.update(
            decode_responses=False,
            health_check_interval=0,
            retry=None,
            retry_on_error=[],
            retry_on_timeout=False,
        )
        connect_timeout = kwargs.get("socket_connect_timeout")
        self.connect_timeout = float(connect_timeout or DEFAULT_CONNECT_TIMEOUT)
        kwargs["socket_connect_timeout"] = self.connect_timeout
        timeout = configured.get("socket_timeout")
        self.socket_timeout: float = float(timeout) if timeout else DEFAULT_SOCKET_TIMEOUT
        """How long one exchange with Redis may take (and a PING its reply)."""
        kwargs["socket_timeout"] = self.socket_timeout
        interval = configured.get("health_check_interval")
        self.health_check_interval: float | None = float(interval) if interval else None
        self.client_name: str | None = configured.get("client_name")
        self._kwargs = kwargs
        exceptions = importlib.import_module(f"{connector}.exceptions")
        self.reply_error: type[Exception] = exceptions.ResponseError
        self.no_script_error: type[Exception] = exceptions.NoScriptError

    def __call__(self, client_name: str) -> Connection:
        """One connection of the driver's own, named ``client_name``.

        It has no socket timeout (see the module docstring): whoever uses it bounds
        connecting and every exchange, with :func:`bounded`.
        """
        kwargs = dict(self._kwargs)
        kwargs["client_name"] = safe_client_name(client_name)
        kwargs["socket_timeout"] = None
        return cast(Connection, self._class(**kwargs))

    def command_name(self, fallback: str) -> str:
        """The name of the command connections: the configured one, else ``fallback``."""
        return self.client_name or fallback

    def client(self, client_name: str) -> Client:
        """A client for occasional commands (``flush``), over a pool of the driver's own.

        Its connections are named ``client_name`` unless the settings name them; they
        keep the configured socket timeout and health checks.
        """
        module = importlib.import_module(f"{self._connector}.asyncio")
        kwargs = dict(self._kwargs)
        kwargs["client_name"] = self.command_name(safe_client_name(client_name))
        kwargs["health_check_interval"] = self.health_check_interval or 0
        pool = module.ConnectionPool(connection_class=self._class, **kwargs)
        client_class = module.Redis if self._connector == "redis" else module.Valkey
        return cast(Client, client_class(connection_pool=pool))


class CommandConnection:
    """One connection of the driver's own for commands and their replies.

    :meth:`execute` writes a pre-packed buffer of commands in one write and reads their
    replies (with a :class:`ReplyReader`), all under one timeout; callers take turns (in
    order: an ``asyncio.Lock`` is fair), so the replies are theirs. It connects when
    first used, and again after a failure or after the server closed it while idle, but
    never re-sends anything: a command that may have reached Redis is not sent twice.
    """

    def __init__(self, connections: ConnectionFactory, client_name: str) -> None:
        self._connections = connections
        self._name = client_name
        self._connection: Connection | None = None
        self._reader: ReplyReader | None = None
        self._turn = asyncio.Lock()
        self._closed = False

    async def execute(self, packed: bytes, replies: int, *, wait: float = 0.0) -> list[Any]:
        """Send ``packed`` (``replies`` commands) and return the replies, in order.

        A reply that is an error (``-ERR ...``) comes back as its exception object, so
        the other replies are still read. Raises ``TimeoutError`` if Redis has not
        answered within the socket timeout (plus ``wait``, for a blocking command, and
        the connect timeout if a connection must be opened), and whatever the client
        library raises when connecting or the connection breaks; the connection is
        then dropped and the next call opens another.
        """
        connections = self._connections
        bound = connections.socket_timeout + wait
        current = self._connection
        if current is None or not current.is_connected:
            bound += connections.connect_timeout
        try:
            async with bounded(bound), self._turn:
                connection, reader = await self._ready()
                try:
                    await connection.send_packed_command(packed, check_health=False)
                    results: list[Any] = []
                    while len(results) < replies:
                        results += await reader.read()
                except BaseException:
                    await disconnect_quietly(connection, nowait=True)
                    raise
                if any(_demoted(reply) for reply in results):
                    # A master demoted to a replica (a Sentinel failover): connect afresh
                    # next time, which asks the sentinels where the master is now.
                    await disconnect_quietly(connection, nowait=True)
        except TimeoutError:
            raise TimeoutError(f"Redis did not answer within {bound:g} s") from None
        return results

    async def _ready(self) -> tuple[Connection, ReplyReader]:
        if self._closed:
            raise RuntimeError("the connection was closed")
        connection, reader = self._connection, self._reader
        if connection is None:
            connection = self._connection = self._connections(self._name)
        elif connection.is_connected and reader is not None:
            if not await reader.closed_while_idle():
                return connection, reader
            await disconnect_quietly(connection, nowait=True)
        self._reader = None
        try:
            await connection.connect()
        except BaseException:
            await disconnect_quietly(connection, nowait=True)
            raise
        self._reader = reader = ReplyReader(connection, self._connections.reply_error)
        return connection, reader

    async def reset(self) -> None:
        """Drop the connection; the next call opens another (the master moved). A call
        in progress fails."""
        connection = self._connection
        if connection is not None:
            await disconnect_quietly(connection, nowait=True)

    async def close(self) -> None:
        """Close the connection (bounded); refuse further use."""
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            await disconnect_quietly(connection)


def _demoted(reply: Any) -> bool:
    """A ``-READONLY`` reply (the client library maps it to its ReadOnlyError)."""
    return isinstance(reply, Exception) and (
        type(reply).__name__ == "ReadOnlyError" or str(reply).startswith("READONLY")
    )


@contextlib.asynccontextmanager
async def bounded_compat(delay: float) -> AsyncIterator[None]:
    """``asyncio.timeout(delay)`` for Python 3.10: raise ``TimeoutError`` if the block
    takes longer than ``delay`` seconds (by cancelling the task running it)."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("bounded() must be used inside a task")
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    handle = asyncio.get_running_loop().call_later(delay, expire)
    try:
        yield
    except asyncio.CancelledError:
        if expired:
            raise TimeoutError from None
        raise
    finally:
        handle.cancel()


if sys.version_info >= (3, 11):
    bounded = asyncio.timeout
else:
    bounded = bounded_compat


async def ask_once(connection: Connection, *command: Any) -> Any:
    """Run one command over ``connection`` (new), closing it before the reply is used:
    an attempt cut short (a timeout, the driver closing) leaves nothing open."""
    try:
        await connection.connect()
        await connection.send_command(*command)
        return await connection.read_response()
    finally:
        await connection.disconnect(nowait=True)


async def disconnect_quietly(connection: Connection, *, nowait: bool = False) -> None:
    """Close ``connection``, which is being discarded: a failure to close is moot.

    ``nowait`` skips waiting for the socket to finish closing, for a connection that is
    already broken; otherwise the wait is bounded, so ``close()`` can't hang on a peer
    that stopped answering.
    """
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.disconnect(nowait=nowait), CLOSE_TIMEOUT)
