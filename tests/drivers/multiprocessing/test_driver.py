"""The multiprocessing driver against a real relay process (and real worker processes).

Every relay here is ``python -m crossws_channels.relay`` in its own process, on a socket
in a fresh private directory; faults are real signals to real processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crossws_channels.drivers.base import (
    SupportsBatch,
    SupportsDirect,
    SupportsFlush,
    SupportsWorkerQueue,
)
from crossws_channels.drivers.multiprocessing import MultiprocessingDriver, paths, wire
from crossws_channels.envelope import SyncMessage, encode_envelope, encode_frame
from crossws_channels.errors import ConfigurationError, RelayUnavailable
from tests.drivers.collector import Collector
from tests.drivers.listening import listen
from tests.drivers.multiprocessing.support import (
    ROOT,
    RelayProcess,
    child_env,
)
from tests.waiting import eventually_async

pytestmark = pytest.mark.slow

MakeDriver = Callable[..., Awaitable[tuple[MultiprocessingDriver, Collector]]]


class TimedCollector(Collector):
    """A collector that also notes when the driver said it was connected again."""

    def __init__(self) -> None:
        super().__init__()
        self.made_at: list[float] = []

    def connection_made(self) -> None:
        self.made_at.append(time.monotonic())
        super().connection_made()


@pytest.fixture
async def make_driver(channel: str, socket_dir: Path) -> AsyncIterator[MakeDriver]:
    """Builds subscribed drivers on the test's loop; closes them all afterwards."""
    made: list[MultiprocessingDriver] = []

    async def make(
        instance_id: str | None = None,
        *,
        channel_name: str | None = None,
        subscribe: bool = True,
        collector: Collector | None = None,
    ) -> tuple[MultiprocessingDriver, Collector]:
        driver = MultiprocessingDriver(
            instance_id or uuid.uuid4().hex[:12],
            {"channel": channel_name or channel, "socket_dir": str(socket_dir)},
        )
        made.append(driver)
        deliver = collector or Collector()
        if subscribe:
            await listen(driver, deliver)
        return driver, deliver

    yield make
    for driver in made:
        await asyncio.wait_for(driver.close(), 5)


def envelope(sender: str, topic: str, data: str | bytes = "x") -> str:
    return encode_envelope(sender, SyncMessage("", topic, data))


def future_deadline(seconds: float = 30.0) -> float:
    return time.time() + seconds


WORKER_SCRIPT = r"""
import asyncio, sys
from crossws_channels.drivers.multiprocessing import MultiprocessingDriver
from tests.drivers.listening import listen

class Deliver:
    def __call__(self, raw):
        print("message", raw.decode() if isinstance(raw, bytes) else raw, flush=True)
    def report(self, error, stage):
        pass
    def connection_lost(self, error):
        print("lost", flush=True)
    def connection_made(self):
        print("made", flush=True)

async def main(instance, channel, socket_dir, mode):
    driver = MultiprocessingDriver(instance, {"channel": channel, "socket_dir": socket_dir})
    await listen(driver, Deliver())
    if mode == "block":
        # A receive that stays pending in the relay until this process dies.
        task = asyncio.ensure_future(driver.queue_pop("jobs", 3600))
        await asyncio.sleep(0.3)
        print("ready", flush=True)
        await task
    elif mode == "consume":
        print("ready", flush=True)
        while True:
            item = await driver.queue_pop("jobs", 2.0)
            if item is None:
                break
            print("item", item, flush=True)
    elif mode == "listen":
        print("ready", flush=True)
        await asyncio.sleep(3600)
    await driver.close()

asyncio.run(main(*sys.argv[1:]))
"""


def start_worker(instance: str, channel: str, socket_dir: Path, mode: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT, instance, channel, str(socket_dir), mode],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(),
        cwd=ROOT,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        # Not communicate(): with a timeout it reads the pipe around what readline()
        # already buffered.
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        rest = process.stdout.read()
        process.stdout.close()
        raise RuntimeError(f"worker {instance} did not start: {line}{rest}")
    return process


# Options


def test_options_are_validated_at_construction(socket_dir: Path) -> None:
    """Bad options raise ConfigurationError naming the key, before anything is opened."""
    with pytest.raises(ConfigurationError) as unknown:
        MultiprocessingDriver("a", {"channel": "c", "sockets": "/tmp"})
    assert unknown.value.key == "sockets"
    with pytest.raises(ConfigurationError) as relative:
        MultiprocessingDriver("a", {"channel": "c", "socket_dir": "run/relay"})
    assert relative.value.key == "socket_dir"
    assert "absolute" in relative.value.message
    with pytest.raises(ConfigurationError) as wrong_type:
        MultiprocessingDriver("a", {"channel": "c", "socket_dir": 42})
    assert wrong_type.value.key == "socket_dir"
    with pytest.raises(ConfigurationError) as too_long:
        MultiprocessingDriver("a", {"channel": "c", "socket_dir": "/" + "d" * 120})
    assert too_long.value.key == "socket_dir"
    assert "103-byte" in too_long.value.message
    with pytest.raises(ConfigurationError) as no_channel:
        MultiprocessingDriver("a", {"channel": ""})
    assert no_channel.value.key == "channel"
    assert frozenset({"socket_dir"}) == MultiprocessingDriver.OPTIONS
    assert not socket_dir.joinpath(f"crossws_channels-{os.geteuid()}").exists()


def test_driver_declares_every_capability(socket_dir: Path) -> None:
    """The layer detects direct sends, batches, worker queues and flush on this driver."""
    driver = MultiprocessingDriver("a", {"channel": "c", "socket_dir": str(socket_dir)})
    for capability in (SupportsDirect, SupportsBatch, SupportsWorkerQueue, SupportsFlush):
        assert isinstance(driver, capability)


