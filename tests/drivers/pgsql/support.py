"""Helpers shared by the pgsql driver tests (this module holds no tests of its own).

Every test uses channel names and an ``application_name`` of its own, so tests never see
each other's traffic or connections on the shared server, and drops the tables its
clusters created.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg

from crossws_channels.drivers.pgsql import PgsqlDriver, table_names
from crossws_channels.drivers.pgsql.options import Names
from crossws_channels.drivers.pgsql.sql import PUSH_ARGUMENTS
from tests.drivers.collector import Collector
from tests.drivers.listening import listen
from tests.servers import free_port

__all__ = [
    "Cluster",
    "FreezingProxy",
    "admin_query",
    "backends",
    "drop_tables",
    "unique",
]

CONNECTORS = ["psycopg", "asyncpg"]


def unique(prefix: str = "pg") -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def admin_query(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of its own (never the driver's)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(query, params)
        return await cursor.fetchall() if cursor.description else []


def admin_query_sync(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """The same as :func:`admin_query`, outside any event loop."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


async def backends(dsn: str, application_name: str) -> list[tuple[int, str, str]]:
    """``(pid, state, query)`` of every server backend with this application_name."""
    rows = await admin_query(
        dsn,
        "SELECT pid, coalesce(state, ''), coalesce(query, '') FROM pg_stat_activity "
        "WHERE application_name = %s AND pid <> pg_backend_pid()",
        application_name,
    )
    return [(int(pid), str(state), str(query)) for pid, state, query in rows]


async def listening_backend(dsn: str, application_name: str, timeout: float = 5.0) -> int:
    """The pid of the backend that ran LISTEN for this application_name."""
    deadline = time.monotonic() + timeout
    while True:
        for pid, _state, query in await backends(dsn, application_name):
            if query.upper().startswith("LISTEN"):
                return pid
        if time.monotonic() > deadline:
            raise AssertionError(f"no listening backend for {application_name!r}")
        await asyncio.sleep(0.05)


def drop_tables(dsn: str, channel: str) -> None:
    """Drop the worker-queue and large-message tables of cluster ``channel``, and its
    push function."""
    queue, large = table_names(channel)
    push = Names.for_instance(channel, "any").push_function
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            psycopg.sql.SQL("DROP TABLE IF EXISTS {}, {}").format(
                psycopg.sql.Identifier(queue), psycopg.sql.Identifier(large)
            )
        )
        conn.execute(
            psycopg.sql.SQL("DROP FUNCTION IF EXISTS {}({})").format(
                psycopg.sql.Identifier(push), psycopg.sql.SQL(PUSH_ARGUMENTS)
            )
        )


class Cluster:
    """Makes pgsql drivers on one channel, subscribes them, and closes them after."""

    def __init__(self, dsn: str, connector: str = "psycopg") -> None:
        self.dsn = dsn
        self.connector = connector
        self.channel = unique("cluster")
        self.application_name = unique("crossws-test")
        self.drivers: list[PgsqlDriver] = []
        self.channels: set[str] = {self.channel}

    def driver(self, instance_id: str | None = None, **options: Any) -> PgsqlDriver:
        """A driver of this cluster (or of ``channel=...``), not yet subscribed."""
        options.setdefault("channel", self.channel)
        if "client" not in options:
            options.setdefault("dsn", self.dsn)
            options.setdefault("connector", self.connector)
        options.setdefault("application_name", self.application_name)
        self.channels.add(options["channel"])
        driver = PgsqlDriver(instance_id or unique("instance"), options)
        self.drivers.append(driver)
        return driver

    async def member(
        self, instance_id: str | None = None, **options: Any
    ) -> tuple[PgsqlDriver, Collector]:
        """A subscribed driver and the collector it delivers to."""
        driver = self.driver(instance_id, **options)
        collector = Collector()
        await listen(driver, collector)
        return driver, collector

    async def close(self) -> None:
        for driver in self.drivers:
            await asyncio.wait_for(driver.close(), 10)


@contextlib.asynccontextmanager
async def cluster_of(dsn: str, connector: str = "psycopg") -> AsyncIterator[Cluster]:
    """A :class:`Cluster` whose drivers are closed and tables dropped on exit."""
    cluster = Cluster(dsn, connector)
    try:
        yield cluster
    finally:
        await cluster.close()
        for channel in cluster.channels:
            await asyncio.to_thread(drop_tables, dsn, channel)


@contextlib.contextmanager
def no_leftover_tables(dsn: str, channel: str) -> Iterator[None]:
    """Drop the tables of ``channel`` after the block."""
    try:
        yield
    finally:
        drop_tables(dsn, channel)


class FreezingProxy:
    """A TCP proxy to PostgreSQL that can go silent: data stops flowing, nothing closes.

    That is what a dead NAT entry or a half-open connection looks like to the driver:
    only its idle ping can notice.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._frozen: set[int] = set()
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    @property
    def connections(self) -> int:
        """Connections made through the proxy so far."""
        return len(self._pairs)

    def freeze(self) -> None:
        """Silence every connection open now; new ones flow normally."""
        self._frozen.update(id(pair) for pair in self._pairs)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        pair = (writer, up_writer)
        self._pairs.append(pair)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink, id(pair)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, key: int
    ) -> None:
        with contextlib.suppress(Exception):
            while data := await source.read(65536):
                if key not in self._frozen:
                    sink.write(data)
                    await sink.drain()
        with contextlib.suppress(Exception):
            sink.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for a, b in self._pairs:
            a.close()
            b.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
