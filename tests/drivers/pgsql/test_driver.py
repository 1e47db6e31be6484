"""The pgsql driver against the real PostgreSQL: options, relay, large messages, ownership."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import psycopg_pool
import pytest
from psycopg import sql

from crossws_channels.drivers import (
    SupportsBatch,
    SupportsDirect,
    SupportsFlush,
    SupportsWorkerQueue,
)
from crossws_channels.drivers.pgsql import PgsqlDriver, table_names
from crossws_channels.drivers.pgsql.options import (
    Names,
    _check_psycopg_version,
    direct_channel,
)
from crossws_channels.envelope import SyncMessage, decode_envelope, encode_envelope
from crossws_channels.errors import BackplaneError, ConfigurationError
from tests.conftest import PG_DSN
from tests.drivers.collector import Collector
from tests.drivers.listening import listen
from tests.drivers.pgsql.support import (
    Cluster,
    admin_query,
    admin_query_sync,
    backends,
    cluster_of,
    drop_tables,
    unique,
)
from tests.servers import free_port
from tests.waiting import eventually_async

pytestmark = pytest.mark.pgsql


def make_psycopg_connection() -> Any:
    """A zero-argument factory (sync) returning a coroutine, as dotted-path options allow."""
    return psycopg.AsyncConnection.connect(PG_DSN, autocommit=True, application_name=FACTORY_NAME)


async def make_asyncpg_connection() -> Any:
    """An async zero-argument factory returning an asyncpg connection."""
    return await asyncpg.connect(PG_DSN, server_settings={"application_name": FACTORY_NAME})


def make_nothing_useful() -> object:
    """A factory returning something that is not a connection."""
    return object()


FACTORY_NAME = "crossws-test-factory"
NOT_A_CLIENT = object()


def envelope(topic: str, data: str | bytes, instance: str = "sender") -> str:
    return encode_envelope(instance, SyncMessage("", topic, data))


# Options


def test_dsn_or_client_is_required() -> None:
    """Without dsn or client the driver refuses to start and names the dsn key."""
    with pytest.raises(ConfigurationError) as info:
        PgsqlDriver("i", {"channel": "c"})
    assert info.value.key == "dsn"
    assert "client" in info.value.message


def test_dsn_and_client_together_are_refused() -> None:
    """Giving both dsn and client is a configuration error."""
    with pytest.raises(ConfigurationError) as info:
        PgsqlDriver(
            "i", {"channel": "c", "dsn": PG_DSN, "client": f"{__name__}.make_nothing_useful"}
        )
    assert info.value.key == "client"


def test_unknown_option_is_refused_by_name() -> None:
    """A misspelt option raises, naming the key."""
    with pytest.raises(ConfigurationError) as info:
        PgsqlDriver("i", {"channel": "c", "dsn": PG_DSN, "dns": PG_DSN})
    assert info.value.key == "dns"


def test_channel_over_63_bytes_is_refused() -> None:
    """A channel of 64 UTF-8 bytes (32 characters) is refused at construction; 63 is fine."""
    with pytest.raises(ConfigurationError) as info:
        PgsqlDriver("i", {"channel": "é" * 32, "dsn": PG_DSN})
    assert info.value.key == "channel"
    assert "63 bytes" in info.value.message
    PgsqlDriver("i", {"channel": "é" * 31 + "x", "dsn": PG_DSN})


@pytest.mark.parametrize("channel", ["", "nul\0inside", 42])
def test_invalid_channel_is_refused(channel: object) -> None:
    """An empty, non-string or NUL-containing channel is refused."""
    with pytest.raises(ConfigurationError) as info:
        PgsqlDriver("i", {"channel": channel, "dsn": PG_DSN})
    assert info.value.key == "channel"


def test_invalid_dsn_is_refused() -> None:
    """A dsn psycopg can't parse is refused at construction."""
    with pytest.raises(ConfigurationError) as info:
        PgsqlDriver("i", {"channel": "c", "dsn": "host='unterminated"})
    assert info.value.key == "dsn"


