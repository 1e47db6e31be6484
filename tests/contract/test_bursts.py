"""Bursts with default settings, on every driver (across real processes on the network
drivers, across threads on ``local``).

A sender that does not pace itself (a loop of awaited ``group_send``/``send``, as a
management command or a Celery task writes it) must not lose messages to a consumer in
another process that is reading: the layer holds the transport back instead
(docs/semantics.md, "Backpressure"). Only a consumer that is not reading loses messages,
only those beyond its capacity, and reported in a few aggregated reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.agent import RECORD
from tests.cluster import Cluster
from tests.waiting import eventually

pytestmark = pytest.mark.slow

CAPACITY = 100  # the default


def reading(agent: Any, receivers: int = 1) -> None:
    """Wait until ``receivers`` receives wait in ``agent``: its consumers are reading."""
    eventually(lambda: agent.call("stats")["receivers"] >= receivers, what="receivers")


def burst_to_reading_member(
    sender: Any, receiver: Any, count: int, *, then_stop: bool = False
) -> tuple[str, list[int]]:
    """``count`` unpaced group_sends from ``sender`` (then stopped, with ``then_stop``) to
    a member of ``receiver`` that reads all along; the member, and what it received."""
    member = receiver.call("new_channel")
    receiver.call("group_add", "burst", member)
    collecting = receiver.submit("collect", member, count, 10.0)
    reading(receiver)
    sender.call("group_burst", "burst", count, timeout=120)
    if then_stop:
        sender.stop()
    received: list[int] = receiver.result(collecting, timeout=120)
    return member, received


def losses(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if (k.startswith("dropped.") or k == "lost") and v}


def test_an_unpaced_group_burst_reaches_a_reading_member_whole_and_in_order(
    cluster: Cluster,
) -> None:
    """20,000 group_sends as fast as the sender can: the member in another process,
    reading all along, receives every one once, in order, and nothing is dropped."""
    sender, receiver = cluster.start(2, on_error=RECORD)
    assert burst_to_reading_member(sender, receiver, 20_000)[1] == list(range(20_000))
    assert losses(receiver.call("stats")) == {}
    assert receiver.call("reports") == []


@pytest.mark.pgsql
def test_an_unpaced_group_burst_over_asyncpg_arrives_whole(pg_dsn: str, tmp_path: Path) -> None:
    """The same burst through the pgsql driver on asyncpg, which pauses differently."""
    cluster = Cluster("pgsql", {"dsn": pg_dsn, "connector": "asyncpg"}, tmp_path)
    try:
        sender, receiver = cluster.start(2)
        assert burst_to_reading_member(sender, receiver, 20_000)[1] == list(range(20_000))
        assert losses(receiver.call("stats")) == {}
    finally:
        cluster.close()


def test_a_sender_that_closes_right_after_a_burst_sends_each_message_once(
    cluster: Cluster,
) -> None:
    """Closing the layer right after a burst relays what was still queued, and never
    relays a batch twice (one that was being written when close began)."""
    sender, receiver = cluster.start(2)
    member, received = burst_to_reading_member(sender, receiver, 5_000, then_stop=True)
    assert received == list(range(5_000))
    assert receiver.call("collect", member, 1, 0.5) == []  # nothing after, no duplicate


def test_awaited_sends_to_a_reading_channel_of_another_process_all_arrive(
    cluster: Cluster,
) -> None:
    """5,000 awaited send()s to a channel another process reads: each arrives once and
    in order, or raises ChannelFull at the caller; with the consumer reading, none has
    to."""
    sender, owner = cluster.start(2)
    channel = owner.call("new_channel")
    collecting = owner.submit("collect", channel, 5_000, 10.0)
    reading(owner)
    result = sender.call("send_burst", channel, 5_000, timeout=120)
    refused = set(result["refused"])
    received = owner.result(collecting, timeout=120)
    assert received == [n for n in range(5_000) if n not in refused]
    assert refused == set()
    assert losses(owner.call("stats")) == {}


def test_sends_to_a_channel_nobody_reads_raise_channel_full_at_the_caller(
    cluster: Cluster,
) -> None:
    """A channel of another process whose consumer never reads takes its capacity; every
    send after that raises ChannelFull at the caller (after one wait of at most
    ``backpressure`` seconds, then at once), and none is dropped silently at the owner."""
    sender, owner = cluster.start(2)
    channel = owner.call("new_channel")
    result = sender.call("send_burst", channel, 300, timeout=60)
    assert result["refused"] == list(range(CAPACITY, 300))
    assert result["seconds"] < 10  # one wait for credit, not one per refused send
    assert owner.call("collect", channel, 1_000, 0.5) == list(range(CAPACITY))
    stats = owner.call("stats")
    assert losses(stats) == {}


def test_a_stuck_member_loses_only_its_overflow_and_the_process_stays_responsive(
    cluster: Cluster,
) -> None:
    """A group with one reading and one stuck member in another process: the reading one
    gets every message; the stuck one keeps its capacity, the rest is dropped for it,
    counted exactly and reported a few times (not once per message); the receiving
    process's event loop answers promptly throughout."""
    sender, receiver = cluster.start(2, on_error=RECORD)
    live, stuck = receiver.call("new_channel"), receiver.call("new_channel")
    for channel in (live, stuck):
        receiver.call("group_add", "room", channel)
    collecting = receiver.submit("collect", live, 5_000, 10.0)
    measuring = receiver.submit("lag", 3.0)
    reading(receiver)
    sender.call("group_burst", "room", 5_000, timeout=60)
    assert receiver.result(collecting, timeout=60) == list(range(5_000))
    assert receiver.result(measuring, timeout=30) < 0.5
    assert receiver.call("stats")["dropped.full"] == 5_000 - CAPACITY
    assert receiver.call("collect", stuck, 1_000, 0.5) == list(range(CAPACITY))

    def dropped_reports() -> list[dict[str, Any]]:
        found = [r for r in receiver.call("reports") if r["type"] == "MessagesDropped"]
        return found if sum(r["count"] for r in found) == 5_000 - CAPACITY else []

    reports = eventually(dropped_reports, what="every drop reported")
    assert {r["stage"] for r in reports} == {"delivery"}
    assert len(reports) <= 6