def test_socket_path_is_scoped_by_channel_and_user(socket_dir: Path) -> None:
    """Different channels get different sockets, in a directory named after the uid."""
    one = paths.socket_path("one", socket_dir)
    two = paths.socket_path("two", socket_dir)
    hostile = paths.socket_path("../../etc/passwd" + "x" * 300, socket_dir)
    assert one != two
    assert one.parent == two.parent == hostile.parent
    assert one.parent.name == f"crossws_channels-{os.geteuid()}"
    assert "/" not in hostile.name
    assert len(hostile.name) < 50


def test_docs_show_the_tested_gunicorn_config() -> None:
    """The driver page shows docs/examples/gunicorn.conf.py as it is (the e2e test runs it)."""
    example = (ROOT / "docs" / "examples" / "gunicorn.conf.py").read_text()
    code = example.split('"""', 2)[2].strip()
    page = (ROOT / "docs" / "drivers" / "multiprocessing.md").read_text()
    shown = page.split("## gunicorn", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert shown.strip() == code


# Wire format


def test_frame_reader_splits_a_stream_anywhere() -> None:
    """Frames come out whole whatever chunks the stream arrives in."""
    frames = [wire.message(b"a" * n) for n in (0, 1, 500, 70000)]
    stream = b"".join(frames)
    for step in (1, 3, 4, 5, 4096, len(stream)):
        reader = wire.FrameReader()
        out: list[bytes] = []
        for start in range(0, len(stream), step):
            out.extend(reader.feed(stream[start : start + step]))
        assert out == frames


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(1, 64), min_size=1))
def test_frame_reader_roundtrips_any_payload(payloads: list[bytes], cuts: list[int]) -> None:
    """Any bytes survive framing, cut into any chunk sizes."""
    frames = [wire.message(payload) for payload in payloads]
    stream = b"".join(frames)
    reader = wire.FrameReader()
    out: list[bytes] = []
    pos = 0
    index = 0
    while pos < len(stream):
        size = cuts[index % len(cuts)]
        out.extend(reader.feed(stream[pos : pos + size]))
        pos += size
        index += 1
    assert [frame[5:] for frame in out] == payloads


def test_frame_reader_rejects_bad_lengths() -> None:
    """A zero or oversized length prefix is a protocol error, not an allocation."""
    with pytest.raises(wire.ProtocolError):
        wire.FrameReader().feed(b"\x00\x00\x00\x00\x10")
    with pytest.raises(wire.ProtocolError):
        wire.FrameReader().feed(b"\xff\xff\xff\xff\x10")
    with pytest.raises(ValueError, match="exceeds"):
        wire.message(b"x" * wire.MAX_FRAME)


def test_frame_reader_honours_its_limit_and_count() -> None:
    """A frame past the reader's limit is refused at its length prefix; ``most`` stops
    after that many frames, keeping the rest for the next feed."""
    small = wire.FrameReader(limit=100)
    with pytest.raises(wire.ProtocolError):
        small.feed(struct.pack("!I", 101))
    reader = wire.FrameReader(limit=100)
    two = wire.message(b"a" * 10) + wire.message(b"b" * 200)
    assert [f[5:] for f in reader.feed(two, most=1)] == [b"a" * 10]
    reader.limit = wire.MAX_FRAME
    assert [f[5:] for f in reader.feed(b"")] == [b"b" * 200]


def raw_hello(channel: str, instance_id: str) -> bytes:
    return wire.hello(channel, instance_id, os.getpid())


