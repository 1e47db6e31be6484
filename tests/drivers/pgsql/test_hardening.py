"""The pgsql driver against another role of the same database and against a frozen
connection: objects planted under its names are refused, not run; statements that get no
answer fail within ``statement_timeout`` and the driver carries on with a new connection;
capacities it can't store are refused at start-up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from crossws_channels.drivers.pgsql import PgsqlDriver
from crossws_channels.drivers.pgsql.link import StatementTimeout
from crossws_channels.drivers.pgsql.options import Names
from crossws_channels.drivers.pgsql.sql import PUSH_ARGUMENTS, Statements
from crossws_channels.drivers.pgsql.watch import QueueWatch
from crossws_channels.errors import (
    ConfigurationError,
    ForeignObject,
    NotificationQueueFilling,
    Stage,
)
from tests.conftest import ErrorLog
from tests.drivers.pgsql.support import FreezingProxy, admin_query_sync, unique
from tests.servers import PostgresServer
from tests.waiting import eventually_async

pytestmark = pytest.mark.pgsql

APP, SQUATTER = "crossws_app", "crossws_squatter"


@pytest.fixture(scope="module")
def roles() -> Iterator[tuple[str, str]]:
    """A private server with two roles that are not superusers, both allowed to create
    objects in the schema ``shared`` (as every role could in ``public`` before
    PostgreSQL 15): the application's, and another one's."""
    with PostgresServer() as server:
        for role in (APP, SQUATTER):
            admin_query_sync(server.dsn, f"CREATE ROLE {role} LOGIN")
        admin_query_sync(server.dsn, "CREATE SCHEMA shared")
        admin_query_sync(server.dsn, f"GRANT CREATE, USAGE ON SCHEMA shared TO {APP}, {SQUATTER}")
        base = server.dsn.rsplit("@", 1)[1]
        yield f"postgresql://{APP}@{base}", f"postgresql://{SQUATTER}@{base}"


def names_of(channel: str) -> tuple[Names, Statements]:
    names = Names.for_instance(channel, "any", "shared")
    return names, Statements.for_names(names)


def in_shared(dsn: str, channel: str) -> PgsqlDriver:
    """A driver of cluster ``channel`` keeping its objects in the schema ``shared``."""
    return PgsqlDriver("a", {"channel": channel, "dsn": dsn, "schema": "shared"})


def plant_push_function(dsn: str, channel: str) -> None:
    """What an attacker with CREATE on the schema does first: a function under the push
    function's computed name that writes down who ran it."""
    names, _ = names_of(channel)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS shared.ran_as (who text)")
        conn.execute("GRANT INSERT ON shared.ran_as TO PUBLIC")
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION shared.{}({}) RETURNS integer[] LANGUAGE sql AS "
                "$$ INSERT INTO shared.ran_as VALUES (current_user); SELECT ARRAY[1, 0] $$"
            ).format(sql.Identifier(names.push_function), sql.SQL(PUSH_ARGUMENTS))
        )
        conn.execute(
            sql.SQL("GRANT EXECUTE ON FUNCTION shared.{}({}) TO PUBLIC").format(
                sql.Identifier(names.push_function), sql.SQL(PUSH_ARGUMENTS)
            )
        )


async def test_a_planted_push_function_is_refused_and_never_runs(roles: tuple[str, str]) -> None:
    app, squatter = roles
    channel = unique("squat")
    plant_push_function(squatter, channel)
    driver = in_shared(app, channel)
    try:
        for _ in range(2):  # refused every time, checked once
            with pytest.raises(ForeignObject, match=rf"{SQUATTER}.*did not create it"):
                await driver.queue_push("jobs", "item", 10, time.time() + 60)
    finally:
        await driver.close()
    assert admin_query_sync(squatter, "SELECT who FROM shared.ran_as") == []


async def test_a_planted_table_is_refused(roles: tuple[str, str]) -> None:
    app, squatter = roles
    channel = unique("squat")
    names, statements = names_of(channel)
    admin_query_sync(
        squatter,
        f"CREATE TABLE {statements.queue} (channel text, pos bigint, item text, "
        "expires double precision, PRIMARY KEY (channel, pos))",
    )
    admin_query_sync(squatter, f"GRANT ALL ON {statements.queue} TO PUBLIC")
    driver = in_shared(app, channel)
    try:
        with pytest.raises(ForeignObject, match=names.queue_table):
            await driver.queue_push("jobs", "item", 10, time.time() + 60)
    finally:
        await driver.close()


async def test_refused_objects_reach_on_error_once_through_the_layer(
    roles: tuple[str, str], make_layer: Any, errors: ErrorLog
) -> None:
    app, squatter = roles
    channel = unique("squat")
    plant_push_function(squatter, channel)
    layer = make_layer(driver="pgsql", dsn=app, schema="shared", channel=channel, on_error=errors)
    for n in range(5):
        await layer.send("jobs", {"type": "job", "n": n})
    await eventually_async(lambda: errors.of(ForeignObject, "publish"), what="a report")
    await asyncio.sleep(0.2)
    assert len(errors.of(ForeignObject)) == 1
    assert layer.stats()["dropped.publish"] == 5


