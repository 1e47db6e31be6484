"""The nats driver's protocol reader (crossws_channels.drivers.nats.reader) and the inlet
its relay subscriptions deliver to: what nats-py's parser would hand over, the same,
whatever the reads cut; the rest still nats-py's."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from typing import Any

import pytest
from nats.errors import ProtocolError

from crossws_channels.drivers.nats import inlet as inlet_module
from crossws_channels.drivers.nats.inlet import Inlet
from crossws_channels.drivers.nats.reader import Client, Reader, subscribe

Received = list[tuple[bytes, bytes, bytes, "dict[str, str] | None"]]


def _recorder(into: Received) -> Any:
    def handler(subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None) -> None:
        into.append((subject, reply, data, headers))

    return handler


async def _client(url: str) -> Client:
    client = Client()
    await client.connect(url, connect_timeout=5, allow_reconnect=False)
    return client


async def test_messages_of_every_size_reach_the_handler_in_order_and_intact(
    nats_url: str,
) -> None:
    """From a plain nats-py publisher: small, large (many socket reads each) and with
    headers, interleaved; every one arrives once, in order, byte for byte."""
    import nats

    subject = f"reader.{uuid.uuid4().hex}"
    reader, publisher = await _client(nats_url), await nats.connect(nats_url)
    got: Received = []
    try:
        subscription = await subscribe(reader, subject, _recorder(got))
        await reader.flush()
        rng = random.Random(7)
        sent = []
        for n in range(300):
            size = rng.choice((0, 1, 100, 5_000, 40_000, 300_000, 900_000))
            data = rng.randbytes(size)
            headers = {"N": str(n)} if n % 3 == 0 else None
            await publisher.publish(
                subject, data, reply=f"r.{n}" if n % 5 == 0 else "", headers=headers
            )
            sent.append((data, headers, n))
        await publisher.flush()
        for _ in range(200):
            if len(got) == len(sent):
                break
            await asyncio.sleep(0.05)
        assert len(got) == len(sent)
        for (subj, reply, data, headers), (data_sent, headers_sent, n) in zip(
            got, sent, strict=True
        ):
            assert subj == subject.encode()
            assert reply == (f"r.{n}".encode() if n % 5 == 0 else b"")
            assert data == data_sent
            assert (headers or None) == headers_sent
        assert reader.stats["in_msgs"] >= len(sent)
        await subscription.unsubscribe()
        assert not reader.handlers
    finally:
        await publisher.close()
        await reader.close()


async def test_post_writes_what_publish_would_and_leaves_the_rest_to_it(nats_url: str) -> None:
    subject = f"reader.{uuid.uuid4().hex}"
    writer, reader = await _client(nats_url), await _client(nats_url)
    got: Received = []
    try:
        await subscribe(reader, subject, _recorder(got))
        await reader.flush()
        assert all(writer.post(subject.encode(), b"m%d" % n) for n in range(1000))
        # Over max_payload: not posted, for publish to refuse (or the driver to split).
        assert not writer.post(subject.encode(), b"x" * (writer.max_payload + 1))
        await writer.flush()
        for _ in range(100):
            if len(got) == 1000:
                break
            await asyncio.sleep(0.05)
        assert [data for _, _, data, _ in got] == [b"m%d" % n for n in range(1000)]
        await writer.close()
        assert not writer.post(subject.encode(), b"closed")
    finally:
        await writer.close()
        await reader.close()


def _frames() -> tuple[bytes, Received]:
    """A stream of server traffic, and the messages of sid 7 in it."""
    expected: Received = []
    parts = []
    for n in range(50):
        data = bytes([n]) * (n * 37)
        if n % 4 == 0:
            parts.append(b"MSG a.b 7 %d\r\n%s\r\n" % (len(data), data))
            expected.append((b"a.b", b"", data, None))
        elif n % 4 == 1:
            parts.append(b"MSG a.c 7 in.%d %d\r\n%s\r\n" % (n, len(data), data))
            expected.append((b"a.c", b"in.%d" % n, data, None))
        elif n % 4 == 2:
            header = b"NATS/1.0\r\nK: %d\r\n\r\n" % n
            parts.append(
                b"HMSG a.d 7 %d %d\r\n%s%s\r\n"
                % (len(header), len(header) + len(data), header, data)
            )
            expected.append((b"a.d", b"", data, {"K": str(n)}))
        else:
            # Not ours (no handler, no nats-py subscription): skipped.
            parts.append(b"MSG other 9 %d\r\n%s\r\n" % (len(data), data))
        parts.append(random.Random(n).choice((b"+OK\r\n", b"PONG\r\n", b"")))
    return b"".join(parts), expected


@pytest.mark.parametrize("cut", ["whole", "bytes", "random"])
async def test_any_cut_of_the_stream_reads_the_same(nats_url: str, cut: str) -> None:
    stream, expected = _frames()
    client = await _client(nats_url)
    try:
        got: Received = []
        client.handlers[7] = _recorder(got)
        reader = Reader(client)  # its own buffer: the client's reads go on beside it
        if cut == "whole":
            pieces = [stream]
        elif cut == "bytes":
            pieces = [stream[i : i + 1] for i in range(len(stream))]
        else:
            rng, pieces, at = random.Random(3), [], 0
            while at < len(stream):
                step = rng.randint(1, 700)
                pieces.append(stream[at : at + step])
                at += step
        for piece in pieces:
            await reader.parse(piece)
        assert got == expected
        assert not reader.buf
    finally:
        await client.close()


async def test_a_handler_that_raises_is_logged_and_reading_goes_on(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = await _client(nats_url)
    try:
        got: Received = []

        def fails(*_: Any) -> None:
            raise RuntimeError("boom")

        client.handlers[1] = fails
        client.handlers[2] = _recorder(got)
        reader = Reader(client)
        with caplog.at_level(logging.ERROR, "crossws_channels.drivers.nats"):
            await reader.parse(b"MSG x 1 2\r\nhi\r\nMSG y 2 3\r\nyes\r\n")
        assert [data for _, _, data, _ in got] == [b"yes"]
        assert "handler failed" in caplog.text
    finally:
        await client.close()


async def test_what_is_not_the_protocol_is_a_protocol_error(nats_url: str) -> None:
    client = await _client(nats_url)
    try:
        with pytest.raises(ProtocolError):
            await Reader(client).parse(b"HELLO there\r\n")
        with pytest.raises(ProtocolError):
            await Reader(client).parse(b"MSG only-a-subject\r\n")
    finally:
        await client.close()


# The inlet


class _Layer:
    """Stands in for the layer's Deliver: records, and pauses when told to."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.reports: list[tuple[Exception, str]] = []
        self.pause_at: set[bytes] = set()
        self.pauses: list[asyncio.Future[None]] = []

    def __call__(self, raw: bytes) -> asyncio.Future[None] | None:
        self.got.append(raw)
        if raw in self.pause_at:
            pause: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.pauses.append(pause)
            return pause
        return None

    def report(self, error: Exception, stage: str) -> None:
        self.reports.append((error, stage))