def raw_exchange(path: Path, *chunks: bytes) -> bytes:
    """Connect to the relay as a bare socket, send ``chunks``, return what it answered
    until it closed the connection or went quiet for a second."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        got = b""
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.settimeout(1.0)
            while chunk := sock.recv(65536):
                got += chunk
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        return got


async def test_a_connection_may_send_only_a_small_frame_before_its_hello(
    relay: RelayProcess, make_driver: MakeDriver
) -> None:
    """A 1 MiB frame before any hello is a protocol error: the connection is dropped
    before the relay buffers it, and the relay serves the others as before."""
    a, _ = await make_driver("A")
    _b, seen_b = await make_driver("B")
    big = wire.message(b"x" * (1024 * 1024))
    answer = await asyncio.to_thread(raw_exchange, relay.path, big)
    assert answer == b""
    assert "protocol error: invalid frame length" in relay.output()
    await a.publish(envelope("A", "still relayed"))
    await seen_b.wait_for(lambda c: len(c.raw) == 1)


async def test_a_large_message_right_behind_the_hello_is_relayed(
    relay: RelayProcess, make_driver: MakeDriver
) -> None:
    """The small limit ends with the hello, even when the next frame came in the same read."""
    _b, seen_b = await make_driver("B")
    text = envelope("raw", "y" * (512 * 1024))
    answer = await asyncio.to_thread(
        raw_exchange,
        relay.path,
        raw_hello(relay.channel, "raw") + wire.message(text.encode()),
    )
    assert answer[4] == wire.WELCOME
    await seen_b.wait_for(lambda c: len(c.raw) == 1, timeout=10)
    assert len(seen_b.raw[0]) == len(text)


async def test_connections_past_the_limit_are_refused_and_counted(
    relay: RelayProcess, make_driver: MakeDriver
) -> None:
    """Past MAX_CONNECTIONS open connections the relay closes new ones at once, says so
    once, and the instances already connected keep relaying."""
    from crossws_channels.drivers.multiprocessing.relay import MAX_CONNECTIONS

    a, _ = await make_driver("A")
    _b, seen_b = await make_driver("B")
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS + 20):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(relay.path))
            held.append(sock)
        await eventually_async(
            lambda: "refusing connections" in relay.output(), what="the refusal logged"
        )
        assert relay.output().count("refusing connections") == 1
        await a.publish(envelope("A", "through"))
        await seen_b.wait_for(lambda c: len(c.raw) == 1)
    finally:
        for sock in held:
            sock.close()


# Relaying


async def test_broadcast_reaches_every_other_instance(
    relay: RelayProcess, make_driver: MakeDriver
) -> None:
    """A publish reaches every other instance once, binary and non-ASCII data intact."""
    a, seen_a = await make_driver("A")
    _b, seen_b = await make_driver("B")
    _c, seen_c = await make_driver("C")
    await a.publish(envelope("A", "room", b"\x00\xff\xfe binary"))
    await a.publish(envelope("A", "room", "héllo ✓ \U0001f600"))
    for seen in (seen_b, seen_c):
        await seen.wait_for(lambda c: len(c.raw) == 2)
        data = [e.msg.data for e in seen.envelopes]
        assert data == [b"\x00\xff\xfe binary", "héllo ✓ \U0001f600"]
    await asyncio.sleep(0.1)
    assert seen_a.raw == []  # the relay does not echo to the sender


async def test_direct_send_reaches_only_its_target(
    relay: RelayProcess, make_driver: MakeDriver
) -> None:
    """publish_to reaches the named instance only; an absent one is silently skipped."""
    a, seen_a = await make_driver("A")
    _b, seen_b = await make_driver("B")
    _c, seen_c = await make_driver("C")
    await a.publish_to("B", envelope("A", "specific.B!x", "for b"))
    await a.publish_to("nobody", envelope("A", "specific.nobody!x", "lost"))
    await seen_b.wait_for(lambda c: len(c.raw) == 1)
    assert seen_b.envelopes[0].msg.data == "for b"
    await a.publish(envelope("A", "marker"))
    await seen_c.wait_for(lambda c: len(c.raw) == 1)
    assert [e.msg.topic for e in seen_c.envelopes] == ["marker"]
    assert seen_a.raw == []


async def test_batch_keeps_order_and_targets(relay: RelayProcess, make_driver: MakeDriver) -> None:
    """One publish_batch mixes broadcasts and direct sends, in order, to the right places."""
    a, _ = await make_driver("A")
    _b, seen_b = await make_driver("B")
    _c, seen_c = await make_driver("C")
    batch: list[tuple[str | None, str]] = []
    for n in range(300):
        target = None if n % 3 else ("B" if n % 2 else "C")
        batch.append((target, envelope("A", "t", str(n))))
    await a.publish_batch(batch)
    expected_b = [str(n) for n in range(300) if n % 3 or n % 2]
    expected_c = [str(n) for n in range(300) if n % 3 or not n % 2]
    await seen_b.wait_for(lambda c: len(c.raw) == len(expected_b))
    await seen_c.wait_for(lambda c: len(c.raw) == len(expected_c))
    assert [e.msg.data for e in seen_b.envelopes] == expected_b
    assert [e.msg.data for e in seen_c.envelopes] == expected_c


async def test_large_message_is_relayed(relay: RelayProcess, make_driver: MakeDriver) -> None:
    """A multi-megabyte envelope crosses the relay intact."""
    a, _ = await make_driver("A")
    _b, seen_b = await make_driver("B")
    data = os.urandom(3 * 1024 * 1024)
    await a.publish(envelope("A", "big", data))
    await seen_b.wait_for(lambda c: len(c.raw) == 1, timeout=10)
    assert seen_b.envelopes[0].msg.data == data


# Worker queues


async def test_queue_items_go_to_exactly_one_popper(
    relay: RelayProcess, make_driver: MakeDriver
) -> None:
    """Two instances popping one queue concurrently receive each item exactly once."""
    a, _ = await make_driver("A")
    b, _ = await make_driver("B")
    c, _ = await make_driver("C")
    got: dict[str, list[str]] = {"B": [], "C": []}

    async def consume(name: str, driver: MultiprocessingDriver) -> None:
        while True:
            item = await driver.queue_pop("jobs", 0.5)
            if item is None:
                return
            got[name].append(item)

    consumers = [asyncio.ensure_future(consume("B", b)), asyncio.ensure_future(consume("C", c))]
    await asyncio.sleep(0.05)
    for n in range(400):
        assert await a.queue_push("jobs", f"job-{n}", 1000, future_deadline())
    await asyncio.gather(*consumers)
    everything = got["B"] + got["C"]
    assert sorted(everything) == sorted(f"job-{n}" for n in range(400))
    assert got["B"], "both poppers should have had a share"
    assert got["C"], "both poppers should have had a share"
    # Each popper sees its items in the order they were queued.
    for items in got.values():
        assert items == sorted(items, key=lambda item: int(item.split("-")[1]))


async def test_queue_exactly_once_across_processes(
    relay: RelayProcess, make_driver: MakeDriver, channel: str, socket_dir: Path
) -> None:
    """Two worker processes draining one queue receive each item exactly once."""
    workers = [start_worker(f"w{n}", channel, socket_dir, "consume") for n in range(2)]
    try:
        a, _ = await make_driver("A")
        for n in range(300):
            assert await a.queue_push("jobs", f"job-{n}", 1000, future_deadline())
        for worker in workers:
            await asyncio.to_thread(worker.wait, 30)
    finally:
        outputs = []
        for worker in workers:
            worker.kill()
            worker.wait()
            assert worker.stdout is not None
            outputs.append(worker.stdout.read())
            worker.stdout.close()
    items = [
        line.split(" ", 1)[1]
        for out in outputs
        for line in out.splitlines()
        if line.startswith("item ")
    ]
    assert sorted(items) == sorted(f"job-{n}" for n in range(300))
    assert all(out.count("item ") > 0 for out in outputs)


async def test_queue_capacity(relay: RelayProcess, make_driver: MakeDriver) -> None:
    """A push beyond capacity is refused; expired items don't count; a pop makes room."""
    a, _ = await make_driver("A")
    for n in range(3):
        assert await a.queue_push("jobs", f"j{n}", 3, future_deadline())
    assert not await a.queue_push("jobs", "j3", 3, future_deadline())
    assert await a.queue_push("other", "o", 3, future_deadline())
    assert await a.queue_pop("jobs", 0) == "j0"
    assert await a.queue_push("jobs", "j3", 3, future_deadline())
    # Items that expire free their room.
    assert await a.queue_push("short", "s0", 2, time.time() + 0.2)
    assert await a.queue_push("short", "s1", 2, time.time() + 0.2)
    assert not await a.queue_push("short", "s2", 2, future_deadline())
    await asyncio.sleep(0.3)
    assert await a.queue_push("short", "s2", 2, future_deadline())
    assert await a.queue_pop("short", 0) == "s2"