def test_asyncpg_needs_a_url_dsn() -> None:
    """With connector asyncpg, a key=value dsn (which asyncpg can't read) is refused."""
    with pytest.raises(ConfigurationError) as info:
        PgsqlDriver("i", {"channel": "c", "dsn": "host=127.0.0.1", "connector": "asyncpg"})
    assert info.value.key == "dsn"


def test_unknown_connector_is_refused() -> None:
    """connector must be psycopg or asyncpg."""
    with pytest.raises(ConfigurationError) as info:
        PgsqlDriver("i", {"channel": "c", "dsn": PG_DSN, "connector": "pg8000"})
    assert info.value.key == "connector"


@pytest.mark.parametrize("key", ["large_message_ttl", "ping_interval"])
@pytest.mark.parametrize("value", [0, -1, "5", True, None])
def test_durations_must_be_positive_numbers(key: str, value: object) -> None:
    """large_message_ttl and ping_interval must be positive numbers of seconds."""
    with pytest.raises(ConfigurationError) as info:
        PgsqlDriver("i", {"channel": "c", "dsn": PG_DSN, key: value})
    assert info.value.key == key


def test_application_name_must_be_a_string() -> None:
    """application_name must be a string."""
    with pytest.raises(ConfigurationError) as info:
        PgsqlDriver("i", {"channel": "c", "dsn": PG_DSN, "application_name": 3})
    assert info.value.key == "application_name"


async def test_psycopg_pools_are_refused_with_the_reason() -> None:
    """psycopg_pool's pools are refused, saying LISTEN needs one session and what to pass."""
    pools = [
        psycopg_pool.AsyncConnectionPool(PG_DSN, open=False),
        psycopg_pool.ConnectionPool(PG_DSN, open=False),
    ]
    for pool in pools:
        with pytest.raises(ConfigurationError) as info:
            PgsqlDriver("i", {"channel": "c", "client": pool})
        assert info.value.key == "client"
        assert "LISTEN" in info.value.message
        assert "dsn" in info.value.message and "dedicated connection" in info.value.message


async def test_asyncpg_pool_is_refused_with_the_reason(pg_dsn: str) -> None:
    """An asyncpg pool, and a connection acquired from one, are refused."""
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        with pytest.raises(ConfigurationError) as info:
            PgsqlDriver("i", {"channel": "c", "client": pool})
        assert "LISTEN" in info.value.message
        async with pool.acquire() as proxy:
            with pytest.raises(ConfigurationError) as info:
                PgsqlDriver("i", {"channel": "c", "client": proxy})
            assert "pool" in info.value.message
    finally:
        await pool.close()


def test_sync_psycopg_connection_is_refused(pg_dsn: str) -> None:
    """A synchronous psycopg.Connection is refused, pointing at AsyncConnection."""
    with (
        psycopg.connect(pg_dsn, autocommit=True) as conn,
        pytest.raises(ConfigurationError) as info,
    ):
        PgsqlDriver("i", {"channel": "c", "client": conn})
    assert "AsyncConnection" in info.value.message


def test_other_objects_are_refused() -> None:
    """An object that is neither a connection nor a factory is refused."""
    with pytest.raises(ConfigurationError) as info:
        PgsqlDriver("i", {"channel": "c", "client": NOT_A_CLIENT})
    assert info.value.key == "client"
    with pytest.raises(ConfigurationError):
        PgsqlDriver("i", {"channel": "c", "client": f"{__name__}.NOT_A_CLIENT"})


def test_django_connection_is_refused() -> None:
    """Django's own database connection is refused with the reason (its transactions)."""
    from django.db import connection

    with pytest.raises(ConfigurationError) as info:
        PgsqlDriver("i", {"channel": "c", "client": connection})
    assert "transaction" in info.value.message


def test_unimportable_client_path_is_refused() -> None:
    """A dotted path that does not import is refused at construction, naming client."""
    with pytest.raises(ConfigurationError) as info:
        PgsqlDriver("i", {"channel": "c", "client": "no.such.module.factory"})
    assert info.value.key == "client"