async def test_the_inlet_holds_what_comes_during_a_pause_and_delivers_it_in_order() -> None:
    layer = _Layer()
    layer.pause_at = {b"2", b"4"}
    inlet = Inlet(layer)  # type: ignore[arg-type]
    for n in range(7):
        inlet(b"s", b"", str(n).encode(), None)
    assert layer.got == [b"0", b"1", b"2"] and inlet.holding == 4
    layer.pauses[0].set_result(None)
    await asyncio.sleep(0)
    # Resumed, and paused again by "4": the rest still waits, in order.
    assert layer.got == [b"0", b"1", b"2", b"3", b"4"] and inlet.holding == 2
    inlet(b"s", b"", b"7", None)
    layer.pauses[1].set_result(None)
    await asyncio.sleep(0)
    assert layer.got == [str(n).encode() for n in range(8)] and inlet.holding == 0
    assert layer.reports == []


async def test_the_inlet_drops_past_its_bound_and_reports_once_per_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inlet_module, "MAX_HELD", 3)
    layer = _Layer()
    layer.pause_at = {b"0"}
    inlet = Inlet(layer)  # type: ignore[arg-type]
    for n in range(10):
        inlet(b"s", b"", str(n).encode(), None)
    assert inlet.holding == 3 and inlet.dropped == 6
    layer.pauses[0].set_result(None)
    await asyncio.sleep(0)
    assert layer.got == [b"0", b"1", b"2", b"3"]
    assert len(layer.reports) == 1
    error, stage = layer.reports[0]
    assert stage == "delivery" and "6 message(s)" in str(error)