async def test_queue_expiry(relay: RelayProcess, make_driver: MakeDriver) -> None:
    """Items past their deadline are never handed out; a pop times out empty."""
    a, _ = await make_driver("A")
    b, _ = await make_driver("B")
    assert await a.queue_push("jobs", "old", 10, time.time() + 0.2)
    assert await a.queue_push("jobs", "stale", 10, time.time() - 1)
    await asyncio.sleep(0.3)
    started = time.monotonic()
    assert await b.queue_pop("jobs", 0.3) is None
    assert 0.25 < time.monotonic() - started < 2
    assert await b.queue_pop("jobs", 0) is None


async def test_pop_waits_for_a_push(relay: RelayProcess, make_driver: MakeDriver) -> None:
    """A pending pop receives an item pushed later, before its timeout."""
    a, _ = await make_driver("A")
    b, _ = await make_driver("B")
    waiting = asyncio.ensure_future(b.queue_pop("jobs", 10))
    await asyncio.sleep(0.1)
    assert await a.queue_push("jobs", "late", 10, future_deadline())
    assert await asyncio.wait_for(waiting, 5) == "late"


async def test_queue_return_puts_item_at_the_head(
    relay: RelayProcess, make_driver: MakeDriver
) -> None:
    """A returned item is the next one handed out, even when the queue is full."""
    a, _ = await make_driver("A")
    b, _ = await make_driver("B")
    item0 = encode_frame("A", SyncMessage("", "jobs", "zero"), expires=future_deadline())
    assert await a.queue_push("jobs", item0, 2, future_deadline())
    assert await a.queue_push("jobs", "one", 2, future_deadline())
    assert await b.queue_pop("jobs", 1) == item0
    assert await a.queue_push("jobs", "two", 2, future_deadline())
    await b.queue_return("jobs", item0)
    assert [await a.queue_pop("jobs", 1) for _ in range(3)] == [item0, "one", "two"]
    # A returned envelope keeps the deadline it carries.
    expired = encode_frame("A", SyncMessage("", "jobs", "late"), expires=time.time() - 1)
    await b.queue_return("jobs", expired)
    assert await a.queue_pop("jobs", 0.1) is None


async def test_cancelled_pop_loses_nothing(relay: RelayProcess, make_driver: MakeDriver) -> None:
    """An item already on its way to a cancelled pop goes back to the queue."""
    a, _ = await make_driver("A")
    b, _ = await make_driver("B")
    pending = asyncio.ensure_future(b.queue_pop("jobs", 30))
    await asyncio.sleep(0.1)
    # Hold B's incoming bytes so the item is in flight when the pop is cancelled.
    conn = b._conn
    assert conn is not None
    assert conn.transport is not None
    conn.transport.pause_reading()
    assert await a.queue_push("jobs", "in-flight", 10, future_deadline())
    await asyncio.sleep(0.1)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    conn.transport.resume_reading()
    assert await a.queue_pop("jobs", 2) == "in-flight"
    # And a pop cancelled while still waiting leaves nothing behind in the relay.
    idle = asyncio.ensure_future(b.queue_pop("jobs", 30))
    await asyncio.sleep(0.1)
    idle.cancel()
    with pytest.raises(asyncio.CancelledError):
        await idle
    assert await a.queue_push("jobs", "next", 10, future_deadline())
    assert await a.queue_pop("jobs", 1) == "next"


async def test_flush_empties_the_queues(relay: RelayProcess, make_driver: MakeDriver) -> None:
    """flush() deletes every queued item of the cluster."""
    a, _ = await make_driver("A")
    b, _ = await make_driver("B")
    assert await a.queue_push("one", "x", 10, future_deadline())
    assert await a.queue_push("two", "y", 10, future_deadline())
    await b.flush()
    assert await a.queue_pop("one", 0) is None
    assert await a.queue_pop("two", 0) is None


# Faults