async def test_client_must_be_in_autocommit(pg_dsn: str) -> None:
    """A psycopg client outside autocommit mode is refused (LISTEN needs autocommit)."""
    conn = await psycopg.AsyncConnection.connect(pg_dsn)
    try:
        with pytest.raises(ConfigurationError) as info:
            PgsqlDriver("i", {"channel": "c", "client": conn})
        assert "autocommit" in info.value.message
    finally:
        await conn.close()


async def test_connector_contradicting_the_client_is_refused(pg_dsn: str) -> None:
    """connector='asyncpg' with a psycopg connection is a configuration error."""
    conn = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
    try:
        with pytest.raises(ConfigurationError) as info:
            PgsqlDriver("i", {"channel": "c", "client": conn, "connector": "asyncpg"})
        assert info.value.key == "connector"
    finally:
        await conn.close()


@pytest.mark.parametrize("version", ["3.1.12", "3.2.3"])
def test_too_old_psycopg_is_refused(version: str) -> None:
    """A psycopg older than 3.2.4 (no raw cursors, notifications lost between waits) is refused."""
    with pytest.raises(ConfigurationError) as info:
        _check_psycopg_version(version)
    assert "3.2.4" in info.value.message and info.value.key == "driver"
    _check_psycopg_version("3.2.4")
    _check_psycopg_version("3.3.0.dev1")


def test_driver_offers_every_capability() -> None:
    """The driver supports direct sends, batches, worker queues and flush."""
    driver = PgsqlDriver("i", {"channel": "c", "dsn": PG_DSN})
    for capability in (SupportsDirect, SupportsBatch, SupportsWorkerQueue, SupportsFlush):
        assert isinstance(driver, capability)


@pytest.mark.parametrize(
    "channel", ["x", "é" * 31 + "x", "we\"ird ' names; DROP TABLE x; --", "UPPER lower"]
)
def test_derived_names_fit_identifiers(channel: str) -> None:
    """Direct and wake-up channels and table names are at most 63 bytes and distinct."""
    names = Names.for_instance(channel, "instance-" + "z" * 200)
    assert names.broadcast == channel
    derived = [names.direct, names.wakeup, names.queue_table, names.large_table]
    assert len(set(derived)) == 4
    for name in derived:
        assert len(name.encode()) <= 63
    for table in (names.queue_table, names.large_table):
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", table)


def test_table_names_differ_per_channel() -> None:
    """Channels whose readable slugs coincide still get their own tables."""
    assert table_names("my-app") != table_names("my app")
    assert table_names("my-app") != table_names("MY-APP")
    assert direct_channel("a", "i") != direct_channel("b", "i")


# Relay


async def test_broadcast_reaches_every_instance(cluster: Cluster) -> None:
    """A published envelope reaches another instance, text unchanged."""
    a, _ = await cluster.member()
    _, got_b = await cluster.member()
    text = envelope("t", "hello")
    await a.publish(text)
    await got_b.wait_for(lambda c: text in c.raw)
    assert got_b.raw == [text]


async def test_direct_send_reaches_only_its_target(cluster: Cluster) -> None:
    """publish_to reaches the named instance and no other."""
    a, got_a = await cluster.member("a")
    _, got_b = await cluster.member("b")
    _, got_c = await cluster.member("c")
    await a.publish_to("b", "for b")
    await a.publish("for all")
    await got_c.wait_for(lambda c: "for all" in c.raw)
    await got_b.wait_for(lambda c: "for all" in c.raw)
    assert got_b.raw == ["for b", "for all"]
    assert got_c.raw == ["for all"]
    assert "for b" not in got_a.raw


async def test_other_channels_never_bridge(cluster: Cluster) -> None:
    """Instances of another channel on the same database receive nothing."""
    a, _ = await cluster.member("a")
    _, got_same = await cluster.member("b")
    _, got_other = await cluster.member("b", channel=unique("other"))
    await a.publish("mine")
    await a.publish_to("b", "direct")
    await got_same.wait_for(lambda c: len(c.raw) == 2)
    await asyncio.sleep(0.2)
    assert got_other.raw == []


