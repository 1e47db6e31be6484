"""The pgsql driver's worker queues: exactly once, waiting, capacity, expiry, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from crossws_channels.drivers.pgsql import PgsqlDriver, table_names
from crossws_channels.drivers.pgsql.sql import WAKE_BELOW
from crossws_channels.errors import MessageExpired
from tests.drivers.pgsql.support import (
    Cluster,
    admin_query,
    cluster_of,
    drop_tables,
    unique,
)

pytestmark = pytest.mark.pgsql


def later(seconds: float = 60.0) -> float:
    return time.time() + seconds


async def count_rows(dsn: str, channel: str) -> int:
    queue, _ = table_names(channel)
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(queue)).as_string(None)
    return int((await admin_query(dsn, query))[0][0])


async def test_items_come_out_in_order(cluster: Cluster) -> None:
    """Pushed items are popped oldest first, by any instance."""
    a, _ = await cluster.member("a")
    b, _ = await cluster.member("b")
    for i in range(5):
        assert await a.queue_push("jobs", f"job{i}", 10, later())
    got = [await (a if i % 2 else b).queue_pop("jobs", 1) for i in range(5)]
    assert got == [f"job{i}" for i in range(5)]
    assert await a.queue_pop("jobs", 0) is None


async def test_each_item_is_received_exactly_once(cluster: Cluster) -> None:
    """Two instances with four concurrent receivers each take 300 items, each exactly once."""
    a, _ = await cluster.member("a")
    b, _ = await cluster.member("b")
    total = 300
    received: list[str] = []
    done = asyncio.Event()

    async def receive(driver: object) -> None:
        while not done.is_set():
            item = await driver.queue_pop("jobs", 0.3)  # type: ignore[attr-defined]
            if item is not None:
                received.append(item)
                if len(received) == total:
                    done.set()

    receivers = [asyncio.create_task(receive(d)) for d in (a, b) for _ in range(4)]
    for i in range(total):
        assert await (a if i % 2 else b).queue_push("jobs", f"item{i}", 1000, later())
    await asyncio.wait_for(done.wait(), 30)
    await asyncio.gather(*receivers)
    assert Counter(received) == Counter(f"item{i}" for i in range(total))


async def test_a_waiting_receiver_is_woken_by_the_push(cluster: Cluster) -> None:
    """queue_pop waits, and a push on another instance wakes it well before the fallback poll."""
    a, _ = await cluster.member("a")
    b, _ = await cluster.member("b")
    waiting = asyncio.create_task(b.queue_pop("jobs", 5))
    await asyncio.sleep(0.3)  # b has looked once and is now waiting
    started = time.monotonic()
    assert await a.queue_push("jobs", "wake", 10, later())
    assert await waiting == "wake"
    assert time.monotonic() - started < 0.5


@contextlib.asynccontextmanager
async def wakeups(
    dsn: str, driver: PgsqlDriver
) -> AsyncIterator[Callable[[float], Awaitable[list[str]]]]:
    """Listen on the cluster's wake-up channel from a connection of the test's own; yield
    a function returning the wake-ups (their payloads) heard within so many seconds."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("LISTEN {}").format(sql.Identifier(driver.names.wakeup)).as_string(None)
        )

        async def heard(seconds: float) -> list[str]:
            return [n.payload async for n in conn.notifies(timeout=seconds)]

        yield heard


async def test_only_pushes_to_a_short_queue_send_a_wake_up(psycopg_cluster: Cluster) -> None:
    """Pushes behind WAKE_BELOW waiting items wake nobody: the receivers are busy."""
    a, _ = await psycopg_cluster.member("a")
    await a.queue_push("warm-up", "x", 10, later())  # creates the tables outside the count
    async with wakeups(psycopg_cluster.dsn, a) as heard:
        for i in range(WAKE_BELOW + 3):
            assert await a.queue_push("jobs", f"job{i}", 100, later())
        assert await heard(0.3) == ["jobs"] * WAKE_BELOW


async def test_a_receiver_that_stops_popping_hands_over(psycopg_cluster: Cluster) -> None:
    """After queue_pop returns an item, the queue is only known to be empty once a pop finds
    it so: a caller that stops popping earlier has the driver wake the other receivers (whose
    last look may have skipped the row it was taking), once, and only when it stops."""
    a, _ = await psycopg_cluster.member("a")
    for i in range(3):
        assert await a.queue_push("jobs", f"job{i}", 10, later())
    async with wakeups(psycopg_cluster.dsn, a) as heard:
        assert await a.queue_pop("jobs", 0) == "job0"
        assert await a.queue_pop("jobs", 0) == "job1"  # popping on: no hand-over in between
        assert await heard(0.5) == ["jobs"]
        assert await a.queue_pop("jobs", 0) == "job2"
        assert await a.queue_pop("jobs", 0) is None  # found it empty: nothing to hand over
        assert await heard(0.5) == []


