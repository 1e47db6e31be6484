"""The nats driver over a private three-server NATS cluster: one server is killed while
relaying, and the instances carry on through the others."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.drivers.nats.support import NatsCluster
from tests.waiting import eventually_async

pytestmark = [pytest.mark.nats, pytest.mark.slow]


async def _jetstream_ready(url: str) -> bool:
    import nats

    client = await nats.connect(url, connect_timeout=1, allow_reconnect=False)
    try:
        await client.jetstream().account_info()
        return True
    except Exception:
        return False
    finally:
        await client.close()


@pytest.mark.timeout(120)
async def test_killing_a_server_of_the_cluster_loses_relaying_for_seconds_only(
    make_layer: Any,
) -> None:
    with NatsCluster() as cluster:
        await eventually_async(
            lambda: _jetstream_ready(cluster.servers[0].url), timeout=30, what="JetStream"
        )
        connect = {"dont_randomize": True}
        # The sender starts on the server that will be killed, the receiver elsewhere.
        sender = make_layer(driver="nats", url=cluster.urls(0), connect=connect, heartbeat=0)
        receiver = make_layer(
            driver="nats", url=cluster.urls(1), connect=connect, stream_replicas=3
        )
        member = await receiver.new_channel()
        await receiver.group_add("room", member)
        await sender.new_channel()
        received: list[int] = []

        async def read() -> None:
            while True:
                received.append((await receiver.receive(member))["n"])

        reader = asyncio.create_task(read())
        sent = 0
        killed_at = None
        resumed = None
        try:
            started = time.monotonic()
            while time.monotonic() - started < 8:
                await sender.group_send("room", {"type": "m", "n": sent})
                sent += 1
                if killed_at is None and time.monotonic() - started > 2:
                    cluster.servers[0].stop()
                    killed_at, at_kill = time.monotonic(), len(received)
                elif killed_at is not None and resumed is None and len(received) > at_kill + 10:
                    resumed = time.monotonic() - killed_at
                await asyncio.sleep(0.002)
            await asyncio.sleep(1)
        finally:
            reader.cancel()
        print(f"relaying resumed {resumed:.2f} s after the kill; {len(received)}/{sent} arrived")
        assert resumed is not None and resumed < 5
        assert len(received) == len(set(received)), "a message arrived twice"
        assert received == sorted(received)


@pytest.mark.timeout(120)
async def test_worker_channels_stay_exactly_once_when_a_server_dies(make_layer: Any) -> None:
    with NatsCluster() as cluster:
        await eventually_async(
            lambda: _jetstream_ready(cluster.servers[0].url), timeout=30, what="JetStream"
        )
        config = {
            "driver": "nats",
            "stream_replicas": 3,
            "capacity": 1000,
            "connect": {"dont_randomize": True},
        }
        producer = make_layer(**config, url=cluster.urls(1))
        consumers = [make_layer(**config, url=cluster.urls(i)) for i in (0, 2)]
        total = 300
        for n in range(total):
            await producer.send("jobs", {"type": "job", "n": n})
        got: list[int] = []

        async def consume(layer: Any) -> None:
            while True:
                got.append((await layer.receive("jobs"))["n"])

        tasks = [asyncio.create_task(consume(layer)) for layer in consumers]
        try:
            await eventually_async(lambda: len(got) > 50, timeout=20, what="consumption")
            cluster.servers[0].stop()
            try:
                await eventually_async(lambda: len(got) >= total, timeout=60, what="every job")
            except AssertionError as exc:
                missing = sorted(set(range(total)) - set(got))
                raise AssertionError(f"{exc}: {len(missing)} missing, {missing[:20]}") from None
            await asyncio.sleep(1)
        finally:
            for task in tasks:
                task.cancel()
        assert sorted(got) == list(range(total)), "a job was lost or received twice"