@pytest.mark.parametrize(
    "name",
    [
        'quote"d',
        "it's",
        "spaces and\ttabs",
        "ünïcødé ✓ 频道",
        "UPPER-lower",
        '"; DROP TABLE pg_class; --',
        "é" * 31 + "x",
        "back\\slash",
    ],
)
async def test_hostile_channel_names_work(pg_dsn: str, name: str) -> None:
    """Quotes, spaces, non-ASCII and SQL-looking channel names relay and queue correctly."""
    async with cluster_of(pg_dsn) as cl:
        channel = name + unique("")[-6:] if len(name.encode()) < 50 else name
        a, _ = await cl.member("a", channel=channel)
        _, got = await cl.member("b", channel=channel)
        await a.publish("hi")
        await a.publish_to("b", "direct")
        await a.publish("x" * 9000)
        await got.wait_for(lambda c: len(c.raw) == 3)
        assert got.raw == ["hi", "direct", "x" * 9000]
        assert await a.queue_push("w", "job", 5, time.time() + 10)
        assert await got_pop(cl.drivers[1], "w") == "job"
        rows = await admin_query(pg_dsn, "SELECT pg_notify(%s, 'raw')", channel)
        assert rows
        await got.wait_for(lambda c: "raw" in c.raw)


async def got_pop(driver: PgsqlDriver, channel: str) -> str | None:
    return await driver.queue_pop(channel, 2)


async def test_identical_messages_in_one_batch_all_arrive(cluster: Cluster) -> None:
    """PostgreSQL folds identical NOTIFYs of one transaction; the driver still relays each."""
    a, _ = await cluster.member("a")
    _, got = await cluster.member("b")
    await a.publish_batch([(None, "same"), (None, "same"), ("b", "same"), ("b", "same")])
    await got.wait_for(lambda c: len(c.raw) == 4)
    await asyncio.sleep(0.1)
    assert got.raw == ["same"] * 4


async def test_batch_keeps_its_order(cluster: Cluster) -> None:
    """A long batch mixing broadcasts, direct sends and large messages arrives in order."""
    a, _ = await cluster.member("a")
    _, got = await cluster.member("b")
    batch: list[tuple[str | None, str]] = []
    for i in range(1500):
        text = f"{i:05d}" + ("L" * 9000 if i % 250 == 7 else "")
        batch.append((None if i % 3 else "b", text))
    await a.publish_batch(batch)
    await got.wait_for(lambda c: len(c.raw) == len(batch), timeout=20)
    assert got.raw == [text for _, text in batch]


async def test_envelopes_up_to_the_notify_limit_use_notify_only(
    psycopg_cluster: Cluster, pg_dsn: str
) -> None:
    """A 7999-byte envelope goes in the NOTIFY itself: no table is created for it."""
    a, _ = await psycopg_cluster.member("a")
    _, got = await psycopg_cluster.member("b")
    text = "x" * 7997 + "é"  # 7999 bytes, 7998 characters
    await a.publish(text)
    await got.wait_for(lambda c: len(c.raw) == 1)
    assert got.raw == [text]
    _, large = table_names(psycopg_cluster.channel)
    assert await admin_query(pg_dsn, "SELECT to_regclass(%s)", large) == [(None,)]


async def test_large_binary_message_relays_intact(cluster: Cluster, pg_dsn: str) -> None:
    """A ~1 MiB envelope with binary data crosses through the table, byte for byte."""
    a, _ = await cluster.member("a")
    _, got = await cluster.member("b")
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    text = envelope("big", data)
    assert len(text) > 1_300_000
    just_over = "y" * 8000
    await a.publish_batch([(None, text), (None, just_over), ("b", text)])
    await got.wait_for(lambda c: len(c.raw) == 3, timeout=15)
    assert got.raw == [text, just_over, text]
    decoded = decode_envelope(got.raw[0])
    assert decoded is not None and decoded.msg.data == data