async def lock_rows(holder: psycopg.AsyncConnection[Any], channel: str, items: list[str]) -> None:
    """Lock rows as a receiver in the middle of taking them does (until commit)."""
    queue, _ = table_names(channel)
    await holder.execute(
        sql.SQL("SELECT 1 FROM {} WHERE item = ANY(%s) FOR UPDATE").format(sql.Identifier(queue)),
        [items],
    )


async def delete_rows(holder: psycopg.AsyncConnection[Any], channel: str, items: list[str]) -> None:
    queue, _ = table_names(channel)
    await holder.execute(
        sql.SQL("DELETE FROM {} WHERE item = ANY(%s)").format(sql.Identifier(queue)), [items]
    )
    await holder.commit()


async def test_a_receiver_behind_a_locked_row_is_woken_by_the_next_push(
    psycopg_cluster: Cluster,
) -> None:
    """A receiver that found the only row locked by another receiver waits; the next push
    finds that row still there, and wakes it all the same."""
    a, _ = await psycopg_cluster.member("a")
    c, _ = await psycopg_cluster.member("c")
    assert await a.queue_push("jobs", "taken", 10, later())
    async with await psycopg.AsyncConnection.connect(psycopg_cluster.dsn) as holder:
        await lock_rows(holder, psycopg_cluster.channel, ["taken"])
        waiting = asyncio.create_task(c.queue_pop("jobs", 5))
        await asyncio.sleep(0.1)  # c looked, skipped the locked row, and waits
        started = time.monotonic()
        assert await a.queue_push("jobs", "next", 10, later())
        assert await waiting == "next"
        assert time.monotonic() - started < 0.5
        await delete_rows(holder, psycopg_cluster.channel, ["taken"])


async def test_a_receiver_behind_many_locked_rows_waits_for_the_hand_over(
    psycopg_cluster: Cluster,
) -> None:
    """With WAKE_BELOW rows locked by other receivers, the next push wakes nobody: the wake-up
    comes from those receivers, popping on or handing over (sent here by hand, for receivers
    standing in for those of another process)."""
    a, _ = await psycopg_cluster.member("a")
    c, _ = await psycopg_cluster.member("c")
    taken = [f"taken{i}" for i in range(WAKE_BELOW)]
    for item in taken:
        assert await a.queue_push("jobs", item, 100, later())
    async with await psycopg.AsyncConnection.connect(psycopg_cluster.dsn) as holder:
        await lock_rows(holder, psycopg_cluster.channel, taken)
        waiting = asyncio.create_task(c.queue_pop("jobs", 5))
        await asyncio.sleep(0.1)  # c looked, skipped the locked rows, and waits
        assert await a.queue_push("jobs", "next", 100, later())
        await delete_rows(holder, psycopg_cluster.channel, taken)
    await asyncio.sleep(0.2)
    assert not waiting.done()  # no wake-up yet: only the periodic look would find it
    started = time.monotonic()
    await admin_query(psycopg_cluster.dsn, "SELECT pg_notify(%s, 'jobs')", a.names.wakeup)
    assert await waiting == "next"
    assert time.monotonic() - started < 0.5


def count_pops(driver: PgsqlDriver) -> list[int]:
    """Count the pop statements ``driver`` runs from now on (in the list's one element).

    Nothing public tells how often the server was asked, so this wraps the queue module's
    one statement runner."""
    count = [0]
    queues = driver._queues
    pop = queues._pop

    async def counted(session: Any, channel: str) -> Any:
        count[0] += 1
        return await pop(session, channel)

    queues._pop = counted  # type: ignore[method-assign]
    return count


async def test_a_receiver_that_took_the_last_item_waits_without_asking(
    cluster: Cluster,
) -> None:
    """A pop that took the last row says so: the next receive waits for a wake-up instead
    of asking the server again, and the next push wakes it at once."""
    a, _ = await cluster.member("a")
    c, _ = await cluster.member("c")
    assert await a.queue_push("jobs", "only", 10, later())
    await asyncio.sleep(0.2)  # its wake-up has reached c: a later one would be news
    assert await c.queue_pop("jobs", 1) == "only"
    pops = count_pops(c)
    waiting = asyncio.create_task(c.queue_pop("jobs", 5))
    await asyncio.sleep(0.3)
    assert pops[0] == 0  # known to be empty: it waits without asking
    started = time.monotonic()
    assert await a.queue_push("jobs", "next", 10, later())
    assert await waiting == "next"
    assert time.monotonic() - started < 0.5
    assert pops[0] == 1


