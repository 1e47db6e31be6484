"""BackplaneChannelLayer with the redis driver across real OS processes.

Each test starts agent processes (:mod:`tests.agent`), each holding one layer, and drives
them over stdin/stdout; assertions run here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from crossws_channels.drivers.redis import WireNames
from tests.agent import Agent
from tests.drivers.redis.support import client_list, named, unique

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def agents(redis_url: str) -> Iterator[Any]:
    """Start agent processes: ``agents(n, **config)`` returns n ready agents of one cluster."""
    started: list[Agent] = []

    def start(count: int, mode: str = "async", **config: Any) -> list[Agent]:
        config = {"driver": "redis", "url": redis_url, **config}
        batch = [Agent(config, sync=mode == "sync") for _ in range(count)]
        started.extend(batch)
        return [agent.wait_ready() for agent in batch]

    try:
        yield start
    finally:
        for agent in started:
            agent.stop()


def test_flush_leaves_other_clusters_keys_alone(agents: Any, redis_url: str) -> None:
    """flush() in one cluster deletes its worker queues and no other cluster's."""
    import redis as redis_py

    mine, theirs = unique("c"), unique("c")
    (flusher,) = agents(1, channel=mine)
    (other,) = agents(1, channel=theirs)
    jobs = unique("jobs")
    flusher.call("send", jobs, {"type": "job"})
    other.call("send", jobs, {"type": "job"})
    with redis_py.Redis.from_url(redis_url) as raw:
        assert raw.exists(WireNames.for_channel(mine).queue(jobs)) == 1
        flusher.call("flush")
        assert raw.exists(WireNames.for_channel(mine).queue(jobs)) == 0
        assert raw.exists(WireNames.for_channel(theirs).queue(jobs)) == 1
    assert other.call("receive", jobs, 3) == {"type": "job"}


@pytest.mark.timeout(300)
def test_many_async_to_sync_group_sends_leave_client_list_flat(agents: Any, redis_url: str) -> None:
    """5,000 async_to_sync(layer.group_send) calls from a process without an event loop
    of its own leave its connections in CLIENT LIST as they were, and all arrive."""
    channel = unique("c")
    (receiver,) = agents(1, channel=channel, capacity=20_000)
    member = receiver.call("new_channel")
    receiver.call("group_add", "sync-room", member)
    (sender,) = agents(1, "sync", channel=channel)

    sender.write("sync-room 100")
    assert sender.event(60)["done"] == 100
    mine = named(sender.instance_id)
    before_own = len(client_list(redis_url, mine))
    before_total = len(client_list(redis_url))
    draining = receiver.submit("drain", member, 3.0)

    sender.write("sync-room 5000")
    done = sender.event(240)
    after_own = len(client_list(redis_url, mine))
    after_total = len(client_list(redis_url))
    received = receiver.result(draining, 120)
    print(
        f"\n5000 async_to_sync(group_send) in {done['seconds']:.1f} s; CLIENT LIST for "
        f"the sending process: {before_own} before, {after_own} after; whole server "
        f"{before_total} before, {after_total} after; {len(received)} received"
    )
    assert done["done"] == 5000
    assert after_own == before_own
    assert after_own <= 3  # command, subscribe (no pops: it never receives)
    assert len(received) == 5100
    assert [m["n"] for m in received[100:]] == list(range(5000))