async def test_the_drivers_own_older_function_is_replaced_and_runs_with_a_safe_path(
    roles: tuple[str, str],
) -> None:
    """A function of the application's own role under the push name, with another body
    (an older version of the driver), is replaced; the new one pins its search_path."""
    app, _ = roles
    channel = unique("upgrade")
    _, statements = names_of(channel)
    admin_query_sync(
        app,
        f"CREATE FUNCTION {statements.push_signature} RETURNS integer[] LANGUAGE sql "
        "AS $$ SELECT ARRAY[0, 0] $$",
    )
    driver = in_shared(app, channel)
    try:
        assert await driver.queue_push("jobs", "item", 10, time.time() + 60)
        assert await driver.queue_pop("jobs", 1) == "item"
    finally:
        await driver.close()
    ((config,),) = admin_query_sync(
        app,
        "SELECT proconfig FROM pg_proc WHERE oid = to_regprocedure(%s)",
        statements.push_signature,
    )
    assert config == ["search_path=pg_catalog, pg_temp"]


async def test_objects_are_made_in_the_schema_given_whatever_the_search_path(
    roles: tuple[str, str],
) -> None:
    app, _ = roles
    channel = unique("schema")
    names, _ = names_of(channel)
    dsn = psycopg.conninfo.make_conninfo(app, options="-c search_path=pg_catalog")
    driver = PgsqlDriver("a", {"channel": channel, "dsn": dsn, "schema": "shared"})
    try:
        assert await driver.queue_push("jobs", "item", 10, time.time() + 60)
    finally:
        await driver.close()
    found = admin_query_sync(
        app,
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = %s",
        names.queue_table,
    )
    assert found == [("shared",)]


# A frozen connection


@pytest.fixture
async def frozen_dsn(pg_dsn: str) -> Any:
    proxy = FreezingProxy(int(psycopg.conninfo.conninfo_to_dict(pg_dsn).get("port") or 5432))
    await proxy.start()
    try:
        yield proxy, psycopg.conninfo.make_conninfo(pg_dsn, port=proxy.port)
    finally:
        await proxy.close()


async def test_a_publish_on_a_frozen_connection_fails_in_time_and_the_next_one_reconnects(
    frozen_dsn: Any,
) -> None:
    proxy, dsn = frozen_dsn
    driver = PgsqlDriver("a", {"channel": unique(), "dsn": dsn, "statement_timeout": 0.5})
    try:
        await driver.publish("before")
        assert await driver.queue_push("jobs", "one", 10, time.time() + 60)
        proxy.freeze()
        for operation in (driver.publish("frozen"), driver.queue_push("jobs", "two", 10, 1e10)):
            started = time.monotonic()
            with pytest.raises(StatementTimeout, match="statement_timeout"):
                await operation
            assert time.monotonic() - started < 2
        # New connections flow: the driver opened one and goes on.
        await driver.publish("after")
        assert await driver.queue_pop("jobs", 1) == "one"
    finally:
        await driver.close()


async def test_a_frozen_server_is_reported_at_publish_within_seconds_without_a_heartbeat(
    frozen_dsn: Any, make_layer: Any, errors: ErrorLog
) -> None:
    proxy, dsn = frozen_dsn
    layer = make_layer(driver="pgsql", dsn=dsn, heartbeat=0, on_error=errors, statement_timeout=1)
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    await layer.group_send("room", {"type": "before"})
    assert (await layer.receive(channel))["type"] == "before"
    # Listening and publishing connections both open, both about to go silent.
    await eventually_async(lambda: layer.stats().get("published") == 1, what="relayed")
    assert proxy.connections == 2
    proxy.freeze()
    started = time.monotonic()
    await layer.group_send("room", {"type": "during"})
    assert (await layer.receive(channel))["type"] == "during"  # local delivery is at once
    await eventually_async(lambda: errors.of(StatementTimeout, "publish"), timeout=5, what="report")
    assert time.monotonic() - started < 3


# Capacities and the notification queue


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"capacity": 2**31}, "'capacity'"),
        ({"channel_capacity": {"big.*": 2**31}}, "'channel_capacity'"),
        ({"statement_timeout": 0}, "'statement_timeout'"),
        ({"schema": ""}, "'schema'"),
        ({"dsn_query": "?connect_timeout=-5"}, "'dsn'"),
        ({"dsn_query": "?connect_timeout=soon"}, "'dsn'"),
        ({"dsn_query": "?bogus_opt=1"}, "'dsn'"),
    ],
)
def test_settings_the_driver_cant_honour_are_refused_at_start_up(
    make_layer: Any, pg_dsn: str, config: dict[str, Any], named: str
) -> None:
    query = config.pop("dsn_query", "")
    dsn = f"{pg_dsn}{query}" if pg_dsn.startswith("postgresql://") else pg_dsn
    with pytest.raises(ConfigurationError, match=named):
        make_layer(driver="pgsql", dsn=dsn, **config)


async def test_the_notification_queue_is_reported_once_past_half_full(pg_dsn: str) -> None:
    reports: list[tuple[Exception, Stage]] = []

    def report(error: Exception, stage: Stage) -> None:
        reports.append((error, stage))

    driver = PgsqlDriver("a", {"channel": unique(), "dsn": pg_dsn})
    watch = QueueWatch(driver._out, 0.05)
    task = asyncio.ensure_future(watch.run(report))
    try:
        await eventually_async(lambda: watch.usage is not None, what="a reading")
        assert watch.usage is not None and watch.usage < 0.5 and not reports
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await driver.close()
    for usage in (0.4, 0.6, 0.7, 0.3, 0.9, 0.2, 0.55):
        watch.observe(usage, report)
    assert [type(e) for e, _ in reports] == [NotificationQueueFilling] * 2
    assert "60% full" in str(reports[0][0]) and reports[0][1] == "subscribe"
