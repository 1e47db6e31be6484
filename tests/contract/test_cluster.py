"""What a cluster of instances does, on every driver (the ``cluster`` fixture).

On ``redis``, ``pgsql`` and ``multiprocessing`` every agent is an OS process of its own;
on ``local`` (which relays inside one process) a layer on a thread with its own loop.
Each scenario is written once; a driver's own mechanics (outages, SQL, Lua, the relay)
are tested beside it, in ``tests/drivers/``.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from tests.agent import AgentError
from tests.cluster import Cluster
from tests.waiting import eventually

pytestmark = pytest.mark.slow

MESSAGE = {"type": "chat.message", "text": "héllo", "blob": b"\x00\xff", "n": [1, 2.5]}


def memberships(agent: Any) -> int:
    count: int = agent.call("stats")["memberships"]
    return count


def test_group_send_reaches_every_member_in_the_other_instances_once(cluster: Cluster) -> None:
    """A group_send from any instance reaches the group's members in every instance (its
    own first), each exactly once, whatever the message holds; an instance of another
    cluster on the same backplane sees nothing."""
    a, b, c = cluster.start(3)
    (stranger,) = cluster.sibling().start(1)
    members = [(a, a.call("new_channel")), (b, b.call("new_channel")), (b, b.call("new_channel"))]
    members.append((c, c.call("new_channel")))
    for agent, channel in members:
        agent.call("group_add", "room", channel)
    outsider = stranger.call("new_channel")
    stranger.call("group_add", "room", outsider)
    a.call("group_send", "room", MESSAGE)
    c.call("group_send", "room", {"type": "chat.message", "text": "from c"})
    for agent, channel in members:
        # Messages of different instances have no defined order between them.
        got = [agent.call("receive", channel, 5) for _ in range(2)]
        assert sorted(got, key=lambda m: m["text"]) == [
            {"type": "chat.message", "text": "from c"},
            MESSAGE,
        ]
    for agent, channel in members:
        assert agent.call("receive", channel, 0.3) is None  # once, never twice
    assert stranger.call("receive", outsider, 0.3) is None


def test_send_to_a_channel_of_another_instance_reaches_only_it_in_order(
    cluster: Cluster,
) -> None:
    """A send to a channel another instance created is routed to that instance alone,
    and messages from one sender arrive in the order they were sent."""
    # No heartbeats: every envelope the bystander receives is one of this test's.
    sender, owner, bystander = cluster.start(3, heartbeat=0)
    target = owner.call("new_channel")
    before = bystander.call("stats").get("relayed_in", 0)
    for n in range(20):
        sender.call("send", target, {"type": "direct", "n": n})
    assert [m["n"] for m in owner.call("drain", target, 1.0)] == list(range(20))
    # A message for the bystander from the same sender comes after everything above, in
    # order: once it has arrived, nothing else did (had the sends been relayed to every
    # instance, the bystander would have seen those 20 before it).
    sender.call("send", bystander.call("new_channel"), {"type": "sync"})
    eventually(lambda: bystander.call("stats").get("relayed_in", 0) > before, what="it")
    assert bystander.call("stats")["relayed_in"] == before + 1


def test_group_add_and_discard_of_another_instances_channel_take_effect_there(
    cluster: Cluster,
) -> None:
    """group_add(group, channel) called in one instance adds a channel another owns, on
    the owner; a group_send from a third instance then reaches it; group_discard ends it."""
    adder, owner, sender = cluster.start(3)
    member = owner.call("new_channel")
    adder.call("group_add", "remote-room", member)
    eventually(lambda: memberships(owner) == 1, what="the membership on the owner")
    assert memberships(adder) == 0
    sender.call("group_send", "remote-room", {"type": "hello"})
    assert owner.call("receive", member, 5) == {"type": "hello"}
    adder.call("group_discard", "remote-room", member)
    eventually(lambda: memberships(owner) == 0, what="the membership to end")
    sender.call("group_send", "remote-room", {"type": "gone"})
    assert owner.call("receive", member, 0.5) is None


def test_a_worker_channel_hands_each_message_to_exactly_one_receiver(cluster: Cluster) -> None:
    """Messages to a worker channel are received by exactly one of two receiving
    instances each: none lost, none twice."""
    sender, first, second = cluster.start(3, capacity=1000)
    drains = [(agent, agent.submit("drain", "jobs", 2.0)) for agent in (first, second)]
    eventually(lambda: all(agent.call("stats")["receivers"] for agent in (first, second)))
    for n in range(300):
        sender.call("send", "jobs", {"type": "job", "n": n})
    got = Counter(m["n"] for agent, command in drains for m in agent.result(command, 60))
    assert got == Counter(range(300))


def test_a_worker_message_waits_for_a_receiver_up_to_expiry(cluster: Cluster) -> None:
    """A worker-channel message waits for a receiver that comes later, while younger
    than ``expiry``; after that it is gone."""
    sender, receiver = cluster.start(2, expiry=1.5)
    sender.call("send", "later", {"type": "job", "n": 1})
    time.sleep(0.7)  # younger than expiry still
    assert receiver.call("receive", "later", 3) == {"type": "job", "n": 1}
    sender.call("send", "stale", {"type": "job", "n": 2})
    time.sleep(2.0)  # past expiry
    assert receiver.call("receive", "stale", 0.5) is None


def test_a_worker_channel_holds_capacity_messages_for_the_whole_cluster(
    cluster: Cluster,
) -> None:
    """A worker channel holds ``capacity`` messages in all; then a send from any
    instance raises ChannelFull, until a receiver takes one."""
    one, two = cluster.start(2, capacity=3)
    for n in range(3):
        (one if n % 2 else two).call("send", "jobs", {"type": "job", "n": n})
    for agent in (one, two):
        with pytest.raises(AgentError) as info:
            agent.call("send", "jobs", {"type": "job", "n": 99})
        assert info.value.name == "ChannelFull"
    assert two.call("receive", "jobs", 5)["n"] == 0
    one.call("send", "jobs", {"type": "job", "n": 3})
    assert [m["n"] for m in one.call("drain", "jobs", 0.5)] == [1, 2, 3]


def test_a_cancelled_worker_receive_loses_nothing(cluster: Cluster) -> None:
    """A worker-channel receive that times out (is cancelled) as a message arrives
    leaves that message to the next receiver: nothing is lost to the cluster."""
    waiter, sender = cluster.start(2)
    for n in range(20):
        pending = waiter.submit("receive", "handoff", 0.02 * (n % 5))
        sender.call("send", "handoff", {"type": "n", "n": n})
        got = waiter.result(pending)
        if got is None:
            got = sender.call("receive", "handoff", 5)
        assert got == {"type": "n", "n": n}


def test_a_message_of_nearly_max_message_size_crosses_intact(cluster: Cluster) -> None:
    """About 1 MiB of binary data, just under max_message_size, reaches a group member
    and a channel of another instance byte for byte."""
    sender, receiver = cluster.start(2)
    member = receiver.call("new_channel")
    receiver.call("group_add", "big", member)
    size = 1024 * 1024 - 512  # with the message's own keys: just under 1 MiB serialized
    digest = sender.call("send_blob", "big", size, 3, True)
    assert receiver.call("receive_blob", member, 15, timeout=30) == {"sha256": digest, "size": size}
    digest = sender.call("send_blob", member, size, 5, False)
    assert receiver.call("receive_blob", member, 15, timeout=30) == {"sha256": digest, "size": size}


def test_a_message_over_max_message_size_is_refused_at_the_call(cluster: Cluster) -> None:
    """send and group_send raise MessageTooLarge for a message over max_message_size,
    wherever it was going; nothing is relayed."""
    sender, receiver = cluster.start(2, max_message_size=2000)
    target = receiver.call("new_channel")
    receiver.call("group_add", "big", target)
    big = {"type": "big", "data": "x" * 5000}
    for op, destination in (("send", target), ("group_send", "big"), ("send", "jobs")):
        with pytest.raises(AgentError) as info:
            sender.call(op, destination, big)
        assert info.value.name == "MessageTooLarge"
    sender.call("group_send", "big", {"type": "small"})
    assert receiver.call("receive", target, 5) == {"type": "small"}


def test_flush_empties_the_clusters_worker_channels(cluster: Cluster) -> None:
    """flush() in one instance deletes what waits in the cluster's worker channels."""
    flusher, other = cluster.start(2)
    other.call("send", "jobs", {"type": "job"})
    flusher.call("flush")
    assert other.call("receive", "jobs", 0.5) is None
    other.call("send", "jobs", {"type": "after"})
    assert flusher.call("receive", "jobs", 5) == {"type": "after"}


def test_group_sends_from_sync_code_arrive_in_order(cluster: Cluster) -> None:
    """async_to_sync(layer.group_send) from code with no event loop (a sync view, a
    management command) reaches members in other instances, in order."""
    (receiver,) = cluster.start(1)
    member = receiver.call("new_channel")
    receiver.call("group_add", "sync-room", member)
    (sender,) = cluster.start(1, sync=True)
    draining = receiver.submit("drain", member, 2.0)
    assert sender.sync_group_send("sync-room", 300)["done"] == 300
    assert [m["n"] for m in receiver.result(draining, 60)] == list(range(300))
