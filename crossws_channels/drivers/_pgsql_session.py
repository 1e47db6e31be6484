"""One database session for the pgsql driver, over psycopg 3 or asyncpg.

The driver speaks to both libraries through :class:`Session`: statements use PostgreSQL's
own ``$1`` placeholders (psycopg runs them through a raw cursor), identifiers are quoted by
psycopg before the text is built, and notifications come out of one async iterator.
:class:`Opener` knows how to open a new session from what the user configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import select
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol

import psycopg
from psycopg import AsyncRawCursor, conninfo, pq, sql

from crossws_channels.errors import ConfigurationError

from ._pgsql_options import DEFAULT_APPLICATION_NAME, PgsqlOptions, classify_client

__all__ = ["AsyncpgSession", "Opener", "PsycopgSession", "Session", "sqlstate"]

CONNECT_TIMEOUT = 10.0
PING_TIMEOUT = 5.0

# TCP keepalives let the kernel notice a peer that vanished without closing the socket;
# the idle ping (ping_interval) is the backstop for paths (proxies, NAT) that keepalives
# don't cover.
_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}


def _retrieve(task: asyncio.Future[Any]) -> None:
    # Marks the outcome of a statement nobody waits for any more as seen.
    if not task.cancelled():
        task.exception()


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a server error from either library, or None."""
    code = getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) else None


class ConnectionLost(ConnectionError):
    """The listening session ended without an error of its own."""


