"""A driver that declares ``buffers = True`` is published to from the sending task when
nothing else waits to be relayed; one that doesn't, from the layer's relaying task.
Either way every message arrives, in order."""

from __future__ import annotations

import asyncio
from typing import Any

from crossws_channels.drivers.local import LocalDriver

PUBLISHED_BY: list[asyncio.Task[Any] | None] = []


class RecordingLocal(LocalDriver):
    """The local driver, noting which task publishes each envelope."""

    async def publish(self, envelope: str, /) -> None:
        PUBLISHED_BY.append(asyncio.current_task())
        await super().publish(envelope)


class BufferingLocal(RecordingLocal):
    buffers = True


async def _relay(make_layer: Any, driver: str) -> tuple[list[int], set[Any]]:
    PUBLISHED_BY.clear()
    sender = make_layer(driver=f"tests.test_outbox_buffering.{driver}")
    receiver = make_layer(driver=f"tests.test_outbox_buffering.{driver}")
    member = await receiver.new_channel()
    await receiver.group_add("g", member)
    await sender.new_channel()
    PUBLISHED_BY.clear()
    for n in range(50):
        await sender.group_send("g", {"type": "n", "n": n})
    got = [(await asyncio.wait_for(receiver.receive(member), 2))["n"] for _ in range(50)]
    return got, set(PUBLISHED_BY)


async def test_a_buffering_driver_is_published_to_by_the_sender(make_layer: Any) -> None:
    got, publishers = await _relay(make_layer, "BufferingLocal")
    assert got == list(range(50))
    assert publishers == {asyncio.current_task()}


async def test_other_drivers_are_published_to_by_the_relaying_task(make_layer: Any) -> None:
    got, publishers = await _relay(make_layer, "RecordingLocal")
    assert got == list(range(50))
    assert asyncio.current_task() not in publishers


async def test_a_burst_from_many_tasks_arrives_whole_through_a_buffering_driver(
    make_layer: Any,
) -> None:
    PUBLISHED_BY.clear()
    config = {"driver": "tests.test_outbox_buffering.BufferingLocal", "capacity": 1000}
    sender, receiver = make_layer(**config), make_layer(**config)
    member = await receiver.new_channel()
    await receiver.group_add("g", member)
    await sender.new_channel()

    async def burst(task: int) -> None:
        for n in range(100):
            await sender.group_send("g", {"type": "n", "task": task, "n": n})

    await asyncio.gather(*(burst(t) for t in range(4)))
    got = [await asyncio.wait_for(receiver.receive(member), 2) for _ in range(400)]
    for task in range(4):
        # Each sender's own messages keep their order.
        assert [m["n"] for m in got if m["task"] == task] == list(range(100))
