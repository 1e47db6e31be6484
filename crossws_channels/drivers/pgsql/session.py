"""One database session for the pgsql driver, over psycopg 3 or asyncpg.

The driver speaks to both libraries through :class:`Session`: statements use PostgreSQL's
own ``$1`` placeholders (psycopg runs them through a raw cursor), identifiers are quoted by
psycopg before the text is built, and notifications are handed to a callback as they are
read. :class:`Opener` knows how to open a new session from what the user configured.

A psycopg connection must never be freed while an operation runs on it: psycopg's
statement generators keep libpq's connection pointer and resume on it when the socket
becomes readable (or, if the socket number has been reused by a new connection, when that
one does). :class:`PsycopgSession` counts the operations in flight and, to close a busy
connection, first shuts its socket down, so that the operation fails at once, and frees
the connection only when it has returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import select
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import psycopg
from psycopg import AsyncCursor, AsyncRawCursor, conninfo, pq, sql

from crossws_channels.errors import ConfigurationError

from .options import DEFAULT_APPLICATION_NAME, PgsqlOptions, classify_client

__all__ = ["AsyncpgSession", "Opener", "PsycopgSession", "Session", "Sink", "retrieve", "sqlstate"]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
PING_TIMEOUT = 5.0

Sink = Callable[[str, str], "asyncio.Future[None] | None"]
"""Receives ``(channel, payload)`` of each notification, in order, on the event loop; a
future it returns means "nothing more until this is done" (backpressure)."""

# TCP keepalives let the kernel notice a peer that vanished without closing the socket;
# the idle ping (ping_interval) is the backstop for paths (proxies, NAT) that keepalives
# don't cover.
_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}

# Many notifications in one statement. The arrays travel in binary form (%b): as text,
# psycopg would escape every quote and backslash of every payload in Python. unnest()
# yields the rows in array order, so the notifications keep the order of the batch.
_PSYCOPG_NOTIFY_SAME = "SELECT count(pg_notify(%b, p)) FROM unnest(%b::text[]) AS p"
_PSYCOPG_NOTIFY_MANY = (
    "SELECT count(pg_notify(c, p)) FROM unnest(%b::text[], %b::text[]) AS m(c, p)"
)
_ASYNCPG_NOTIFY_SAME = "SELECT count(pg_notify($1::text, p)) FROM unnest($2::text[]) AS p"
_ASYNCPG_NOTIFY_MANY = (
    "SELECT count(pg_notify(c, p)) FROM unnest($1::text[], $2::text[]) AS m(c, p)"
)


def retrieve(task: asyncio.Future[Any]) -> None:
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

    async def execute(self, query: str, *args: object) -> None:
        """Run one statement whose rows, if any, nobody needs."""

    async def notify_many(self, channels: str | Sequence[str], payloads: Sequence[str]) -> None:
        """NOTIFY each payload, in order, in one statement: on ``channels`` if it is one
        name, else on the channel at the same index."""

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A transaction block, committed on exit."""

    async def listen(self, channels: Sequence[str]) -> None:
        """LISTEN on ``channels``; their notifications go to the sink of :meth:`receive`
        (those arriving before it are kept for it)."""

    async def unlisten(self) -> None:
        """UNLISTEN what :meth:`listen` listened on."""

    async def receive(self, sink: Sink, ping_interval: float) -> None:
        """Hand every notification to ``sink`` until the session breaks, then raise.

        After ``ping_interval`` seconds without traffic, check that the server still
        answers (within ``min(ping_interval, PING_TIMEOUT)``).
        """

    def usable(self) -> bool:
        """False if the session is known to be closed or broken, without a round trip."""

    async def close(self) -> None:
        """Close the session if the driver owns it (never a user's connection)."""

    def abort(self) -> None:
        """Drop an owned session without waiting (its loop may be gone)."""