async def test_a_wake_up_between_two_receives_is_not_missed(cluster: Cluster) -> None:
    """A push to a queue this receiver found empty, heard while nobody waited on it, makes
    the next receive look at once (not at the next periodic look)."""
    a, _ = await cluster.member("a")
    c, _ = await cluster.member("c")
    assert await a.queue_push("jobs", "only", 10, later())
    await asyncio.sleep(0.2)
    assert await c.queue_pop("jobs", 1) == "only"  # took the last row
    assert await a.queue_push("jobs", "between", 10, later())
    await asyncio.sleep(0.2)  # its wake-up reaches c while no receive is waiting there
    started = time.monotonic()
    assert await c.queue_pop("jobs", 5) == "between"
    assert time.monotonic() - started < 0.5


async def test_a_pop_with_rows_behind_it_keeps_asking(cluster: Cluster) -> None:
    """While rows follow the one taken, each receive asks the server (no wake-ups come for a
    longer queue)."""
    a, _ = await cluster.member("a")
    c, _ = await cluster.member("c")
    for i in range(WAKE_BELOW + 4):
        assert await a.queue_push("jobs", f"job{i}", 100, later())
    await asyncio.sleep(0.2)  # the wake-ups of the first pushes have come and gone
    got = [await asyncio.wait_for(c.queue_pop("jobs", 5), 0.5) for _ in range(WAKE_BELOW + 4)]
    assert got == [f"job{i}" for i in range(WAKE_BELOW + 4)]


async def test_pop_waits_for_its_timeout(psycopg_cluster: Cluster) -> None:
    """An empty queue makes queue_pop wait out its timeout, then return None."""
    a, _ = await psycopg_cluster.member("a")
    started = time.monotonic()
    assert await a.queue_pop("empty", 0.6) is None
    assert 0.55 <= time.monotonic() - started < 1.5


async def test_pop_works_without_subscribe(psycopg_cluster: Cluster) -> None:
    """A driver that never subscribed still receives, by polling."""
    a, _ = await psycopg_cluster.member("a")
    lonely = psycopg_cluster.driver("b")
    waiting = asyncio.create_task(lonely.queue_pop("jobs", 3))
    await asyncio.sleep(0.1)
    assert await a.queue_push("jobs", "polled", 10, later())
    assert await waiting == "polled"


async def test_capacity_is_respected_under_concurrency(cluster: Cluster) -> None:
    """Forty concurrent pushes from two instances into capacity 10: exactly ten succeed."""
    a, _ = await cluster.member("a")
    b, _ = await cluster.member("b")
    results = await asyncio.gather(
        *(d.queue_push("full", f"x{i}", 10, later()) for i in range(20) for d in (a, b))
    )
    assert results.count(True) == 10
    assert await count_rows(cluster.dsn, cluster.channel) == 10
    assert await a.queue_pop("full", 0) is not None
    assert await b.queue_push("full", "room again", 10, later())
    assert not await b.queue_push("full", "full again", 10, later())


async def test_expired_items_are_skipped_purged_and_reported(psycopg_cluster: Cluster) -> None:
    """An item past its deadline is never received; it is deleted and reported as expired."""
    a, got = await psycopg_cluster.member("a")
    assert await a.queue_push("jobs", "stale", 1, time.time() + 0.2)
    assert not await a.queue_push("jobs", "no room", 1, later())
    await asyncio.sleep(0.3)
    assert await a.queue_pop("jobs", 0) is None
    assert await count_rows(psycopg_cluster.dsn, psycopg_cluster.channel) == 0
    errors = [e for e, stage in got.reports if stage == "delivery"]
    assert len(errors) == 1 and isinstance(errors[0], MessageExpired)
    assert errors[0].count == 1 and errors[0].channels == ["jobs"]
    assert await a.queue_push("jobs", "fresh", 1, later())  # the expired one freed the room


async def test_returned_items_go_back_to_the_head(cluster: Cluster) -> None:
    """queue_return puts an item before everything waiting, for any instance to take."""
    a, _ = await cluster.member("a")
    b, _ = await cluster.member("b")
    for name in ("first", "second", "third"):
        assert await a.queue_push("jobs", name, 10, later())
    assert await a.queue_pop("jobs", 1) == "first"
    await a.queue_return("jobs", "first")
    assert await b.queue_pop("jobs", 1) == "first"
    assert await b.queue_pop("jobs", 1) == "second"


