"""Worker channels on the nats driver: pipelined pushes and batched pulls keep every
promise of an awaited push and a single pull (see crossws_channels.drivers.nats.pushing
and .pulling), on the shared NATS server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from channels.exceptions import ChannelFull

from crossws_channels.drivers.nats.pulling import PULL_EXPIRES
from tests.conftest import ErrorLog
from tests.drivers.nats.support import drop_streams_async

CAPACITY = 20  # pipelined (at least PIPELINE_FROM): the first half without waiting


async def _drain(layer: Any, channel: str, quiet: float = 1.5) -> list[int]:
    got = []
    while True:
        try:
            got.append((await asyncio.wait_for(layer.receive(channel), quiet))["n"])
        except asyncio.TimeoutError:
            return got


async def test_pushes_the_server_refused_after_send_returned_are_pushed_again(
    nats_url: str, make_layer: Any
) -> None:
    """Three senders each count the same room in the channel: together they overrun its
    capacity, the server refuses the excess, and every message send accepted still
    arrives, once; meanwhile a sender holding refused ones raises ChannelFull."""
    config = {"driver": "nats", "url": nats_url, "capacity": CAPACITY}
    errors = ErrorLog()
    senders = [make_layer(**config, on_error=errors) for _ in range(3)]
    receiver = make_layer(**config)
    accepted: list[int] = []
    # One message each first: each sender looks at the stream, nearly empty.
    for index, sender in enumerate(senders):
        await sender.send("overrun", {"type": "job", "n": index})
        accepted.append(index)

    async def burst(index: int, sender: Any) -> int:
        refused = 0
        for k in range(30):
            n = 100 * (index + 1) + k
            try:
                await sender.send("overrun", {"type": "job", "n": n})
            except ChannelFull:
                refused += 1
            else:
                accepted.append(n)
            # Time for acknowledgements (and refusals) to come back between sends.
            await asyncio.sleep(0.002)
        return refused

    refused = await asyncio.gather(*(burst(i, s) for i, s in enumerate(senders)))
    assert len(accepted) > CAPACITY, "the senders did not overrun the channel"
    assert sum(refused) > 0, "no sender noticed the channel was full"
    got = await _drain(receiver, "overrun")
    assert sorted(got) == sorted(accepted), "a message send accepted was lost or doubled"
    assert errors.calls == []
    await drop_streams_async(nats_url, receiver.config.channel)


async def test_a_receiver_that_stops_hands_back_what_it_pulled(
    nats_url: str, make_layer: Any
) -> None:
    """What one instance pulled ahead and did not receive goes to another instance
    within a fraction of a second, not after JetStream's acknowledgement wait (10 s)."""
    config = {"driver": "nats", "url": nats_url, "capacity": 100}
    sender, first, second = (make_layer(**config) for _ in range(3))
    for n in range(40):
        await sender.send("handback", {"type": "job", "n": n})
    taken = (await asyncio.wait_for(first.receive("handback"), 5))["n"]
    started = time.monotonic()
    got = await _drain(second, "handback", quiet=PULL_EXPIRES + 1)
    late = time.monotonic() - started
    held = await _drain(first, "handback", quiet=0.5)  # acknowledged ahead of a receive
    assert sorted([taken, *got, *held]) == list(range(40))
    assert len(got) >= 40 - 1 - 16, "the first instance kept more than one acknowledged batch"
    assert late < 5, f"the second instance waited {late:.1f} s for the messages"
    await drop_streams_async(nats_url, sender.config.channel)


async def test_a_burst_is_stored_by_the_time_the_layer_closes(
    nats_url: str, make_layer: Any
) -> None:
    """send in a burst returns before JetStream confirms; close waits for the rest."""
    config = {"driver": "nats", "url": nats_url, "capacity": 1000}
    sender = make_layer(**config)
    for n in range(300):
        await sender.send("tail", {"type": "job", "n": n})
    await sender.close()
    receiver = make_layer(**config)
    assert sorted(await _drain(receiver, "tail")) == list(range(300))
    await drop_streams_async(nats_url, receiver.config.channel)


async def test_a_receiver_of_a_channel_never_sent_to_looks_again_soon(nats_url: str) -> None:
    """No stream yet: a pop returns after a short wait rather than its whole timeout, so a
    worker started before anything was sent picks up the first message at once."""
    from crossws_channels.drivers.nats import NatsDriver

    driver = NatsDriver("absent12345", {"channel": f"absent-{time.time_ns()}", "url": nats_url})
    try:
        started = time.monotonic()
        assert await driver.queue_pop("never-sent", 5.0) is None
        assert time.monotonic() - started < 2.5
    finally:
        await driver.close()
