"""Any event loop, any thread: how Django code really calls a channel layer."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from crossws_channels.layer import BackplaneChannelLayer
from tests.loops import OtherLoop


@pytest.fixture
def layer() -> Iterator[BackplaneChannelLayer]:
    """A local-driver layer used from plain (non-async) test code; closed afterwards."""
    built = BackplaneChannelLayer(driver="local", channel=f"loops-{uuid.uuid4().hex[:8]}")
    yield built
    async_to_sync(built.close)()


def _crossws_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == "crossws-channels")


def test_async_to_sync_from_a_sync_view_thread(layer: BackplaneChannelLayer) -> None:
    """A sync view's async_to_sync(group_send) reaches a consumer on a server loop."""
    server = OtherLoop()
    try:
        channel = asyncio.run_coroutine_threadsafe(layer.new_channel(), server.loop).result(2)
        asyncio.run_coroutine_threadsafe(layer.group_add("room", channel), server.loop).result(2)
        receiving = asyncio.run_coroutine_threadsafe(layer.receive(channel), server.loop)
        async_to_sync(layer.group_send)("room", {"type": "from.view"})
        assert receiving.result(2) == {"type": "from.view"}
    finally:
        server.close()


def test_fresh_loop_per_call_leaks_nothing(layer: BackplaneChannelLayer) -> None:
    """Thousands of calls, each on a new event loop, leave no threads, loops or tasks behind."""
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)("room", channel)
    threads_before = threading.active_count()
    for n in range(1000):
        asyncio.run(layer.group_send("room", {"type": "n", "n": n}))
        if n % 10 == 0:
            # Drain from yet another fresh loop, as a management command would.
            while layer.stats()["queued"]:
                asyncio.run(layer.receive(channel))
    assert threading.active_count() <= threads_before + 1
    assert _crossws_threads() <= 1
    home = layer._backplane.home
    assert home is not None and home.is_running()

    async def tasks_on_home() -> int:
        return len(asyncio.all_tasks())

    assert asyncio.run_coroutine_threadsafe(tasks_on_home(), home).result(2) < 10


def test_several_threads_at_once(layer: BackplaneChannelLayer) -> None:
    """Eight threads sending concurrently deliver every message exactly once."""
    server = OtherLoop()
    try:
        channel = asyncio.run_coroutine_threadsafe(layer.new_channel(), server.loop).result(2)
        asyncio.run_coroutine_threadsafe(layer.group_add("room", channel), server.loop).result(2)

        def send_many(thread: int) -> None:
            for n in range(50):
                async_to_sync(layer.group_send)("room", {"type": "n", "n": thread * 1000 + n})

        async def drain() -> list[int]:
            return [(await layer.receive(channel))["n"] for _ in range(400)]

        draining = asyncio.run_coroutine_threadsafe(drain(), server.loop)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send_many, range(8)))
        got = draining.result(10)
        assert sorted(got) == sorted(t * 1000 + n for t in range(8) for n in range(50))
    finally:
        server.close()


# Killing a loop under a waiting receive leaves that task pending forever, on purpose.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_nothing_is_delivered_into_a_dead_loop(layer: BackplaneChannelLayer) -> None:
    """A receiver whose loop died gets nothing; the message waits for a live receiver."""
    channel = async_to_sync(layer.new_channel)()
    doomed = OtherLoop()
    pending = asyncio.run_coroutine_threadsafe(layer.receive(channel), doomed.loop)
    time.sleep(0.05)
    assert layer.stats()["receivers"] == 1
    # Kill the loop without letting the receive finish: stop it and close it.
    doomed.loop.call_soon_threadsafe(doomed.loop.stop)
    doomed.thread.join(2)
    doomed.loop.close()
    async_to_sync(layer.send)(channel, {"type": "survives"})
    assert async_to_sync(layer.receive)(channel) == {"type": "survives"}
    assert not pending.done()
    del pending, doomed
    gc.collect()


def test_layer_outlives_the_loop_it_started_on(layer: BackplaneChannelLayer) -> None:
    """After the first asyncio.run ends, the layer carries on from the next loop."""
    channel = asyncio.run(layer.new_channel())  # this loop ends right away
    asyncio.run(layer.group_add("room", channel))

    async def roundtrip() -> dict[str, Any]:
        await layer.group_send("room", {"type": "again"})
        return await asyncio.wait_for(layer.receive(channel), 2)

    for _ in range(3):
        assert asyncio.run(roundtrip()) == {"type": "again"}


async def test_mixing_loops_raises_no_loop_errors(make_layer: Any) -> None:
    """Using one layer from two loops in turn never hits "attached to a different loop"."""
    layer = make_layer()
    other = OtherLoop()
    try:
        channel = await layer.new_channel()
        await layer.group_add("room", channel)
        for n in range(50):
            if n % 2:
                await other.run(layer.group_send("room", {"type": "n", "n": n}))
            else:
                await layer.group_send("room", {"type": "n", "n": n})
            message = await (
                other.run(layer.receive(channel))
                if n % 3
                else asyncio.wait_for(layer.receive(channel), 2)
            )
            assert message == {"type": "n", "n": n}
    finally:
        other.close()


async def test_sync_to_async_and_back(make_layer: Any) -> None:
    """A sync function run by sync_to_async can call the layer through async_to_sync."""
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.group_add("room", channel)

    def sync_view() -> None:
        async_to_sync(layer.group_send)("room", {"type": "nested"})

    await sync_to_async(sync_view)()
    assert await asyncio.wait_for(layer.receive(channel), 2) == {"type": "nested"}
