"""Measuring what a failover costs the redis driver (Sentinel, Redis Cluster): a stream
of group messages and worker-channel items through it, and what it must keep."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

from tests.conftest import ErrorLog
from tests.waiting import eventually_async

__all__ = ["Stream", "check_failover", "through_a_failover"]


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


async def through_a_failover(
    make_layer: Any, config: dict[str, Any], fail_over: Callable[[], None]
) -> tuple[Stream, ErrorLog, ErrorLog, float]:
    """Stream between two layers of ``config``, run ``fail_over`` (in a thread) once it
    flows, and go on until relaying has resumed; the stream, the sender's and the
    receiver's reports, and when the failover started."""
    sender_errors, receiver_errors = ErrorLog(), ErrorLog()
    sender = make_layer(**config, on_error=sender_errors)
    receiver = make_layer(**config, on_error=receiver_errors)
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


def check_failover(stream: Stream, receiver_errors: ErrorLog, started: float, what: str) -> None:
    """What every failover must keep: a pause of seconds, nothing twice, order, no worker
    item lost outside the failover, one report per outage."""
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
