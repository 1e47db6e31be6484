"""The pgsql driver when connections die: killed backends, a restarted server, a silent network.

The restart tests run a private PostgreSQL (``postgres_server``); the shared server only
ever sees ``pg_terminate_backend`` on a backend this test's driver opened. One test runs
part of itself in a child process (this module run as a program), so that a process that
hangs can be seen hanging, and killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import pytest

from crossws_channels.drivers.pgsql import PgsqlDriver
from tests.drivers.collector import Collector
from tests.drivers.listening import listen
from tests.drivers.pgsql.support import (
    Cluster,
    FreezingProxy,
    admin_query,
    backends,
    cluster_of,
    drop_tables,
    listening_backend,
    unique,
)
from tests.servers import PostgresServer
from tests.waiting import eventually_async

pytestmark = pytest.mark.pgsql


@contextlib.asynccontextmanager
async def pinging(sender: PgsqlDriver, every: float = 0.02) -> AsyncIterator[list[str]]:
    """Publish numbered pings until the block ends; yield the list of those sent."""
    sent: list[str] = []

    async def run() -> None:
        i = 0
        while True:
            text = f"ping{i}"
            i += 1
            with contextlib.suppress(Exception):
                await sender.publish(text)
                sent.append(text)
            await asyncio.sleep(every)

    task = asyncio.create_task(run())
    try:
        yield sent
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def pings(collector: Collector) -> list[str]:
    return [raw for raw in collector.raw if isinstance(raw, str) and raw.startswith("ping")]


async def first_ping_after(collector: Collector, seen: int, timeout: float) -> float:
    """Wait for a ping beyond the first ``seen`` ones; return when it came (monotonic)."""
    await collector.wait_for(lambda c: len(pings(c)) > seen, timeout=timeout)
    return time.monotonic()


async def test_terminated_listener_reconnects(
    cluster: Cluster, pg_dsn: str, record_property: Any
) -> None:
    """pg_terminate_backend on the listening backend: one lost, one made, relaying resumes fast."""
    a, got = await cluster.member("a", ping_interval=60)
    b, _ = await cluster.member("b", application_name=unique("crossws-sender"))
    pid = await listening_backend(pg_dsn, cluster.application_name)
    async with pinging(b):
        await got.wait_for(lambda c: pings(c))
        killed = time.monotonic()
        await admin_query(pg_dsn, "SELECT pg_terminate_backend(%s)", pid)
        await got.wait_for(lambda c: c.lost, timeout=5)
        seen = len(pings(got))
        resumed = await first_ping_after(got, seen, timeout=5)
    elapsed = resumed - killed
    record_property("reconnect_after_terminate_s", round(elapsed, 3))
    print(
        f"\n[pgsql/{cluster.connector}] relaying resumed {elapsed:.3f} s after pg_terminate_backend"
    )
    assert elapsed < 2
    await asyncio.sleep(0.2)
    assert len(got.lost) == 1 and got.made == 1
    assert pid not in {p for p, _, _ in await backends(pg_dsn, cluster.application_name)}
    await a.publish_to("b", "still routed")  # the other direction and the direct channel


async def test_terminating_every_connection_of_a_driver(cluster: Cluster, pg_dsn: str) -> None:
    """Killing all of a driver's backends (listener and writers) is survived both ways."""
    a, got_a = await cluster.member("a", ping_interval=60)
    b, got_b = await cluster.member("b", ping_interval=60, application_name=unique("crossws-other"))
    await a.publish("warm up")
    assert await a.queue_push("jobs", "x", 10, time.time() + 60)
    await got_b.wait_for(lambda c: "warm up" in c.raw)
    await admin_query(
        pg_dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        cluster.application_name,
    )
    await got_a.wait_for(lambda c: c.made == 1, timeout=5)
    # The writers were killed while idle: the first statement reconnects, nothing is lost.
    await a.publish("after")
    await got_b.wait_for(lambda c: "after" in c.raw, timeout=5)
    assert await a.queue_pop("jobs", 1) == "x"
    await b.publish("back to a")
    await got_a.wait_for(lambda c: "back to a" in c.raw, timeout=5)
    assert len(got_a.lost) == 1