async def test_direct_large_rows_are_removed_once_delivered(
    psycopg_cluster: Cluster, pg_dsn: str
) -> None:
    """The row of a large direct message is deleted by the instance that reads it."""
    a, _ = await psycopg_cluster.member("a")
    _, got = await psycopg_cluster.member("b")
    await a.publish_to("b", "d" * 20000)
    await got.wait_for(lambda c: len(c.raw) == 1)
    _, large = table_names(psycopg_cluster.channel)
    count = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(large))
    assert await admin_query(pg_dsn, count.as_string(None)) == [(0,)]


async def test_expired_large_rows_are_purged(psycopg_cluster: Cluster, pg_dsn: str) -> None:
    """Broadcast large rows stay for large_message_ttl, then the next large publish purges them."""
    a, _ = await psycopg_cluster.member("a", large_message_ttl=0.3)
    _, got = await psycopg_cluster.member("b")
    _, large = table_names(psycopg_cluster.channel)
    count = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(large)).as_string(None)
    for i in range(3):
        await a.publish(f"{i}" * 9000)
    await got.wait_for(lambda c: len(c.raw) == 3)
    assert await admin_query(pg_dsn, count) == [(3,)]
    await asyncio.sleep(0.5)
    await a.publish("z" * 9000)
    assert await admin_query(pg_dsn, count) == [(1,)]


async def test_vanished_large_message_is_reported(psycopg_cluster: Cluster, pg_dsn: str) -> None:
    """A reference to a row that is gone is reported at the delivery stage, not delivered."""
    _, got = await psycopg_cluster.member("b")
    await admin_query(
        pg_dsn, "SELECT pg_notify(%s, 'crossws_channels:large:123456789')", psycopg_cluster.channel
    )
    await got.wait_for(lambda c: c.reports)
    error, stage = got.reports[0]
    assert isinstance(error, BackplaneError) and stage == "delivery"
    assert got.raw == []


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "{",
        '{"id":1}',
        "crossws_channels:large:",
        "crossws_channels:large:-1",
        "crossws_channels:large:1e5",
        "\u0661\u0662",
        "[]" * 3000,
    ],
)
async def test_malformed_payloads_are_handed_over_and_listening_goes_on(
    psycopg_cluster: Cluster, pg_dsn: str, payload: str
) -> None:
    """Garbage on the channel reaches deliver as-is (the layer drops it); the listener survives."""
    _, got = await psycopg_cluster.member("b")
    await admin_query(pg_dsn, "SELECT pg_notify(%s, %s)", psycopg_cluster.channel, payload)
    await admin_query(pg_dsn, "SELECT pg_notify(%s, 'after')", psycopg_cluster.channel)
    await got.wait_for(lambda c: "after" in c.raw)
    assert got.raw == [payload, "after"]
    assert got.lost == []


async def test_a_crossws_server_shares_the_cluster(cluster: Cluster, pg_dsn: str) -> None:
    """Broadcasts travel on the channel named exactly `channel`, both ways, as plain envelopes."""
    a, got = await cluster.member("a")
    outsider = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
    try:
        await outsider.execute(sql.SQL("LISTEN {}").format(sql.Identifier(cluster.channel)))
        text = envelope("chat", "from django", instance="a")
        await a.publish(text)
        received = [n async for n in outsider.notifies(timeout=2, stop_after=1)]
        assert [n.payload for n in received] == [text]
        foreign = envelope("chat", b"\x00\xffbinary", instance="node-1")
        await outsider.execute("SELECT pg_notify(%s, %s)", [cluster.channel, foreign])
        await got.wait_for(lambda c: foreign in c.raw)
        decoded = decode_envelope(got.raw[-1])
        assert decoded is not None and decoded.msg.data == b"\x00\xffbinary"
    finally:
        await outsider.close()


async def test_publishing_never_joins_the_apps_transaction(
    psycopg_cluster: Cluster, pg_dsn: str
) -> None:
    """With an application transaction open (and later rolled back) the relay is immediate."""
    a, _ = await psycopg_cluster.member("a")
    _, got = await psycopg_cluster.member("b")
    app = await psycopg.AsyncConnection.connect(pg_dsn)
    try:
        await app.execute("SELECT 1")  # the app's transaction is now open
        assert app.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        await a.publish("during")
        assert await a.queue_push("jobs", "job", 10, time.time() + 10)
        await got.wait_for(lambda c: "during" in c.raw, timeout=2)
        await app.rollback()
    finally:
        await app.close()
    assert await psycopg_cluster.drivers[1].queue_pop("jobs", 1) == "job"
    states = {state for _, state, _ in await backends(pg_dsn, psycopg_cluster.application_name)}
    assert "idle in transaction" not in states


