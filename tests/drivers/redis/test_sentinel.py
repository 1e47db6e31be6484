"""The redis driver through Redis Sentinel: a master, a replica and three sentinels of
the test's own, on free ports. The driver asks the sentinels where the master is, and
follows a failover: relaying and worker channels go on on the new master."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import pytest
import redis

from crossws_channels.errors import ConfigurationError
from tests.conftest import ErrorLog
from tests.servers import SentinelDeployment
from tests.waiting import eventually_async

logger = logging.getLogger(__name__)


def sentinel_config(deployment: SentinelDeployment, **more: Any) -> dict[str, Any]:
    return {
        "driver": "redis",
        "sentinels": deployment.addresses,
        "master_name": deployment.MASTER_NAME,
        **more,
    }


@pytest.fixture
def deployment() -> Any:
    with SentinelDeployment() as made:
        yield made


async def test_the_layer_finds_the_master_through_the_sentinels(
    make_layer: Any, deployment: SentinelDeployment
) -> None:
    sender = make_layer(**sentinel_config(deployment))
    receiver = make_layer(**sentinel_config(deployment))
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    await sender.new_channel()
    await sender.group_send("room", {"type": "m"})
    assert (await asyncio.wait_for(receiver.receive(channel), 5))["type"] == "m"
    await sender.send("jobs", {"type": "job"})
    assert (await asyncio.wait_for(receiver.receive("jobs"), 5))["type"] == "job"
    port = deployment.master_port()
    assert port is not None
    with redis.Redis(port=port) as client:
        names = {entry.get("name", "") for entry in client.client_list()}
    assert f"crossws_channels:sub:{receiver.instance_id}" in names


class Stream:
    """A sender relaying numbered group messages and worker-channel items every few ms,
    and a receiver taking both: for measuring what a failover costs."""

    def __init__(self, sender: Any, receiver: Any, channel: str) -> None:
        self.sender, self.receiver, self.channel = sender, receiver, channel
        self.received: list[tuple[float, int]] = []
        self.jobs: list[int] = []
        self.pushed: list[tuple[float, int]] = []
        self.stopped = False

    async def send(self) -> None:
        n = 0
        while not self.stopped:
            n += 1
            await self.sender.group_send("stream", {"type": "m", "n": n})
            # A push that fails (no master for a moment) is reported and counted, not raised.
            await self.sender.send("failover-jobs", {"type": "job", "n": n})
            self.pushed.append((time.monotonic(), n))
            await asyncio.sleep(0.01)

    async def receive(self) -> None:
        while True:
            message = await self.receiver.receive(self.channel)
            self.received.append((time.monotonic(), message["n"]))

    async def take_jobs(self) -> None:
        while True:
            message = await self.receiver.receive("failover-jobs")
            self.jobs.append(message["n"])

    def longest_gap(self, after: float) -> tuple[float, float]:
        """The longest pause in receipts after ``after``, and when it ended."""
        times = [at for at, _ in self.received]
        gaps = [(b - a, b) for a, b in itertools.pairwise(times) if b > after]
        return max(gaps, default=(float("inf"), float("inf")))


async def _through_a_failover(
    make_layer: Any, deployment: SentinelDeployment, fail_over: Any
) -> tuple[Stream, ErrorLog, ErrorLog, float]:
    sender_errors, receiver_errors = ErrorLog(), ErrorLog()
    sender = make_layer(**sentinel_config(deployment, on_error=sender_errors))
    receiver = make_layer(**sentinel_config(deployment, on_error=receiver_errors))
    channel = await receiver.new_channel()
    await receiver.group_add("stream", channel)
    await sender.new_channel()
    stream = Stream(sender, receiver, channel)
    tasks = [asyncio.create_task(job()) for job in (stream.send, stream.receive, stream.take_jobs)]
    try:
        await eventually_async(lambda: len(stream.received) >= 50, what="the stream flowing")
        started = time.monotonic()
        await asyncio.to_thread(fail_over)
        # Until the stream has flowed for a second past the failover.
        await eventually_async(
            lambda: (
                stream.received[-1][0] > time.monotonic() - 0.2
                and stream.received[-1][0] - started > 3
            ),
            timeout=30,
            what="relaying after the failover",
        )
        await asyncio.sleep(1)
        stream.stopped = True
        await asyncio.sleep(1)  # what is in flight arrives
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return stream, sender_errors, receiver_errors, started


def _check(stream: Stream, receiver_errors: ErrorLog, started: float, what: str) -> None:
    gap, resumed = stream.longest_gap(started)
    numbers = [n for _, n in stream.received]
    missing = {n for _, n in stream.pushed} - set(stream.jobs)
    print(
        f"{what}: relaying paused {gap:.2f} s; {len(numbers)} group messages received; "
        f"{len(stream.jobs)} of {len(stream.pushed)} worker items received"
    )
    assert gap < 10, f"relaying paused {gap:.2f} s"
    assert len(numbers) == len(set(numbers)), "a group message arrived twice"
    assert numbers == sorted(numbers)
    assert len(stream.jobs) == len(set(stream.jobs)), "a worker item was received twice"
    # Worker items go missing only while there is no master to push to (and the last
    # few a killed master had not passed on to its replica yet): none from before the
    # failover, none from after relaying resumed.
    outside = [
        n for at, n in stream.pushed if n in missing and not started - 0.5 < at < resumed + 0.5
    ]
    assert not outside, f"worker items lost outside the failover: {outside}"
    # One report per outage: the subscription's, and the worker channel's queue's.
    subscribe_reports = receiver_errors.of(Exception, "subscribe")
    assert 1 <= len(subscribe_reports) <= 2, receiver_errors.calls


async def test_a_killed_master_is_followed_to_the_promoted_replica(
    make_layer: Any, deployment: SentinelDeployment
) -> None:
    def kill() -> None:
        old = deployment.kill_master()
        deployment.wait_for_new_master(old)

    stream, sender_errors, receiver_errors, started = await _through_a_failover(
        make_layer, deployment, kill
    )
    _check(stream, receiver_errors, started, "master killed")
    # The sender's outages are one report each (relaying, and worker-channel pushes).
    assert len(sender_errors.of(Exception, "publish")) <= 2, sender_errors.calls


async def test_a_manual_failover_moves_every_connection_to_the_new_master(
    make_layer: Any, deployment: SentinelDeployment
) -> None:
    def fail_over() -> None:
        old = deployment.master_port()
        assert old is not None
        with redis.Redis(port=deployment.sentinels[0].port) as client:
            client.execute_command("SENTINEL", "FAILOVER", deployment.MASTER_NAME)
        deployment.wait_for_new_master(old)

    stream, sender_errors, receiver_errors, started = await _through_a_failover(
        make_layer, deployment, fail_over
    )
    _check(stream, receiver_errors, started, "manual failover")
    assert len(sender_errors.of(Exception, "publish")) <= 2, sender_errors.calls
    # Nothing of the layer's stays on the old master (which the sentinels turn into a
    # replica only some ten seconds later).
    port = deployment.master_port()
    old = next(server for server in deployment.servers if server.port != port)
    with redis.Redis(port=old.port) as client:
        names = [str(entry.get("name", "")) for entry in client.client_list()]
    assert not [name for name in names if name.startswith("crossws_channels:")], names


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"sentinels": []}, "sentinels"),
        ({"sentinels": ["nowhere"], "master_name": "m"}, "sentinels"),
        ({"sentinels": ["127.0.0.1:99999"], "master_name": "m"}, "sentinels"),
        ({"sentinels": ["127.0.0.1:26379"]}, "master_name"),
        ({"master_name": "m"}, "sentinels"),
        (
            {"sentinels": ["127.0.0.1:26379"], "master_name": "m", "url": "redis://x"},
            "url",
        ),
        (
            {"sentinels": ["127.0.0.1:26379"], "master_name": "m", "master_kwargs": {"port": 1}},
            "master_kwargs",
        ),
        (
            {"sentinels": ["127.0.0.1:26379"], "master_name": "m", "master_kwargs": {"bogus": 1}},
            "master_kwargs",
        ),
        ({"url": "redis://127.0.0.1", "sentinel_kwargs": {"password": "x"}}, "sentinel_kwargs"),
    ],
)
def test_bad_sentinel_settings_are_refused_naming_the_key(
    options: dict[str, Any], key: str
) -> None:
    from crossws_channels.layer import BackplaneChannelLayer

    with pytest.raises(ConfigurationError, match=rf"\['{key}'\]"):
        BackplaneChannelLayer(driver="redis", channel="bad-sentinel", **options)