class _Notifications:
    """Hands a session's notifications to the sink of its running ``receive()``, in
    order. Keeps those read before it started (while LISTEN ran, say) for it, and those
    read while the sink asked to wait: reading the socket stops meanwhile
    (:meth:`_pause_reading`), so that the server keeps the rest in its queue."""

    def __init__(self) -> None:
        self._sink: Sink | None = None
        self._held: deque[tuple[str, str]] = deque()
        self._wait: asyncio.Future[None] | None = None

    @property
    def paused(self) -> bool:
        return self._wait is not None

    def _notified(self, channel: str, payload: str) -> None:
        sink = self._sink
        if sink is None or self._wait is not None:
            self._held.append((channel, payload))
            return
        wait = sink(channel, payload)
        if wait is not None:
            self._hold_until(wait)

    def _hold_until(self, wait: asyncio.Future[None]) -> None:
        self._wait = wait
        self._pause_reading()
        wait.add_done_callback(self._resume)

    def _resume(self, wait: asyncio.Future[None]) -> None:
        if self._wait is not wait:
            return
        self._wait = None
        self._release()
        if self._wait is None and self._sink is not None:
            self._resume_reading()

    def _release(self) -> None:
        """Hand the sink what is held, until it asks to wait again."""
        sink, held = self._sink, self._held
        while sink is not None and held and self._wait is None:
            wait = sink(*held.popleft())
            if wait is not None:
                self._hold_until(wait)

    def _attach(self, sink: Sink) -> None:
        """Make ``sink`` the receiver, after handing it what came before."""
        self._sink = sink
        self._release()

    def _pause_reading(self) -> None:
        """Stop reading the connection's socket (while the sink waits)."""

    def _resume_reading(self) -> None:
        """Read the connection's socket again."""


class _InFlight:
    """``with session._in_flight:`` around each operation on a :class:`PsycopgSession`,
    which counts them, to free its connection only when none is left."""

    __slots__ = ("_session",)

    def __init__(self, session: PsycopgSession) -> None:
        self._session = session

    def __enter__(self) -> None:
        self._session._busy += 1

    def __exit__(self, *exc: object) -> None:
        self._session._leave()