async def test_a_returned_item_keeps_its_deadline(psycopg_cluster: Cluster) -> None:
    """An item put back expires when it would have, not later."""
    a, _ = await psycopg_cluster.member("a")
    assert await a.queue_push("jobs", "brief", 10, time.time() + 0.3)
    assert await a.queue_pop("jobs", 1) == "brief"
    await a.queue_return("jobs", "brief")
    await asyncio.sleep(0.4)
    assert await a.queue_pop("jobs", 0) is None


async def test_cancelled_receivers_lose_nothing(cluster: Cluster) -> None:
    """Receivers cancelled at random moments never lose or duplicate an item."""
    a, _ = await cluster.member("a")
    b, _ = await cluster.member("b")
    total = 120
    for i in range(total):
        assert await a.queue_push("jobs", f"item{i}", 1000, later())
    received: list[str] = []
    rng = random.Random(4)
    for _ in range(150):
        task = asyncio.create_task((a if rng.random() < 0.5 else b).queue_pop("jobs", 1))
        await asyncio.sleep(rng.uniform(0, 0.004))
        task.cancel()
        try:
            item = await task
        except asyncio.CancelledError:
            continue
        if item is not None:
            received.append(item)
    await asyncio.sleep(0.3)  # items taken by cancelled receivers are being put back
    while (item := await b.queue_pop("jobs", 0.5)) is not None:
        received.append(item)
    assert Counter(received) == Counter(f"item{i}" for i in range(total))


async def test_flush_deletes_only_this_clusters_rows(pg_dsn: str) -> None:
    """flush() empties this cluster's queues and large messages, never another cluster's."""
    async with cluster_of(pg_dsn) as mine, cluster_of(pg_dsn) as theirs:
        a, _ = await mine.member("a")
        other, _ = await theirs.member("z")
        assert await a.queue_push("jobs", "mine", 10, later())
        assert await other.queue_push("jobs", "theirs", 10, later())
        await a.flush()
        assert await a.queue_pop("jobs", 0) is None
        assert await other.queue_pop("jobs", 0) == "theirs"


async def test_flush_before_any_table_exists(psycopg_cluster: Cluster) -> None:
    """flush() on a cluster that never used a table does nothing and raises nothing."""
    a, _ = await psycopg_cluster.member("a")
    await a.flush()


async def test_tables_are_created_concurrently_and_recreated(pg_dsn: str) -> None:
    """Six instances creating the tables at once don't collide; dropped tables come back."""
    async with cluster_of(pg_dsn) as cl:
        drivers = [(await cl.member(f"i{i}"))[0] for i in range(6)]
        results = await asyncio.gather(
            *(d.queue_push("jobs", f"x{i}", 100, later()) for i, d in enumerate(drivers))
        )
        assert results == [True] * 6
        await asyncio.to_thread(drop_tables, pg_dsn, cl.channel)
        assert await drivers[0].queue_push("jobs", "again", 100, later())
        assert await drivers[1].queue_pop("jobs", 1) == "again"


async def test_items_keep_any_text(cluster: Cluster) -> None:
    """Worker items of any text, large and non-ASCII included, come back unchanged."""
    a, _ = await cluster.member("a")
    items = ["", "é✓频道", '{"json": [1, 2]}', "x" * 200_000, "quote ' \" \\ ;"]
    for item in items:
        assert await a.queue_push("jobs", item, 100, later())
    assert [await a.queue_pop("jobs", 1) for _ in items] == items


async def test_worker_channel_names_are_data(cluster: Cluster) -> None:
    """Worker channel names with quotes and SQL in them are plain values, kept apart."""
    a, _ = await cluster.member("a")
    names = ["jobs'", 'jobs"; DELETE FROM x; --', "jobs"]
    for name in names:
        assert await a.queue_push(name, name, 10, later())
    for name in reversed(names):
        assert await a.queue_pop(name, 1) == name


async def test_close_releases_a_waiting_receiver(psycopg_cluster: Cluster) -> None:
    """close() makes a waiting queue_pop return None promptly."""
    a, _ = await psycopg_cluster.member("a")
    waiting = asyncio.create_task(a.queue_pop("jobs", 30))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await a.close()
    assert await asyncio.wait_for(waiting, 2) is None
    assert time.monotonic() - started < 2


async def test_separate_clusters_have_separate_queues(pg_dsn: str) -> None:
    """The same worker channel name in two clusters never shares items."""
    async with cluster_of(pg_dsn) as one, cluster_of(pg_dsn) as two:
        a, _ = await one.member("a")
        b, _ = await two.member("b")
        assert table_names(one.channel) != table_names(two.channel)
        assert await a.queue_push("jobs", "one", 10, later())
        assert await b.queue_pop("jobs", 0.2) is None
        assert await a.queue_pop("jobs", 0) == "one"
        assert unique() != unique()