async def test_the_layer_logs_an_outage_once_and_its_end_once(
    make_layer: Any, pg_dsn: str, connector: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A terminated listening backend is one warning in the layer's log and one line when
    it is back, and the layer counts one reconnection."""
    caplog.set_level(logging.INFO, logger="crossws_channels")
    name = unique("crossws-logged")
    channel = unique("logged")
    layer = make_layer(
        driver="pgsql", channel=channel, dsn=pg_dsn, connector=connector, application_name=name
    )
    try:
        await layer.new_channel()  # subscribes
        await eventually_async(lambda: layer.stats().get("subscribed") == 1, what="subscribed")
        pid = await listening_backend(pg_dsn, name)
        await admin_query(pg_dsn, "SELECT pg_terminate_backend(%s)", pid)
        await eventually_async(lambda: layer.stats().get("reconnects") == 1, what="reconnected")
        logged = [r for r in caplog.records if r.name == "crossws_channels"]
        assert [r.levelname for r in logged] == ["WARNING", "INFO"]
        assert "subscribe failed" in logged[0].getMessage()
        assert "subscription restored" in logged[1].getMessage()
    finally:
        await layer.close()
        drop_tables(pg_dsn, channel)


@pytest.mark.slow
@pytest.mark.parametrize("connector_name", ["psycopg", "asyncpg"])
async def test_server_restart_is_survived(
    postgres_server: PostgresServer, connector_name: str, record_property: Any
) -> None:
    """A restarted server: one outage reported, and relaying resumes within 2 s of it answering."""
    dsn = postgres_server.dsn
    async with cluster_of(dsn, connector_name) as cl:
        a, got = await cl.member("a", ping_interval=60)
        b, _ = await cl.member("b", ping_interval=60)
        assert await b.queue_push("jobs", "before", 10, time.time() + 60)
        async with pinging(b):
            await got.wait_for(lambda c: pings(c))
            await asyncio.to_thread(postgres_server.stop)
            await got.wait_for(lambda c: c.lost, timeout=5)
            await asyncio.sleep(1.5)  # attempts fail meanwhile; none is reported
            assert len(got.lost) == 1 and got.made == 0
            await asyncio.to_thread(postgres_server.start)
            answering = time.monotonic()
            seen = len(pings(got))
            resumed = await first_ping_after(got, seen, timeout=10)
        elapsed = resumed - answering
        record_property("reconnect_after_restart_s", round(elapsed, 3))
        print(
            f"\n[pgsql/{connector_name}] relaying resumed {elapsed:.3f} s "
            "after the restarted server answered"
        )
        assert elapsed < 2
        assert len(got.lost) == 1 and got.made == 1
        # Worker queues work again (the unlogged table was emptied by the crash restart).
        assert await b.queue_push("jobs", "after", 10, time.time() + 60)
        assert await a.queue_pop("jobs", 2) == "after"
        assert got.reports == []


@pytest.mark.slow
async def test_unreachable_at_start_then_available(postgres_server: PostgresServer) -> None:
    """subscribe raises while the server is down and succeeds once it is up."""
    await asyncio.to_thread(postgres_server.stop)
    driver = PgsqlDriver("a", {"channel": unique(), "dsn": postgres_server.dsn})
    try:
        with pytest.raises(psycopg.OperationalError):
            await listen(driver, Collector())
        await asyncio.to_thread(postgres_server.start)
        got = Collector()
        await listen(driver, got)
        await driver.publish("self")
        await got.wait_for(lambda c: c.raw == ["self"])
    finally:
        await driver.close()


@pytest.mark.parametrize("connector_name", ["psycopg", "asyncpg"])
async def test_silent_connection_is_detected_by_the_idle_ping(
    pg_dsn: str, connector_name: str
) -> None:
    """A listening connection that stops answering (no close, no error) is replaced."""
    proxy = FreezingProxy(5432)
    await proxy.start()
    dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/test"
    try:
        async with cluster_of(pg_dsn, connector_name) as cl:
            _, got = await cl.member("a", dsn=dsn, ping_interval=0.3)
            b, _ = await cl.member("b")
            async with pinging(b, every=0.05):
                await got.wait_for(lambda c: pings(c))
                proxy.freeze()
                frozen = time.monotonic()
                await got.wait_for(lambda c: c.lost, timeout=5)
                detected = time.monotonic() - frozen
                seen = len(pings(got))
                await first_ping_after(got, seen, timeout=5)
            assert detected < 2
            assert len(got.lost) == 1 and got.made == 1
    finally:
        await proxy.close()


async def test_a_broken_user_client_is_replaced_not_closed(pg_dsn: str, connector: str) -> None:
    """When the user's own listening connection is killed, the driver listens on its own."""
    name = unique("crossws-client")
    client: Any
    if connector == "psycopg":
        client = await psycopg.AsyncConnection.connect(
            pg_dsn, autocommit=True, application_name=name
        )
    else:
        client = await asyncpg.connect(pg_dsn, server_settings={"application_name": name})
    try:
        async with cluster_of(pg_dsn) as cl:
            a, _ = await cl.member("a")
            b = cl.driver("b", client=client, ping_interval=60)
            got = Collector()
            await listen(b, got)
            pid = await listening_backend(pg_dsn, name)
            await admin_query(pg_dsn, "SELECT pg_terminate_backend(%s)", pid)
            await got.wait_for(lambda c: c.made == 1, timeout=5)
            await a.publish("via the driver's own connection")
            await got.wait_for(lambda c: c.raw == ["via the driver's own connection"])
            await b.close()
    finally:
        await client.close()


# A ping that times out on a connection that went silent
#
# Freeing a psycopg connection while a statement waits on it leaves that statement watching
# the old socket number. The reconnect's new socket usually gets the same number: the
# stale watcher then breaks the new connection's waits, or reads it through the freed
# libpq connection, which once hung a benchmark process for good. The ping interval is not
# a multiple of psycopg's 0.1 s polling, so the stale watcher is still there when the new
# socket opens.


ROOT = Path(__file__).resolve().parents[3]
MODULE = "tests.drivers.pgsql.test_resilience"
FREEZE_ROUNDS = 10


async def _silenced_mid_ping(dsn: str, proxied_dsn: str, rounds: int) -> None:
    """The child: a listener behind the proxy, receiving a steady stream, is silenced
    ``rounds`` times; each time its ping goes unanswered, and it must reconnect at the
    first attempt and relay again."""
    loop = asyncio.get_running_loop()
    failures = _FailedReconnects()
    logging.getLogger("crossws_channels.drivers.pgsql").addHandler(failures)
    logging.getLogger("crossws_channels.drivers.pgsql").setLevel(logging.DEBUG)
    channel = unique("silenced")
    listener = PgsqlDriver("a", {"channel": channel, "dsn": proxied_dsn, "ping_interval": 0.25})
    sender = PgsqlDriver("b", {"channel": channel, "dsn": dsn})
    got = Collector()
    try:
        await listen(listener, got)
        async with pinging(sender, every=0.002):
            for i in range(rounds):
                print("freeze", flush=True)
                await loop.run_in_executor(None, sys.stdin.readline)
                await got.wait_for(lambda c, i=i: len(c.lost) > i and c.made > i, timeout=10)
                seen = len(pings(got))
                await got.wait_for(lambda c, seen=seen: len(pings(c)) > seen + 10, timeout=10)
        # The server answered all along: no attempt to reconnect may have failed (one that
        # finds its new socket still watched for the old connection does).
        print("recovered" if not failures.messages else f"failed: {failures.messages}", flush=True)
    finally:
        await listener.close()
        await sender.close()


class _FailedReconnects(logging.Handler):
    """Collects the driver's "reconnecting failed" log lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "reconnecting failed" in record.getMessage():
            self.messages.append(record.getMessage())


async def test_a_ping_timing_out_never_frees_the_connection_under_it(pg_dsn: str) -> None:
    """A ping stuck on a silent connection is made to fail before the connection is freed:
    round after round the process reconnects and relays, and never hangs."""
    port = int(psycopg.conninfo.conninfo_to_dict(pg_dsn).get("port") or 5432)
    proxy = FreezingProxy(port)
    await proxy.start()
    proxied = psycopg.conninfo.make_conninfo(pg_dsn, port=proxy.port)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        MODULE,
        pg_dsn,
        proxied,
        str(FREEZE_ROUNDS),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    assert child.stdin is not None and child.stdout is not None
    stdin, stdout = child.stdin, child.stdout

    async def drive() -> bool:
        while line := await stdout.readline():
            if line == b"freeze\n":
                # Only the listener's connection goes through the proxy: nothing reaches
                # it any more, so after ping_interval it pings, and gets no answer.
                proxy.freeze()
                stdin.write(b"frozen\n")
                await stdin.drain()
            elif line == b"recovered\n":
                return True
            else:
                print(line.decode(errors="replace"), end="")
        return False

    try:
        recovered = await asyncio.wait_for(drive(), 40)
        await asyncio.wait_for(child.wait(), 10)
    except asyncio.TimeoutError:
        recovered = False
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await proxy.close()
    assert recovered, f"the child hung or failed (exit status {child.returncode})"
    assert child.returncode == 0


if __name__ == "__main__":
    asyncio.run(_silenced_mid_ping(sys.argv[1], sys.argv[2], int(sys.argv[3])))
