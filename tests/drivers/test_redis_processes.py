"""BackplaneChannelLayer with the redis driver across real OS processes.

Each test starts agent processes (:mod:`tests.agent`), each holding one layer, and drives
them over stdin/stdout; assertions run here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from crossws_channels.drivers.redis import WireNames
from tests.agent import Agent, AgentError
from tests.drivers._redis_support import client_list, named, unique

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


def test_group_send_reaches_members_in_other_processes_once(agents: Any) -> None:
    """group_send in one process reaches every member in the other processes of the
    channel exactly once; a process of another channel on the same Redis sees nothing."""
    channel = unique("c")
    sender, b, c = agents(3, channel=channel)
    (stranger,) = agents(1, channel=unique("other"))
    members = [(b, b.call("new_channel")), (b, b.call("new_channel")), (c, c.call("new_channel"))]
    stranger_channel = stranger.call("new_channel")
    for agent, name in members:
        agent.call("group_add", "room", name)
    stranger.call("group_add", "room", stranger_channel)
    sender.call("group_send", "room", {"type": "chat.message", "text": "hi"})
    for agent, name in members:
        assert agent.call("receive", name, 5) == {"type": "chat.message", "text": "hi"}
    for agent, name in members:
        assert agent.call("receive", name, 0.5) is None  # once, never twice
    assert stranger.call("receive", stranger_channel, 0.5) is None


def test_send_to_another_process_channel_reaches_only_that_process(agents: Any) -> None:
    """send() to a channel another process created is routed to that process alone."""
    sender, owner, bystander = agents(3, channel=unique("c"))
    target = owner.call("new_channel")
    before = bystander.call("stats").get("relayed_in", 0)
    for i in range(20):
        sender.call("send", target, {"type": "direct", "n": i})
    received = owner.call("drain", target, 1.0)
    assert received == [{"type": "direct", "n": i} for i in range(20)]
    assert bystander.call("stats").get("relayed_in", 0) == before


def test_group_add_of_another_process_channel_takes_effect_there(agents: Any) -> None:
    """group_add(group, channel) called in one process adds a channel owned by another;
    a group_send from a third process then reaches it, and group_discard removes it."""
    adder, owner, sender = agents(3, channel=unique("c"))
    member = owner.call("new_channel")
    adder.call("group_add", "remote-room", member)
    time.sleep(0.3)  # the membership travels to the owner over the backplane
    sender.call("group_send", "remote-room", {"type": "hello"})
    assert owner.call("receive", member, 5) == {"type": "hello"}
    adder.call("group_discard", "remote-room", member)
    time.sleep(0.3)
    sender.call("group_send", "remote-room", {"type": "after-discard"})
    assert owner.call("receive", member, 1) is None


def test_worker_channel_delivers_each_message_once_across_processes(agents: Any) -> None:
    """Messages sent to a worker channel are each received by exactly one of two
    receiver processes, none lost and none twice."""
    sender, first, second = agents(3, channel=unique("c"), capacity=1000)
    jobs = unique("jobs")
    drains = [(agent, agent.submit("drain", jobs, 2.0)) for agent in (first, second)]
    time.sleep(0.3)
    for i in range(300):
        sender.call("send", jobs, {"type": "job", "n": i})
    got = [message["n"] for agent, command in drains for message in agent.result(command, 30)]
    assert sorted(got) == list(range(300))
    counts = [len(agent.call("drain", jobs, 0.3)) for agent in (first, second)]
    assert counts == [0, 0]


def test_worker_channel_waits_up_to_expiry_and_obeys_capacity(agents: Any) -> None:
    """A worker message waits for a receiver up to `expiry`, is gone after it, and a
    worker channel at `capacity` refuses further sends with ChannelFull."""
    sender, receiver = agents(2, channel=unique("c"), expiry=2, capacity=3)
    waiting = unique("jobs")
    sender.call("send", waiting, {"type": "job", "n": 1})
    time.sleep(1.0)
    assert receiver.call("receive", waiting, 3) == {"type": "job", "n": 1}

    stale = unique("jobs")
    sender.call("send", stale, {"type": "job", "n": 2})
    time.sleep(2.5)
    assert receiver.call("receive", stale, 1) is None

    full = unique("jobs")
    for i in range(3):
        sender.call("send", full, {"type": "job", "n": i})
    with pytest.raises(AgentError) as info:
        sender.call("send", full, {"type": "job", "n": 3})
    assert info.value.name == "ChannelFull"
    assert [m["n"] for m in receiver.call("drain", full, 0.5)] == [0, 1, 2]


def test_message_over_max_message_size_raises_at_the_call(agents: Any) -> None:
    """A message over max_message_size raises MessageTooLarge from send and group_send."""
    sender, receiver = agents(2, channel=unique("c"), max_message_size=2000)
    target = receiver.call("new_channel")
    receiver.call("group_add", "big", target)
    big = {"type": "big", "data": "x" * 5000}
    for op, destination in (("send", target), ("group_send", "big"), ("send", unique("jobs"))):
        with pytest.raises(AgentError) as info:
            sender.call(op, destination, big)
        assert info.value.name == "MessageTooLarge"
    sender.call("group_send", "big", {"type": "small"})
    assert receiver.call("receive", target, 5) == {"type": "small"}


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