async def test_killed_worker_does_not_disturb_the_others(
    relay: RelayProcess, make_driver: MakeDriver, channel: str, socket_dir: Path
) -> None:
    """A SIGKILLed worker's pending pop is dropped; the others keep relaying and popping."""
    dead = start_worker("doomed", channel, socket_dir, "block")
    a, seen_a = await make_driver("A")
    b, seen_b = await make_driver("B")
    # B waits behind the doomed worker: if the relay kept the dead pop, B would starve.
    waiting = asyncio.ensure_future(b.queue_pop("jobs", 10))
    await asyncio.sleep(0.1)
    dead.kill()
    dead.wait()
    assert dead.stdout is not None
    dead.stdout.close()
    await asyncio.sleep(0.2)
    assert await a.queue_push("jobs", "survivor", 10, future_deadline())
    assert await asyncio.wait_for(waiting, 5) == "survivor"
    await a.publish(envelope("A", "room", "still here"))
    await a.publish_to("doomed", envelope("A", "specific.doomed!x", "gone"))
    await seen_b.wait_for(lambda c: len(c.raw) == 1)
    assert seen_a.lost == []
    assert seen_b.lost == []
    assert "instance 'doomed' (pid" in relay.output()
    assert "left" in relay.output()


async def test_one_instance_id_in_two_processes_is_refused(
    relay: RelayProcess, make_driver: MakeDriver, channel: str, socket_dir: Path
) -> None:
    """A second process claiming a connected instance's id is refused with the reason."""
    _a, seen_a = await make_driver("shared")
    with pytest.raises(RuntimeError, match="already connected from pid") as refused:
        start_worker("shared", channel, socket_dir, "listen")
    assert "RelayUnavailable" in str(refused.value)
    assert "forked" in str(refused.value)
    assert seen_a.lost == []


async def test_relay_restart_is_rejoined_within_two_seconds(
    relay: RelayProcess, make_driver: MakeDriver
) -> None:
    """After a relay restart every instance rejoins within 2 s, reporting the outage once."""
    a, seen_a = await make_driver("A", collector=TimedCollector())
    _b, seen_b = await make_driver("B", collector=TimedCollector())
    assert isinstance(seen_a, TimedCollector)
    assert isinstance(seen_b, TimedCollector)
    assert await asyncio.to_thread(relay.stop) == 0
    await seen_a.wait_for(lambda c: len(c.lost) == 1)
    await seen_b.wait_for(lambda c: len(c.lost) == 1)
    # While the relay is down, sends fail fast (the layer reports them) and a pop waits.
    with pytest.raises(RelayUnavailable):
        await a.publish(envelope("A", "room"))
    assert await a.queue_pop("jobs", 0.2) is None
    await asyncio.sleep(1.0)  # many reconnection attempts fail meanwhile
    ready_at = await asyncio.to_thread(relay.start)
    await seen_a.wait_for(lambda c: c.made == 1, timeout=2.0)
    await seen_b.wait_for(lambda c: c.made == 1, timeout=2.0)
    rejoin = max(seen_a.made_at[0], seen_b.made_at[0]) - ready_at
    print(f"rejoined {rejoin:.3f} s after the relay listened again")
    assert rejoin < 2.0
    assert len(seen_a.lost) == len(seen_b.lost) == 1
    assert isinstance(seen_a.lost[0], RelayUnavailable)
    await a.publish(envelope("A", "room", "after"))
    await seen_b.wait_for(lambda c: len(c.raw) == 1)


async def test_relay_crash_leaves_a_stale_socket_that_the_next_relay_replaces(
    relay: RelayProcess, make_driver: MakeDriver, channel: str, socket_dir: Path
) -> None:
    """A SIGKILLed relay's socket is reported as stale, then replaced by the next relay."""
    _a, seen_a = await make_driver("A", collector=TimedCollector())
    assert isinstance(seen_a, TimedCollector)
    await asyncio.to_thread(relay.kill)
    await seen_a.wait_for(lambda c: len(c.lost) == 1)
    assert relay.path.exists()
    late = MultiprocessingDriver("late", {"channel": channel, "socket_dir": str(socket_dir)})
    with pytest.raises(RelayUnavailable, match="stale"):
        await listen(late, Collector())
    await late.close()
    ready_at = await asyncio.to_thread(relay.start)
    assert "removing the stale socket" in relay.output()
    await seen_a.wait_for(lambda c: c.made == 1, timeout=2.0)
    print(f"rejoined {seen_a.made_at[0] - ready_at:.3f} s after a crashed relay was replaced")


async def test_pop_resumes_after_relay_restart(
    relay: RelayProcess, make_driver: MakeDriver
) -> None:
    """A pop in progress when the relay restarts keeps waiting and gets a later item."""
    a, seen_a = await make_driver("A")
    b, seen_b = await make_driver("B")
    waiting = asyncio.ensure_future(b.queue_pop("jobs", 10))
    await asyncio.sleep(0.1)
    await asyncio.to_thread(relay.stop)
    await asyncio.to_thread(relay.start)
    await seen_a.wait_for(lambda c: c.made == 1, timeout=2.0)
    await seen_b.wait_for(lambda c: c.made == 1, timeout=2.0)
    assert await a.queue_push("jobs", "after restart", 10, future_deadline())
    assert await asyncio.wait_for(waiting, 5) == "after restart"


async def test_no_relay_fails_loudly_at_subscribe(make_driver: MakeDriver, channel: str) -> None:
    """Without a relay, subscribe raises RelayUnavailable saying how to start one."""
    with pytest.raises(RelayUnavailable) as missing:
        await make_driver("A")
    message = str(missing.value)
    assert "setup_primary()" in message
    assert f"python -m crossws_channels.relay --channel {channel}" in message
    assert "--socket-dir" in message