# Connecting, ownership, leaks


def not_ready() -> None:
    raise AssertionError("listen() called ready() without a subscription")


async def test_listen_raises_when_the_server_is_unreachable() -> None:
    """Nothing listening on the port: listen raises at once (the layer retries)."""
    driver = PgsqlDriver(
        "i", {"channel": unique(), "dsn": f"postgresql://postgres@127.0.0.1:{free_port()}/x"}
    )
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        await driver.listen(Collector(), not_ready)
    assert time.monotonic() - started < 5
    await driver.close()


async def test_use_after_close_raises(psycopg_cluster: Cluster) -> None:
    """A closed driver refuses work, listening included; close is idempotent."""
    a, _ = await psycopg_cluster.member("a")
    await a.close()
    await a.close()
    with pytest.raises(RuntimeError):
        await a.listen(Collector(), not_ready)
    with pytest.raises(RuntimeError):
        await a.publish("x")
    with pytest.raises(RuntimeError):
        await a.queue_pop("w", 0)


async def test_user_psycopg_client_stays_open_and_is_unlistened(
    psycopg_cluster: Cluster, pg_dsn: str
) -> None:
    """A passed psycopg connection listens, and after close it is open with no LISTEN left."""
    name = unique("crossws-client")
    client = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True, application_name=name)
    try:
        a, _ = await psycopg_cluster.member("a")
        b, got = await psycopg_cluster.member("b", client=client, application_name=None)
        pid = client.info.backend_pid
        assert {p for p, _, _ in await backends(pg_dsn, name)} == {pid}
        await a.publish("to the client")
        await a.publish_to("b", "direct")
        await b.publish("from b")  # over a connection of the driver's own
        await got.wait_for(lambda c: len(c.raw) == 3)
        await b.close()
        assert not client.closed
        cursor = await client.execute("SELECT count(*) FROM pg_listening_channels()")
        assert await cursor.fetchone() == (0,)
    finally:
        await client.close()


async def test_user_asyncpg_client_stays_open_and_is_unlistened(
    psycopg_cluster: Cluster, pg_dsn: str
) -> None:
    """A passed asyncpg connection is detected, listens, and is left open and unlistened."""
    client = await asyncpg.connect(pg_dsn)
    try:
        a, _ = await psycopg_cluster.member("a")
        b = psycopg_cluster.driver("b", client=client)
        got = Collector()
        await listen(b, got)
        assert b.options.client_kind == "asyncpg"
        await a.publish("to asyncpg")
        await b.publish("from b")
        await got.wait_for(lambda c: c.raw == ["to asyncpg", "from b"])
        drivers_own = await backends(pg_dsn, psycopg_cluster.application_name)
        assert drivers_own  # b publishes over its own connection, not the client
        await b.close()
        assert not client.is_closed()
        assert await client.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
    finally:
        await client.close()


@pytest.mark.parametrize("factory", ["make_psycopg_connection", "make_asyncpg_connection"])
async def test_factory_connections_are_owned_and_closed(
    psycopg_cluster: Cluster, pg_dsn: str, factory: str
) -> None:
    """Connections from a dotted-path factory (sync or async) are the driver's: closed on close."""
    a, _ = await psycopg_cluster.member("a")
    b, got = await psycopg_cluster.member(
        "b", client=f"{__name__}.{factory}", application_name=None
    )
    await b.publish("x")
    await a.publish("y")
    await got.wait_for(lambda c: c.raw == ["x", "y"])
    assert len(await backends(pg_dsn, FACTORY_NAME)) == 2  # listening + publishing
    await b.close()
    await eventually_async(lambda: none_left(pg_dsn, FACTORY_NAME), what="connections closed")