async def test_runs_pause_midway_and_the_rest_waits_in_order_with_single_messages() -> None:
    """A run (consecutive messages handed over together) pauses where the layer says;
    what follows it, runs or single messages with headers, waits behind it in order."""
    layer = _Layer()
    layer.pause_at = {b"1", b"6"}
    inlet = Inlet(layer)  # type: ignore[arg-type]
    inlet.run([b"0", b"1", b"2", b"3"])
    assert layer.got == [b"0", b"1"] and inlet.holding == 2
    inlet(b"s", b"", b"4", {"X": "y"})
    inlet.run([b"5", b"6", b"7"])
    assert inlet.holding == 6
    layer.pauses[0].set_result(None)
    await asyncio.sleep(0)
    assert layer.got == [str(n).encode() for n in range(7)] and inlet.holding == 1
    layer.pauses[1].set_result(None)
    await asyncio.sleep(0)
    assert layer.got == [str(n).encode() for n in range(8)] and inlet.holding == 0
    assert inlet._bytes == 0


async def test_runs_held_past_the_bound_drop_the_newest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inlet_module, "MAX_HELD", 3)
    layer = _Layer()
    layer.pause_at = {b"0"}
    inlet = Inlet(layer)  # type: ignore[arg-type]
    inlet.run([str(n).encode() for n in range(3)])
    inlet.run([str(n).encode() for n in range(3, 6)])
    assert inlet.holding == 3 and inlet.dropped == 2
    layer.pauses[0].set_result(None)
    await asyncio.sleep(0)
    assert layer.got == [b"0", b"1", b"2", b"3"]
    assert len(layer.reports) == 1 and "2 message(s)" in str(layer.reports[0][0])


async def test_the_reader_hands_runs_over_in_order_with_other_subscriptions(
    nats_url: str,
) -> None:
    """Messages for a run-taking handler arrive as runs, cut wherever another
    subscription's message or one with headers comes between: together, in the order
    the server sent them."""
    import nats

    from crossws_channels.drivers.nats.reader import Runs

    order: list[tuple[str, bytes]] = []

    class Recorder(Runs):
        def __init__(self) -> None:
            self.runs: list[int] = []

        def __call__(
            self, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
        ) -> None:
            order.append(("single", data))

        def run(self, payloads: list[bytes]) -> None:
            self.runs.append(len(payloads))
            order.extend(("run", data) for data in payloads)

    runs_subject, other_subject = f"reader.{uuid.uuid4().hex}", f"reader.{uuid.uuid4().hex}"
    reader, publisher = await _client(nats_url), await nats.connect(nats_url)
    recorder = Recorder()
    try:
        await subscribe(reader, runs_subject, recorder)
        await subscribe(reader, other_subject, lambda s, r, d, h: order.append(("other", d)))
        await reader.flush()
        expected = []
        for n in range(200):
            data = str(n).encode()
            if n % 50 == 49:
                await publisher.publish(other_subject, data)
                expected.append(("other", data))
            elif n % 70 == 69:
                await publisher.publish(runs_subject, data, headers={"N": "1"})
                expected.append(("single", data))
            else:
                await publisher.publish(runs_subject, data)
                expected.append(("run", data))
        await publisher.flush()
        for _ in range(100):
            if len(order) == len(expected):
                break
            await asyncio.sleep(0.05)
        assert order == expected
        assert max(recorder.runs) > 1  # one read brought several
    finally:
        await publisher.close()
        await reader.close()