async def test_hostile_client_is_dropped_alone(
    relay: RelayProcess, make_driver: MakeDriver
) -> None:
    """Garbage, a bogus length or a wrong channel gets one connection dropped, nothing else."""
    a, _ = await make_driver("A")
    _b, seen_b = await make_driver("B")
    for payload in (
        b"\xff\xff\xff\xff\x10",  # a 4 GiB frame
        wire.message(b"no hello first"),
        wire.hello("another-channel", "intruder", 1),
        wire.hello(relay.channel, "ok", 1) + b"\x00\x00\x00\x01\x7f",  # unknown operation
    ):
        reader, writer = await asyncio.open_unix_connection(str(relay.path))
        writer.write(payload)
        data = await asyncio.wait_for(reader.read(), 5)
        assert data == b"" or data[4] in (wire.REFUSED, wire.WELCOME)
        writer.close()
        await writer.wait_closed()
    await a.publish(envelope("A", "room", "fine"))
    await seen_b.wait_for(lambda c: len(c.raw) == 1)
    assert "protocol error" in relay.output()
    assert "this relay serves channel" in relay.output()


# Scope and privacy


async def test_clusters_with_different_channels_never_bridge(
    socket_dir: Path, tmp_path: Path, make_driver: MakeDriver, channel: str
) -> None:
    """Two relays on one host, one per channel: traffic and queues stay in their cluster."""
    other = f"{channel}-other"
    with RelayProcess(channel, socket_dir, tmp_path), RelayProcess(other, socket_dir, tmp_path):
        a, _ = await make_driver("A")
        _b, seen_b = await make_driver("B")
        x, _ = await make_driver("X", channel_name=other)
        _y, seen_y = await make_driver("Y", channel_name=other)
        await a.publish(envelope("A", "room", "first cluster"))
        await a.publish_to("Y", envelope("A", "specific.Y!x", "direct"))
        assert await a.queue_push("jobs", "job", 10, future_deadline())
        await seen_b.wait_for(lambda c: len(c.raw) == 1)
        assert await x.queue_pop("jobs", 0.2) is None
        await asyncio.sleep(0.1)
        assert seen_y.raw == []


async def test_relay_directory_and_socket_are_private(relay: RelayProcess) -> None:
    """The relay's directory is 0700 and its socket and lock file 0600, owned by the user."""
    directory = relay.path.parent
    for path, mode in (
        (directory, 0o700),
        (relay.path, 0o600),
        (paths.lock_path(relay.channel, relay.socket_dir), 0o600),
    ):
        info = os.lstat(path)
        assert stat.S_IMODE(info.st_mode) == mode, path
        assert info.st_uid == os.geteuid()
    assert stat.S_ISSOCK(os.lstat(relay.path).st_mode)


def test_relay_refuses_a_directory_that_is_not_private(socket_dir: Path, channel: str) -> None:
    """The relay won't start in a private directory others can read or that isn't ours."""
    directory = paths.private_dir(socket_dir)
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    command = RelayProcess(channel, socket_dir, socket_dir).command()
    result = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=30)
    assert result.returncode == 1
    assert "must be private (0700)" in result.stderr
    if os.geteuid() == 0:
        os.chmod(directory, 0o700)
        shutil.chown(directory, "nobody")
        result = subprocess.run(
            command, capture_output=True, text=True, env=child_env(), timeout=30
        )
        assert result.returncode == 1
        assert "belongs to uid" in result.stderr


async def test_driver_refuses_a_directory_that_is_not_private(
    relay: RelayProcess, make_driver: MakeDriver
) -> None:
    """A driver will not talk through a relay directory others could tamper with."""
    directory = relay.path.parent
    os.chmod(directory, 0o755)
    try:
        with pytest.raises(RelayUnavailable, match="must be private"):
            await make_driver("A")
    finally:
        os.chmod(directory, 0o700)
    await make_driver("B")