class PsycopgSession(_Notifications):
    """A psycopg 3 ``AsyncConnection`` in autocommit mode."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], *, owned: bool) -> None:
        super().__init__()
        self.conn = conn
        self.owned = owned
        self._channels: list[str] = []
        self._raw = AsyncRawCursor(conn)
        self._cursor: AsyncCursor[Any] = conn.cursor()
        # Operations in flight (statements, the reader); the connection is freed only
        # when none is left.
        self._busy = 0
        self._in_flight = _InFlight(self)
        self._idle: asyncio.Future[None] | None = None
        self._finish_when_idle = False
        self._handler_added = False
        # While _read_until_quiet runs: how to stop and restart reading the socket.
        self._reader: tuple[Callable[[], None], Callable[[], None]] | None = None

    # Operations in flight

    def _leave(self) -> None:
        """One operation less in flight; the last one out frees the connection if its
        closing waits for that."""
        self._busy -= 1
        if self._busy:
            return
        idle, self._idle = self._idle, None
        if idle is not None and not idle.done():
            idle.set_result(None)
        if self._finish_when_idle:
            self._finish_when_idle = False
            self.conn.pgconn.finish()

    def _shutdown(self) -> None:
        """Shut the socket down under whatever waits on it: reads see end of file and
        writes fail, so a pending operation ends now, without the connection being
        freed under it."""
        try:
            fd = self.conn.pgconn.socket
        except psycopg.OperationalError:
            return  # already closed
        try:
            dup = os.dup(fd)
        except OSError:
            return
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            return
        with sock, contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    async def _until_idle(self, timeout: float) -> bool:
        if self._busy:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._idle), timeout)
        return not self._busy

    # Statements

    async def fetch(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        with self._in_flight:
            cursor = self._raw
            await cursor.execute(query, args)
            if cursor.description is None:
                return []
            return await cursor.fetchall()

    async def execute(self, query: str, *args: object) -> None:
        with self._in_flight:
            await self._raw.execute(query, args)

    async def notify_many(self, channels: str | Sequence[str], payloads: Sequence[str]) -> None:
        with self._in_flight:
            if isinstance(channels, str):
                await self._cursor.execute(_PSYCOPG_NOTIFY_SAME, (channels, payloads))
            else:
                await self._cursor.execute(_PSYCOPG_NOTIFY_MANY, (channels, payloads))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        with self._in_flight:
            async with self.conn.transaction() as tx:
                yield tx

    # Notifications

    def _on_notify(self, notify: psycopg.Notify) -> None:
        # Notifications psycopg reads while it runs a statement on this connection.
        self._notified(notify.channel, notify.payload)

    async def listen(self, channels: Sequence[str]) -> None:
        if not self._handler_added:
            self.conn.add_notify_handler(self._on_notify)
            self._handler_added = True
        statement = sql.SQL("; ").join(
            sql.SQL("LISTEN {}").format(sql.Identifier(channel)) for channel in channels
        )
        with self._in_flight:
            await self.conn.execute(statement)
        self._channels.extend(channels)

    async def unlisten(self) -> None:
        if self._channels:
            statement = sql.SQL("; ").join(
                sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)) for channel in self._channels
            )
            self._channels = []
            with self._in_flight:
                await self.conn.execute(statement)
        if self._handler_added:
            self._handler_added = False
            self.conn.remove_notify_handler(self._on_notify)

    async def receive(self, sink: Sink, ping_interval: float) -> None:
        try:
            self._attach(sink)
            while True:
                # Reading holds the connection's lock, as psycopg's notifies() does; the
                # ping (a statement) takes it in turn.
                async with self.conn.lock:
                    await self._read_until_quiet(sink, ping_interval)
                await self._ping(min(PING_TIMEOUT, ping_interval))
        finally:
            self._sink = None

    async def _read_until_quiet(self, sink: Sink, quiet: float) -> None:
        """Read notifications straight off libpq as the socket becomes readable, until
        nothing has arrived for ``quiet`` seconds (or the connection fails). While the
        sink asks to wait, nothing is read: not from libpq, not from the socket."""
        loop = asyncio.get_running_loop()
        pgconn = self.conn.pgconn
        fd = pgconn.socket
        encoding = self.conn.info.encoding
        done: asyncio.Future[None] = loop.create_future()
        heard = loop.time()
        notified = self._notified

        def drain() -> None:
            while self._wait is None and (notify := pgconn.notifies()) is not None:
                notified(notify.relname.decode(encoding), notify.extra.decode(encoding))

        def readable() -> None:
            nonlocal heard
            try:
                pgconn.consume_input()
                drain()
            except Exception as exc:
                loop.remove_reader(fd)
                if not done.done():
                    done.set_exception(exc)
                return
            heard = loop.time()

        def stop() -> None:
            loop.remove_reader(fd)

        def restart() -> None:
            nonlocal heard
            heard = loop.time()  # a pause is not a quiet connection
            try:
                drain()  # what libpq read before the pause
            except Exception as exc:
                if not done.done():
                    done.set_exception(exc)
                return
            if self._wait is None:
                loop.add_reader(fd, readable)

        def check() -> None:
            if done.done():
                return
            due = heard + quiet
            if self._wait is None and loop.time() >= due:
                done.set_result(None)
            else:
                timers.append(loop.call_at(max(due, loop.time() + quiet / 4), check))

        with self._in_flight:
            self._reader = (stop, restart)
            if self._wait is None:
                restart()  # what libpq already holds (the socket won't signal it), then read
            timers = [loop.call_at(heard + quiet, check)]
            try:
                await done
            finally:
                self._reader = None
                timers[-1].cancel()
                loop.remove_reader(fd)

    def _pause_reading(self) -> None:
        if self._reader is not None:
            self._reader[0]()

    def _resume_reading(self) -> None:
        if self._reader is not None:
            self._reader[1]()

    async def _ping(self, timeout: float) -> None:
        # Not asyncio.wait_for: cancelling a statement in flight makes psycopg ask the
        # server to cancel it and wait for that, seconds more on a connection that hangs.
        task = asyncio.ensure_future(self.execute("SELECT 1"))
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:
            task.add_done_callback(retrieve)
            raise
        if done:
            task.result()
            return
        task.add_done_callback(retrieve)
        if self.owned:
            # Make the stuck statement fail now, and let it finish before anyone closes
            # the connection. A user's connection is left as it is, statement included.
            self._shutdown()
            await asyncio.wait({task}, timeout=PING_TIMEOUT)
        raise ConnectionLost(f"the server did not answer a ping within {timeout:g} s")

    # State and closing

    def usable(self) -> bool:
        conn = self.conn
        if conn.closed or conn.broken:
            return False
        if not self.owned or self._busy:
            # The user's connection may be in use elsewhere, and so may a busy one:
            # reading from it could steal a response someone else waits for.
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
        if not self.owned or self.conn.closed:
            return
        if self._busy:
            self._shutdown()
            if not await self._until_idle(PING_TIMEOUT):
                # Still not back: free it whenever it returns, never under it.
                logger.debug("a pgsql connection is closed after its last operation ends")
                self._finish_when_idle = True
                return
        await self.conn.close()

    def abort(self) -> None:
        if not self.owned or self.conn.closed:
            return
        if self._busy:
            self._shutdown()
            self._finish_when_idle = True
        else:
            self.conn.pgconn.finish()


class AsyncpgSession(_Notifications):
    """An asyncpg ``Connection`` (asyncpg is in autocommit mode outside transactions).

    asyncpg runs over an asyncio transport, which can be aborted under a pending
    operation: the operation fails, nothing is freed under it.
    """

    def __init__(self, conn: Any, *, owned: bool) -> None:
        super().__init__()
        self.conn = conn
        self.owned = owned
        self._channels: list[str] = []
        self._lost: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heard = 0.0

    async def fetch(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        rows = await self.conn.fetch(query, *args)
        return [tuple(row) for row in rows]

    async def execute(self, query: str, *args: object) -> None:
        if args:
            await self.conn.fetch(query, *args)
        else:
            await self.conn.execute(query)

    async def notify_many(self, channels: str | Sequence[str], payloads: Sequence[str]) -> None:
        if isinstance(channels, str):
            await self.conn.fetch(_ASYNCPG_NOTIFY_SAME, channels, payloads)
        else:
            await self.conn.fetch(_ASYNCPG_NOTIFY_MANY, channels, payloads)

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Any]:
        manager: contextlib.AbstractAsyncContextManager[Any] = self.conn.transaction()
        return manager

    def _on_notify(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        if self._loop is not None:
            self._heard = self._loop.time()
        self._notified(channel, payload)

    def _transport(self) -> asyncio.ReadTransport | None:
        # asyncpg has no public way to stop reading; without this the notifications it
        # reads while paused wait in memory instead of in the server's queue.
        transport = getattr(self.conn, "_transport", None)
        return transport if isinstance(transport, asyncio.ReadTransport) else None

    def _pause_reading(self) -> None:
        transport = self._transport()
        if transport is not None and transport.is_reading():
            transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._loop is not None:
            self._heard = self._loop.time()  # a pause is not a quiet connection
        transport = self._transport()
        if transport is not None and not transport.is_closing() and not transport.is_reading():
            transport.resume_reading()

    def _on_terminate(self, _conn: object) -> None:
        lost = self._lost
        if lost is not None and not lost.done():
            lost.set_result(None)

    async def listen(self, channels: Sequence[str]) -> None:
        if self._lost is None:
            self._loop = asyncio.get_running_loop()
            self._lost = self._loop.create_future()
            self.conn.add_termination_listener(self._on_terminate)
        for channel in channels:
            # asyncpg quotes the channel name itself.
            await self.conn.add_listener(channel, self._on_notify)
            self._channels.append(channel)

    async def unlisten(self) -> None:
        if self._lost is not None:
            self.conn.remove_termination_listener(self._on_terminate)
        while self._channels:
            await self.conn.remove_listener(self._channels.pop(), self._on_notify)

    async def receive(self, sink: Sink, ping_interval: float) -> None:
        lost = self._lost
        if lost is None:
            raise RuntimeError("receive() before listen()")
        loop = asyncio.get_running_loop()
        try:
            self._attach(sink)
            self._heard = loop.time()
            while True:
                # Woken only by the end of the connection or by ping_interval of quiet:
                # notifications go straight from asyncpg's callback to the sink.
                quiet = self._heard + ping_interval - loop.time()
                if self.paused:  # a paused connection can't answer a ping
                    quiet = max(quiet, ping_interval / 4)
                if quiet > 0:
                    done, _ = await asyncio.wait({lost}, timeout=quiet)
                    if done:
                        raise ConnectionLost("the listening connection was closed")
                    continue
                await self.conn.execute("SELECT 1", timeout=min(PING_TIMEOUT, ping_interval))
                self._heard = loop.time()
        finally:
            self._sink = None

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
