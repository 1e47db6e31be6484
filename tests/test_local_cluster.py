"""The local driver: layer instances of one process form a cluster, across threads and loops."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from tests.loops import OtherLoop


@pytest.fixture
def other() -> Iterator[OtherLoop]:
    """A second event loop on its own thread."""
    loop = OtherLoop()
    yield loop
    loop.close()


async def test_group_send_reaches_members_of_another_instance(
    make_layer: Any, other: OtherLoop
) -> None:
    """group_send on A reaches B's members, on B's own loop and thread, exactly once."""
    a, b = make_layer(), make_layer()
    mine = await a.new_channel()
    theirs = await other.run(b.new_channel())
    await a.group_add("room", mine)
    await other.run(b.group_add("room", theirs))
    receiving = other.submit(b.receive(theirs))
    await a.group_send("room", {"type": "hello"})
    assert await asyncio.wait_for(receiving, 2) == {"type": "hello"}
    assert await asyncio.wait_for(a.receive(mine), 2) == {"type": "hello"}
    with pytest.raises(asyncio.TimeoutError):
        await other.run(asyncio.wait_for(b.receive(theirs), 0.3))
    await other.run(b.close())


async def test_send_to_another_instances_channel_reaches_only_it(make_layer: Any) -> None:
    """A send to B's channel from A is delivered by B, and never lands on A or C."""
    a, b, c = make_layer(), make_layer(), make_layer()
    theirs = await b.new_channel()
    await a.send(theirs, {"type": "direct"})
    assert await asyncio.wait_for(b.receive(theirs), 2) == {"type": "direct"}
    await asyncio.sleep(0.1)
    for layer in (a, c):
        assert layer.stats()["queued"] == 0
        assert layer.stats().get("delivered", 0) == 0
    assert c.stats().get("relayed_in", 0) == 0  # routed to B only, not broadcast


async def test_group_add_of_another_instances_channel_takes_effect_there(make_layer: Any) -> None:
    """A calls group_add with B's channel; the membership lives on B; discard works too."""
    a, b = make_layer(), make_layer()
    theirs = await b.new_channel()
    await a.group_add("room", theirs)
    await asyncio.sleep(0.05)
    assert b._registry.members("room") == [theirs]
    assert a._registry.members("room") == []
    await a.group_send("room", {"type": "via-a"})
    assert await asyncio.wait_for(b.receive(theirs), 2) == {"type": "via-a"}
    await a.group_discard("room", theirs)
    await asyncio.sleep(0.05)
    assert b._registry.members("room") == []


async def test_worker_channel_is_received_exactly_once_across_instances(
    make_layer: Any, other: OtherLoop
) -> None:
    """Messages to a worker channel are shared by A and B's receivers, none twice, none lost."""
    a, b = make_layer(capacity=1000), make_layer(capacity=1000)
    received: list[int] = []

    async def consume(layer: Any) -> None:
        while True:
            message = await layer.receive("jobs")
            received.append(message["n"])

    consumers = [asyncio.ensure_future(consume(a)), other.submit(consume(b))]
    await asyncio.sleep(0.05)
    for n in range(300):
        await a.send("jobs", {"type": "job", "n": n})
    for _ in range(100):
        if len(received) >= 300:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    for consumer in consumers:
        consumer.cancel()
    assert sorted(received) == list(range(300))
    assert a.stats().get("delivered", 0) > 0 and b.stats().get("delivered", 0) > 0


async def test_worker_channel_waits_for_a_receiver_up_to_expiry(make_layer: Any) -> None:
    """A worker message waits for a receiver that comes later, but not past expiry."""
    a, b = make_layer(expiry=0.5), make_layer(expiry=0.5)
    await a.send("later", {"type": "job", "n": 1})
    await asyncio.sleep(0.2)
    assert await asyncio.wait_for(b.receive("later"), 2) == {"type": "job", "n": 1}
    await a.send("later", {"type": "job", "n": 2})
    await asyncio.sleep(0.7)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(b.receive("later"), 0.5)
    assert b.stats()["dropped.expired"] == 1


async def test_worker_channel_capacity_is_cluster_wide(make_layer: Any) -> None:
    """The shared queue of a worker channel holds at most `capacity` messages."""
    from channels.exceptions import ChannelFull

    a, b = make_layer(capacity=2), make_layer(capacity=2)
    await a.send("busy", {"type": "1"})
    await b.send("busy", {"type": "2"})
    with pytest.raises(ChannelFull):
        await a.send("busy", {"type": "3"})


async def test_cancelled_worker_receive_gives_the_message_back(make_layer: Any) -> None:
    """A worker-channel receive cancelled mid-delivery loses nothing to the cluster."""
    a, b = make_layer(), make_layer()
    for n in range(50):
        waiting = asyncio.ensure_future(a.receive("handoff"))
        await asyncio.sleep(0.01)
        await b.send("handoff", {"type": "n", "n": n})
        await asyncio.sleep(0)
        waiting.cancel()
        try:
            got = await waiting
        except asyncio.CancelledError:
            got = await asyncio.wait_for(b.receive("handoff"), 2)
        assert got == {"type": "n", "n": n}


async def test_different_channels_never_bridge(make_layer: Any) -> None:
    """Instances with different `channel` values don't see each other's groups or sends."""
    a = make_layer(channel="cluster-one")
    b = make_layer(channel="cluster-two")
    theirs = await b.new_channel()
    await b.group_add("room", theirs)
    await a.group_send("room", {"type": "leak?"})
    await a.send("jobs-bridge", {"type": "job"})
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(b.receive(theirs), 0.3)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(b.receive("jobs-bridge"), 0.3)