INTRUDER_SCRIPT = r"""
import socket, struct, sys
path, channel = sys.argv[1], sys.argv[2].encode()
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(path)
except PermissionError:
    print("EACCES")
    sys.exit(0)
iid = b"intruder"
body = struct.pack("!HI", 1, 0) + struct.pack("!H", len(channel)) + channel + iid
env = b'{"id":"intruder","msg":{"namespace":"","topic":"room","binary":false,"data":"x"}}'
data = b""
try:
    sock.sendall(struct.pack("!IB", len(body) + 1, 0x01) + body)
    sock.sendall(struct.pack("!IB", len(env) + 1, 0x10) + env)
    sock.settimeout(5)
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
except (BrokenPipeError, ConnectionResetError):
    pass
print("WELCOMED" if len(data) > 4 and data[4] == 0x02 else "REFUSED")
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None, reason="needs root")
async def test_another_user_cannot_connect_or_inject(
    relay: RelayProcess, make_driver: MakeDriver
) -> None:
    """Another uid is kept out by the 0700 directory, and by SO_PEERCRED if that fails."""
    _a, seen_a = await make_driver("A")
    command = [
        "runuser",
        "-u",
        "nobody",
        "--",
        "/usr/bin/python3",
        "-c",
        INTRUDER_SCRIPT,
        str(relay.path),
        relay.channel,
    ]

    def intrude() -> str:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        return result.stdout.strip() or result.stderr

    assert await asyncio.to_thread(intrude) == "EACCES"
    # Open the permissions up, as a careless operator might: the relay still refuses.
    os.chmod(relay.socket_dir, 0o755)
    os.chmod(relay.path.parent, 0o755)
    os.chmod(relay.path, 0o666)
    try:
        assert await asyncio.to_thread(intrude) == "REFUSED"
    finally:
        os.chmod(relay.path.parent, 0o700)
        os.chmod(relay.path, 0o600)
    assert "refused a connection from pid" in relay.output()
    await asyncio.sleep(0.2)
    assert seen_a.raw == []


# The relay process


def test_second_relay_for_a_channel_refuses_to_start(relay: RelayProcess) -> None:
    """While a relay serves a channel, another one exits with status 3, touching nothing."""
    result = subprocess.run(
        relay.command(), capture_output=True, text=True, env=child_env(), timeout=30
    )
    assert result.returncode == 3
    assert f"already running (pid {relay.pid})" in result.stderr
    assert relay.process is not None
    assert relay.process.poll() is None
    assert relay.path.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_relay_stops_cleanly_on_signals(
    relay: RelayProcess, make_driver: MakeDriver, signum: int
) -> None:
    """SIGTERM and SIGINT stop the relay with status 0; it removes its socket."""
    _a, seen_a = await make_driver("A")
    assert await asyncio.to_thread(relay.stop, signum) == 0
    assert not relay.path.exists()
    await seen_a.wait_for(lambda c: len(c.lost) == 1)
    assert "Traceback" not in relay.output()


def test_driver_on_a_new_loop_after_close_leaks_nothing(
    relay: RelayProcess, channel: str, socket_dir: Path
) -> None:
    """Drivers built and closed on successive loops leave no socket, task or fd behind."""
    options = {"channel": channel, "socket_dir": str(socket_dir)}

    async def cycle(n: int) -> None:
        driver = MultiprocessingDriver(f"loop{n}", options)
        seen = Collector()
        await listen(driver, seen)
        await driver.publish(envelope(f"loop{n}", "room"))
        waiting = asyncio.ensure_future(driver.queue_pop("jobs", 30))
        await asyncio.sleep(0.01)
        waiting.cancel()
        await driver.close()
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(cycle(0))
    before = len(os.listdir("/proc/self/fd"))
    for n in range(1, 6):
        asyncio.run(cycle(n))
    assert len(os.listdir("/proc/self/fd")) <= before


async def test_driver_refuses_a_second_loop(relay: RelayProcess, make_driver: MakeDriver) -> None:
    """Using a driver from a loop other than its own is a clear error, not a hang."""
    a, seen = await make_driver("A")

    def elsewhere() -> None:
        asyncio.run(a.queue_pop("jobs", 0))

    # Without a live connection every call goes through the check.
    conn = a._conn
    assert conn is not None
    conn.abort()
    await seen.wait_for(lambda c: len(c.lost) == 1)
    with pytest.raises(RuntimeError, match="bound to the event loop"):
        await asyncio.to_thread(elsewhere)


# setup_primary


PRIMARY_SCRIPT = r"""
import asyncio, json, os, subprocess, sys, time
channel, socket_dir, mode = sys.argv[1:4]
starts = []
_Popen = subprocess.Popen
class CountingPopen(_Popen):
    def __init__(self, args, *rest, **kwargs):
        if "crossws_channels.relay" in args:
            starts.append(os.getpid())
        super().__init__(args, *rest, **kwargs)
subprocess.Popen = CountingPopen

from crossws_channels.drivers.multiprocessing import MultiprocessingDriver, setup_primary
from tests.drivers.listening import listen

async def exchange(name):
    driver = MultiprocessingDriver(name, {"channel": channel, "socket_dir": socket_dir})
    class Deliver:
        def __call__(self, raw): pass
        def report(self, error, stage): pass
        def connection_lost(self, error): pass
        def connection_made(self): pass
    await listen(driver, Deliver())
    ok = await driver.queue_push("jobs", name, 10, time.time() + 30)
    await driver.close()
    return ok

if mode == "settings":
    setup_primary()
else:
    setup_primary(channel, socket_dir=socket_dir)
setup_primary(channel, socket_dir=socket_dir)
children = []
for n in range(2):
    pid = os.fork()
    if pid == 0:
        setup_primary(channel, socket_dir=socket_dir)
        ok = asyncio.run(exchange(f"child{n}"))
        # One write per line: forked children share stdout.
        os.write(1, (json.dumps({"child": n, "ok": ok, "starts": len(starts)}) + "\n").encode())
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
print(json.dumps({"primary": True, "starts": len(starts)}), flush=True)
if mode == "linger":
    time.sleep(3600)