async def test_factory_returning_something_else_fails_listen(psycopg_cluster: Cluster) -> None:
    """A factory that returns no connection makes listen raise a configuration error."""
    driver = psycopg_cluster.driver("a", client=f"{__name__}.make_nothing_useful")
    with pytest.raises(ConfigurationError):
        await driver.listen(Collector(), not_ready)


async def test_application_name_identifies_the_drivers_connections(
    psycopg_cluster: Cluster, pg_dsn: str
) -> None:
    """Every connection the driver opens carries application_name; none remain after close."""
    a, _ = await psycopg_cluster.member("a")
    await a.publish("x")
    assert await a.queue_push("w", "x", 1, time.time() + 5)
    assert len(await backends(pg_dsn, psycopg_cluster.application_name)) == 3
    await a.close()
    await eventually_async(
        lambda: none_left(pg_dsn, psycopg_cluster.application_name), what="connections closed"
    )


async def none_left(dsn: str, application_name: str) -> bool:
    """Whether no backend of ``application_name`` is connected any more."""
    return await backends(dsn, application_name) == []


@pytest.mark.parametrize("connector_name", ["psycopg", "asyncpg"])
def test_no_connection_leaks_across_event_loops(pg_dsn: str, connector_name: str) -> None:
    """Fifteen create-subscribe-publish-close cycles, each in a fresh asyncio.run, leave nothing."""
    channel = unique("loops")
    name = unique("crossws-leak")

    async def cycle(i: int) -> None:
        driver = PgsqlDriver(
            f"i{i}",
            {
                "channel": channel,
                "dsn": pg_dsn,
                "connector": connector_name,
                "application_name": name,
            },
        )
        got = Collector()
        await listen(driver, got)
        await driver.publish(f"m{i}")
        await driver.publish("L" * 9000)
        assert await driver.queue_push("w", "x", 100, time.time() + 60)
        assert await driver.queue_pop("w", 1) == "x"
        await got.wait_for(lambda c: len(c.raw) == 2)
        await driver.close()

    def settled_count() -> int:
        # A backend leaves pg_stat_activity a moment after its client hung up.
        deadline = time.monotonic() + 2
        while True:
            rows = admin_query_sync(
                pg_dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", name
            )
            if rows[0][0] == 0 or time.monotonic() > deadline:
                return int(rows[0][0])
            time.sleep(0.02)

    try:
        counts = []
        for i in range(15):
            asyncio.run(cycle(i))
            counts.append(settled_count())
        assert counts == [0] * 15
    finally:
        drop_tables(pg_dsn, channel)


async def test_malformed_json_never_reaches_deliver_as_anything_but_text(
    psycopg_cluster: Cluster, pg_dsn: str
) -> None:
    """Payloads are handed over as str exactly as notified, whatever they hold."""
    _, got = await psycopg_cluster.member("b")
    weird = json.dumps({"id": "x", "msg": None}) + "\u2028"
    await admin_query(pg_dsn, "SELECT pg_notify(%s, %s)", psycopg_cluster.channel, weird)
    await got.wait_for(lambda c: c.raw)
    assert got.raw == [weird] and isinstance(got.raw[0], str)


def test_binary_survives_base64_in_the_envelope() -> None:
    """Binary data is base64 text inside the envelope, so NOTIFY (text only) can carry it."""
    text = envelope("b", b"\x00\x01\xfe\xff")
    assert base64.b64encode(b"\x00\x01\xfe\xff").decode() in text
    text.encode("ascii")


async def test_close_during_listen_leaves_nothing_open(
    psycopg_cluster: Cluster, pg_dsn: str
) -> None:
    """Stopping a listen() that is still connecting, then closing (as the layer does),
    leaves no connection behind."""
    driver = psycopg_cluster.driver("a")
    listening = asyncio.create_task(driver.listen(Collector(), not_ready))
    await asyncio.sleep(0)
    listening.cancel()
    await driver.close()
    with pytest.raises(asyncio.CancelledError):
        await listening
    await eventually_async(
        lambda: none_left(pg_dsn, psycopg_cluster.application_name), what="connections closed"
    )