class Session(Protocol):
    """An autocommit session, over either library."""

    owned: bool
    """True if the driver opened it (and so closes it)."""

    async def fetch(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        """Run one statement; return its rows (none for a statement without result)."""

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A transaction block, committed on exit."""

    async def listen(self, channels: Sequence[str]) -> None:
        """LISTEN on ``channels``; their notifications come out of :meth:`notifications`."""

    async def unlisten(self) -> None:
        """UNLISTEN what :meth:`listen` listened on."""

    def notifications(self, ping_interval: float) -> AsyncGenerator[tuple[str, str], None]:
        """Yield ``(channel, payload)`` as they arrive, and check the session is alive
        after ``ping_interval`` seconds of every wait; raise when it breaks."""

    def usable(self) -> bool:
        """False if the session is known to be closed or broken, without a round trip."""

    async def close(self) -> None:
        """Close the session if the driver owns it (never a user's connection)."""

    def abort(self) -> None:
        """Drop an owned session synchronously, when its event loop is gone."""


class PsycopgSession:
    """A psycopg 3 ``AsyncConnection`` in autocommit mode."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], *, owned: bool) -> None:
        self.conn = conn
        self.owned = owned
        self._channels: list[str] = []

    async def fetch(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        async with AsyncRawCursor(self.conn) as cursor:
            await cursor.execute(query, args)
            if cursor.description is None:
                return []
            return await cursor.fetchall()

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        return self.conn.transaction()

    async def listen(self, channels: Sequence[str]) -> None:
        for channel in channels:
            await self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self._channels.append(channel)

    async def unlisten(self) -> None:
        while self._channels:
            channel = self._channels.pop()
            await self.conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))

    async def notifications(self, ping_interval: float) -> AsyncGenerator[tuple[str, str], None]:
        while True:
            # notifies() holds the connection's lock; leaving it every `ping_interval` seconds
            # lets the ping run. psycopg keeps what arrives meanwhile for the next call.
            async with contextlib.aclosing(self.conn.notifies(timeout=ping_interval)) as stream:
                async for notify in stream:
                    yield notify.channel, notify.payload
            await self._ping(min(PING_TIMEOUT, ping_interval))

    async def _ping(self, timeout: float) -> None:
        # Not asyncio.wait_for: cancelling a statement in flight makes psycopg ask the
        # server to cancel it and wait for that, seconds more on a connection that hangs.
        task = asyncio.ensure_future(self.conn.execute("SELECT 1"))
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        finally:
            if not task.done():
                task.add_done_callback(_retrieve)
                if self.owned:
                    # Closing the socket ends the stuck statement at once.
                    self.conn.pgconn.finish()
        if not done:
            raise ConnectionLost(f"the server did not answer a ping within {timeout:g} s")
        task.result()

    def usable(self) -> bool:
        conn = self.conn
        if conn.closed or conn.broken:
            return False
        if not self.owned:
            # The user's connection may be in use elsewhere; reading from it could steal
            # a response someone else waits for.
            return True
        # An idle connection isn't watched by anyone, so a server that went away is only
        # noticed when the next statement fails. If the socket is readable while idle, read
        # what is there: an EOF marks the connection bad before anything is sent on it.
        pgconn = conn.pgconn
        try:
            readable, _, _ = select.select([pgconn.socket], [], [], 0)
            if readable:
                pgconn.consume_input()
        except (OSError, ValueError, psycopg.Error):
            return False
        return bool(pgconn.status == pq.ConnStatus.OK)

    async def close(self) -> None:
        if self.owned:
            await self.conn.close()

    def abort(self) -> None:
        if self.owned:
            self.conn.pgconn.finish()


class AsyncpgSession:
    """An asyncpg ``Connection`` (asyncpg is in autocommit mode outside transactions)."""

    def __init__(self, conn: Any, *, owned: bool) -> None:
        self.conn = conn
        self.owned = owned
        self._channels: list[str] = []
        self._queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()

    async def fetch(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        rows = await self.conn.fetch(query, *args)
        return [tuple(row) for row in rows]

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        manager: contextlib.AbstractAsyncContextManager[Any] = self.conn.transaction()
        return manager

    def _on_notify(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        self._queue.put_nowait((channel, payload))

    def _on_terminate(self, _conn: object) -> None:
        self._queue.put_nowait(None)

    async def listen(self, channels: Sequence[str]) -> None:
        self.conn.add_termination_listener(self._on_terminate)
        for channel in channels:
            # asyncpg quotes the channel name itself.
            await self.conn.add_listener(channel, self._on_notify)
            self._channels.append(channel)

    async def unlisten(self) -> None:
        self.conn.remove_termination_listener(self._on_terminate)
        while self._channels:
            await self.conn.remove_listener(self._channels.pop(), self._on_notify)

    async def notifications(self, ping_interval: float) -> AsyncGenerator[tuple[str, str], None]:
        while True:
            try:
                item = await asyncio.wait_for(self._queue.get(), ping_interval)
            except asyncio.TimeoutError:
                await self.conn.execute("SELECT 1", timeout=min(PING_TIMEOUT, ping_interval))
                continue
            if item is None:
                raise ConnectionLost("the listening connection was closed")
            yield item

    def usable(self) -> bool:
        return not self.conn.is_closed()

    async def close(self) -> None:
        if self.owned and not self.conn.is_closed():
            try:
                await self.conn.close(timeout=PING_TIMEOUT)
            except Exception:
                self.conn.terminate()

    def abort(self) -> None:
        if self.owned:
            self.conn.terminate()


def _asyncpg() -> Any:
    return importlib.import_module("asyncpg")


class Opener:
    """Opens driver-owned sessions from the configured ``dsn``, factory or client."""

    def __init__(self, options: PgsqlOptions) -> None:
        self._options = options

    def user_session(self) -> Session | None:
        """The connection the user passed in, wrapped (never closed by the driver)."""
        client = self._options.client
        if client is None:
            return None
        if self._options.client_kind == "psycopg":
            if not client.closed and not client.autocommit:
                raise ConfigurationError(
                    "must stay in autocommit mode: LISTEN only takes effect, and "
                    "notifications only arrive, outside a transaction",
                    key="client",
                )
            return PsycopgSession(client, owned=False)
        return AsyncpgSession(client, owned=False)

    async def open(self) -> Session:
        """Open a new session that the driver owns."""
        options = self._options
        if options.factory is not None:
            return await self._from_factory(options.factory)
        if options.dsn is not None:
            if options.connector == "asyncpg":
                return await self._asyncpg_connect(dsn=options.dsn)
            return await self._psycopg_connect(options.dsn)
        # Beside a user's connection: the same server, database and credentials.
        if options.client_kind == "psycopg":
            info = options.client.info
            dsn = info.dsn
            if info.password:
                dsn = conninfo.make_conninfo(dsn, password=info.password)
            return await self._psycopg_connect(dsn, name_from_dsn=False)
        return await self._asyncpg_connect(**_asyncpg_parameters(options.client))

    def _application_name(self) -> str:
        return self._options.application_name or DEFAULT_APPLICATION_NAME

    async def _psycopg_connect(self, dsn: str, *, name_from_dsn: bool = True) -> Session:
        given = conninfo.conninfo_to_dict(dsn)
        extra: dict[str, Any] = {k: v for k, v in _KEEPALIVES.items() if k not in given}
        if "connect_timeout" not in given:
            extra["connect_timeout"] = str(int(CONNECT_TIMEOUT))
        # An explicit option wins; otherwise a name set in the dsn is kept.
        if self._options.application_name is not None or not (
            name_from_dsn and "application_name" in given
        ):
            extra["application_name"] = self._application_name()
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, **extra)
        return PsycopgSession(conn, owned=True)

    async def _asyncpg_connect(self, **kwargs: Any) -> Session:
        settings = dict(kwargs.pop("server_settings", None) or {})
        if self._options.application_name is not None or "application_name" not in settings:
            settings["application_name"] = self._application_name()
        conn = await _asyncpg().connect(**kwargs, server_settings=settings, timeout=CONNECT_TIMEOUT)
        return AsyncpgSession(conn, owned=True)

    async def _from_factory(self, factory: Any) -> Session:
        conn = factory()
        if inspect.isawaitable(conn):
            conn = await conn
        try:
            kind = classify_client(conn, "the client factory returned what")
        except ValueError as exc:
            raise ConfigurationError(str(exc), key="client") from None
        connector = self._options.connector
        if connector is not None and connector != kind:
            raise ConfigurationError(
                f"is {connector!r} but the client factory returned a {kind} connection",
                key="connector",
            )
        session: Session
        if kind == "psycopg":
            if not conn.autocommit:
                await conn.set_autocommit(True)
            session = PsycopgSession(conn, owned=True)
        else:
            session = AsyncpgSession(conn, owned=True)
        if self._options.application_name is not None:
            await session.fetch(
                "SELECT set_config('application_name', $1::text, false)",
                self._options.application_name,
            )
        return session


def _asyncpg_parameters(conn: Any) -> dict[str, Any]:
    """Connection arguments for a new asyncpg connection to where ``conn`` is connected.

    asyncpg has no public accessor for them; a connection keeps its address and
    parameters in ``_addr`` and ``_params``, which the driver checked for at construction.
    """
    addr = conn._addr
    params = conn._params
    kwargs: dict[str, Any] = {
        "user": params.user,
        "password": params.password,
        "database": params.database,
        "server_settings": dict(params.server_settings or {}),
    }
    if isinstance(addr, str):
        # A Unix socket path such as /run/postgresql/.s.PGSQL.5432.
        kwargs["host"] = os.path.dirname(addr)
        kwargs["port"] = int(addr.rsplit(".", 1)[-1])
    else:
        kwargs["host"], kwargs["port"] = addr[0], addr[1]
    mode = getattr(params, "sslmode", None)
    name = getattr(mode, "name", "prefer")
    # The SSLContext asyncpg built means "require" when passed back; below that level
    # pass the mode by name so a server without TLS is still reachable.
    if name in ("require", "verify_ca", "verify_full") and params.ssl is not None:
        kwargs["ssl"] = params.ssl
    else:
        kwargs["ssl"] = name
    return kwargs