"""


def run_primary(channel: str, socket_dir: Path, mode: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PRIMARY_SCRIPT, channel, str(socket_dir), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(**env),
        cwd="/",
    )


def relay_pid(channel: str, socket_dir: Path) -> int:
    return int(paths.lock_path(channel, socket_dir).read_text().strip())


def wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        status = Path(f"/proc/{pid}/status").read_text() if Path(f"/proc/{pid}").exists() else ""
        if "zombie" in status:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still runs after {timeout}s")
        time.sleep(0.05)


def test_setup_primary_starts_one_relay_for_the_primary_and_its_forks(
    socket_dir: Path, channel: str
) -> None:
    """setup_primary starts one relay, is a no-op again and in forks, stops at exit."""
    primary = run_primary(channel, socket_dir, "plain")
    out, err = primary.communicate(timeout=60)
    assert primary.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    children = [line for line in lines if "child" in line]
    assert len(children) == 2, out + err
    assert all(c["ok"] for c in children), out + err
    assert all(line["starts"] == 1 for line in lines), out
    assert "started the relay" not in err or err.count("listening on") == 1
    # The primary has exited: its relay stopped and removed its socket.
    pid = relay_pid(channel, socket_dir)
    wait_gone(pid)
    assert not paths.socket_path(channel, socket_dir).exists()


def test_setup_primary_relay_stops_when_the_primary_is_killed(
    socket_dir: Path, channel: str
) -> None:
    """The relay notices a SIGKILLed primary and shuts down cleanly within a second."""
    primary = run_primary(channel, socket_dir, "linger")
    try:
        assert primary.stdout is not None
        for _ in range(3):
            line = json.loads(primary.stdout.readline())
        assert line.get("primary"), line
        pid = relay_pid(channel, socket_dir)
        assert Path(f"/proc/{pid}").exists()
        primary.kill()
        primary.wait()
        started = time.monotonic()
        wait_gone(pid, timeout=3)
        print(f"relay exited {time.monotonic() - started:.2f} s after its primary died")
    finally:
        primary.kill()
        primary.communicate()
    assert not paths.socket_path(channel, socket_dir).exists()


def test_setup_primary_uses_a_running_relay(
    relay: RelayProcess, socket_dir: Path, channel: str
) -> None:
    """With a standalone relay already serving the channel, setup_primary starts none."""
    primary = run_primary(channel, socket_dir, "plain")
    out, err = primary.communicate(timeout=60)
    assert primary.returncode == 0, err
    assert "already running" in err
    assert relay.process is not None
    assert relay.process.poll() is None
    assert all(json.loads(line).get("ok", True) for line in out.splitlines())


def test_setup_primary_reads_channel_layers(socket_dir: Path, channel: str) -> None:
    """Without arguments, setup_primary serves every multiprocessing layer in settings."""
    primary = run_primary(
        channel,
        socket_dir,
        "settings",
        DJANGO_SETTINGS_MODULE="testproject.settings",
        CROSSWS_DRIVER="multiprocessing",
        CROSSWS_CHANNEL=channel,
        CROSSWS_OPTIONS=json.dumps({"socket_dir": str(socket_dir)}),
    )
    out, err = primary.communicate(timeout=60)
    assert primary.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert all(line.get("ok", True) and line["starts"] == 1 for line in lines), out + err


def test_setup_primary_without_multiprocessing_layers_is_an_error(settings: Any) -> None:
    """setup_primary() with no multiprocessing layer configured says so."""
    from crossws_channels.drivers.multiprocessing import setup_primary

    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "crossws_channels.layer.BackplaneChannelLayer",
            "CONFIG": {"driver": "local", "channel": "c"},
        }
    }
    with pytest.raises(ConfigurationError, match="no layer in CHANNEL_LAYERS"):
        setup_primary()


def test_setup_primary_reports_a_relay_that_cannot_start(socket_dir: Path, channel: str) -> None:
    """A relay that can't start makes setup_primary raise with the reason."""
    from crossws_channels.drivers.multiprocessing import setup_primary

    directory = paths.private_dir(socket_dir)
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    with pytest.raises(RelayUnavailable, match="must be private"):
        setup_primary(channel, socket_dir=socket_dir)


def test_setup_primary_is_a_no_op_in_a_spawned_child(
    socket_dir: Path, channel: str, tmp_path: Path
) -> None:
    """A multiprocessing child (spawn, as uvicorn --workers uses) starts no relay."""
    script = tmp_path / "spawner.py"
    script.write_text(
        "import multiprocessing, sys\n"
        "from crossws_channels.drivers.multiprocessing import setup_primary\n"
        "def child(channel, socket_dir):\n"
        "    setup_primary(channel, socket_dir=socket_dir)\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    p = ctx.Process(target=child, args=(sys.argv[1], sys.argv[2]))\n"
        "    p.start(); p.join(); sys.exit(p.exitcode)\n"
    )
    result = subprocess.run(
        [sys.executable, str(script), channel, str(socket_dir)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert not paths.lock_path(channel, socket_dir).exists()


# The default socket directory


def test_the_default_socket_dir_is_the_users_runtime_dir_when_private(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tempfile

    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    os.chmod(runtime, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert paths.default_socket_dir() == runtime
    os.chmod(runtime, 0o755)  # not private: as if unset
    assert paths.default_socket_dir() == Path(tempfile.gettempdir())
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    assert paths.default_socket_dir() == Path(tempfile.gettempdir())
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")
    assert paths.default_socket_dir() == Path(tempfile.gettempdir())


async def test_a_relay_and_layers_meet_in_the_runtime_dir_without_socket_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A relay process started with only ``--channel`` and layers configured with only
    ``channel`` find each other in ``$XDG_RUNTIME_DIR``; nothing goes to /tmp."""
    import tempfile

    from crossws_channels.layer import BackplaneChannelLayer

    runtime = Path(tempfile.mkdtemp(prefix="xdg-", dir="/tmp"))
    os.chmod(runtime, 0o700)
    channel = f"xdg-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    relay = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "crossws_channels.relay",
        "--channel",
        channel,
        env=child_env(XDG_RUNTIME_DIR=str(runtime)),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    layers: list[BackplaneChannelLayer] = []
    try:
        socket_file = paths.socket_path(channel, runtime)
        await eventually_async(socket_file.exists, what="the relay's socket in the runtime dir")
        assert not paths.socket_path(channel, Path(tempfile.gettempdir())).exists()
        layers = [
            BackplaneChannelLayer(driver="multiprocessing", channel=channel) for _ in range(2)
        ]
        member = await layers[1].new_channel()
        await layers[1].group_add("room", member)
        await layers[0].new_channel()
        await layers[0].group_send("room", {"type": "hello"})
        assert (await asyncio.wait_for(layers[1].receive(member), 5))["type"] == "hello"
    finally:
        for layer in layers:
            await layer.close()
        relay.terminate()
        await asyncio.wait_for(relay.wait(), 10)
        shutil.rmtree(runtime, ignore_errors=True)
