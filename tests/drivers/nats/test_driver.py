"""The nats driver on its own and against a private nats-server the tests kill and
restart: options refused at start-up, envelopes over max_payload carried in parts, an
outage reported once and relaying resumed, stored worker-channel messages kept."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from crossws_channels.drivers.nats import NatsDriver
from crossws_channels.drivers.nats.chunks import MAX_PENDING, Assembler, split
from crossws_channels.errors import ConfigurationError
from tests.conftest import ErrorLog
from tests.drivers.nats.support import drop_streams_async, unique
from tests.servers import NatsServer
from tests.waiting import eventually_async

pytestmark = pytest.mark.nats


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"channel": "has space"}, "channel"),
        ({"channel": "wild.*"}, "channel"),
        ({"channel": "empty..token"}, "channel"),
        ({"channel": "ok", "url": "http://127.0.0.1:4222"}, "url"),
        ({"channel": "ok", "url": ""}, "url"),
        ({"channel": "ok", "client": object()}, "client"),
        ({"channel": "ok", "connect": {"no_such_option": 1}}, "connect"),
        ({"channel": "ok", "connect": {"servers": ["nats://x:1"]}}, "connect"),
        ({"channel": "ok", "hosts": ["x"]}, "hosts"),
    ],
)
def test_bad_options_are_refused_naming_the_key(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        NatsDriver("abcdefghijkl", options)
    assert raised.value.key == key


def test_several_servers_and_connect_arguments_are_taken() -> None:
    driver = NatsDriver(
        "abcdefghijkl",
        {
            "channel": "my-app",
            "url": "nats://127.0.0.1:4222, nats://127.0.0.1:4223",
            "connect": {"user": "app", "password": "secret", "name": "web"},
        },
    )
    assert driver.options.servers == ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
    assert driver.options.connect["user"] == "app"


# Envelopes over max_payload


def test_parts_are_collected_whatever_interleaves_them() -> None:
    first = split("a", b"x" * 2500, 1024 + 512)
    second = split("b", b"y" * 1500, 1024 + 512)
    assert [len(p) for p, _ in first] == [1024, 1024, 452]
    assembler = Assembler()
    out = []
    for part, headers in [first[0], second[0], first[1], second[1], first[2]]:
        whole = assembler.add(headers["Crossws-Part"], part)
        if whole is not None:
            out.append(whole)
    assert out == [b"y" * 1500, b"x" * 2500]


def test_incomplete_messages_held_are_bounded() -> None:
    assembler = Assembler()
    for n in range(MAX_PENDING + 10):
        part, headers = split(f"s{n}", b"z" * 3000, 1024 + 512)[0]
        assert assembler.add(headers["Crossws-Part"], part) is None
    assert len(assembler._pending) == MAX_PENDING
    assert assembler.dropped == 10
    # A part whose start was never seen is ignored, not an error.
    assert assembler.add("stranger.1 1 3", b"?") is None


@pytest.fixture
def small_payload_server() -> Iterator[NatsServer]:
    with NatsServer(config="max_payload: 65536") as server:
        yield server


async def test_a_message_larger_than_max_payload_crosses_in_parts(
    small_payload_server: NatsServer, make_layer: Any
) -> None:
    config = {"driver": "nats", "url": small_payload_server.url}
    sender, receiver = make_layer(**config), make_layer(**config)
    member = await receiver.new_channel()
    await receiver.group_add("big", member)
    await sender.new_channel()
    blob = bytes(range(256)) * 4000  # ~1 MiB of binary data: ~1.4 MB of envelope
    await sender.group_send("big", {"type": "blob", "data": blob})
    await sender.send(member, {"type": "blob", "data": blob[::-1]})
    first = await asyncio.wait_for(receiver.receive(member), 10)
    second = await asyncio.wait_for(receiver.receive(member), 10)
    assert hashlib.sha256(first["data"]).digest() == hashlib.sha256(blob).digest()
    assert second["data"] == blob[::-1]


# Outages


async def _until_relayed(sender: Any, receiver: Any, channel: str, timeout: float) -> float:
    """group_send probes until one arrives; the seconds it took."""
    started = time.monotonic()
    n = 0
    while True:
        n += 1
        await sender.group_send("probe", {"type": "probe", "n": n})
        try:
            await asyncio.wait_for(receiver.receive(channel), 0.05)
            return time.monotonic() - started
        except asyncio.TimeoutError:
            pass
        if time.monotonic() - started > timeout:
            raise AssertionError(f"nothing relayed within {timeout} s")


async def test_a_restarted_server_is_one_outage_and_relaying_resumes(make_layer: Any) -> None:
    with NatsServer() as server:
        errors = ErrorLog()
        config = {"driver": "nats", "url": server.url, "heartbeat": 0}
        sender, receiver = make_layer(**config), make_layer(**config, on_error=errors)
        member = await receiver.new_channel()
        await receiver.group_add("probe", member)
        await sender.new_channel()
        await _until_relayed(sender, receiver, member, 5)
        resumed = []
        for _ in range(3):
            server.stop()
            await eventually_async(
                lambda: not receiver.stats()["connected"], timeout=5, what="the outage seen"
            )
            server.start()
            restarted = time.monotonic()
            await _until_relayed(sender, receiver, member, 10)
            resumed.append(time.monotonic() - restarted)
            # Drain probes that arrived late.
            while True:
                try:
                    await asyncio.wait_for(receiver.receive(member), 0.2)
                except asyncio.TimeoutError:
                    break
        print(f"relaying resumed {', '.join(f'{s:.2f}' for s in resumed)} s after each restart")
        assert max(resumed) < 5
        subscribe_reports = [e for e, stage in errors.calls if stage == "subscribe"]
        assert len(subscribe_reports) == 3
        assert receiver.stats()["reconnects"] == 3


async def test_stored_worker_messages_survive_a_server_restart(make_layer: Any) -> None:
    with NatsServer() as server:
        config = {"driver": "nats", "url": server.url}
        sender = make_layer(**config)
        for n in range(5):
            await sender.send("jobs", {"type": "job", "n": n})
        # Sent in a burst, some were on their way when send returned: closing waits for
        # JetStream to confirm them (as the interpreter's exit does).
        await sender.close()
        server.restart()
        receiver = make_layer(**config)
        got = [await asyncio.wait_for(receiver.receive("jobs"), 10) for _ in range(5)]
        assert [m["n"] for m in got] == list(range(5))
        await receiver.close()
        await drop_streams_async(server.url, sender.config.channel)


async def test_a_users_client_is_used_and_left_open(nats_url: str, make_layer: Any) -> None:
    import nats

    client = await nats.connect(nats_url)
    try:
        channel = unique("client")
        layer = make_layer(driver="nats", client=client, channel=channel)
        member = await layer.new_channel()
        await layer.group_add("g", member)
        await layer.group_send("g", {"type": "hello"})
        assert (await asyncio.wait_for(layer.receive(member), 5))["type"] == "hello"
        await layer.close()
        assert client.is_connected
    finally:
        await client.close()


async def test_a_layer_closed_right_after_its_first_sends_hears_their_acknowledgements(
    nats_url: str, make_layer: Any
) -> None:
    # Closing while the layer still subscribes cancels a flush() whose PONG comes later;
    # nats-py's own reader then fails on the abandoned future and stops reading, so the
    # acknowledgements of the pushes (and everything else) go unheard.
    errors = ErrorLog()
    sender = make_layer(driver="nats", url=nats_url, on_error=errors)
    for n in range(5):
        await sender.send("jobs", {"type": "job", "n": n})
    await sender.close()
    assert [e for e, stage in errors.calls if stage == "publish"] == []
    receiver = make_layer(driver="nats", url=nats_url, channel=sender.config.channel)
    got = [await asyncio.wait_for(receiver.receive("jobs"), 10) for _ in range(5)]
    assert [m["n"] for m in got] == list(range(5))
    await drop_streams_async(nats_url, sender.config.channel)


async def test_group_sends_from_the_home_loop_publish_without_a_coroutine(
    nats_url: str, make_layer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The nats driver takes a group_send synchronously (SupportsPublishNow): its
    publish() coroutine runs only when the sender yields, every INLINE_RUN messages;
    every message arrives once, in order."""
    from crossws_channels._outbox import INLINE_RUN

    calls = 0
    publish = NatsDriver.publish

    async def counting(self: NatsDriver, envelope: str) -> None:
        nonlocal calls
        calls += 1
        await publish(self, envelope)

    monkeypatch.setattr(NatsDriver, "publish", counting)
    config = {"driver": "nats", "url": nats_url, "capacity": 10_000}
    sender, receiver = make_layer(**config), make_layer(**config)
    member = await receiver.new_channel()
    await receiver.group_add("g", member)
    await sender.new_channel()
    calls = 0
    count = 10 * INLINE_RUN
    for n in range(count):
        await sender.group_send("g", {"type": "n", "n": n})
    got = [(await asyncio.wait_for(receiver.receive(member), 5))["n"] for _ in range(count)]
    assert got == list(range(count))
    assert calls <= 2 * count // INLINE_RUN


async def test_a_sender_does_not_hear_its_own_burst_and_its_heartbeat_comes_back(
    nats_url: str, make_layer: Any
) -> None:
    """The driver's connection is made with no_echo: a burst of group_send doesn't come
    back to the sender (nothing for it to read and drop), while the heartbeat, which
    travels by the loopback connection, still does."""
    errors = ErrorLog()
    config = {"driver": "nats", "url": nats_url, "capacity": 10_000}
    sender = make_layer(heartbeat=0.1, on_error=errors, **config)
    receiver = make_layer(**config, channel=sender.config.channel)
    member = await receiver.new_channel()
    await receiver.group_add("g", member)
    await sender.new_channel()
    client = sender._backplane._driver._connection.client
    heard = client.stats["in_msgs"]
    count = 500
    for n in range(count):
        await sender.group_send("g", {"type": "n", "n": n})
    got = [(await asyncio.wait_for(receiver.receive(member), 5))["n"] for _ in range(count)]
    assert got == list(range(count))
    await asyncio.sleep(0.5)
    # A few heartbeats (and JetStream's answers, if any) came in; none of the burst did.
    assert client.stats["in_msgs"] - heard < 50
    assert sender.stats().get("heartbeat_rtt_seconds") is not None
    assert errors.calls == []


async def test_a_users_client_that_echoes_brings_the_heartbeat_back(
    nats_url: str, make_layer: Any
) -> None:
    import nats

    client = await nats.connect(nats_url)
    try:
        errors = ErrorLog()
        layer = make_layer(driver="nats", client=client, heartbeat=0.1, on_error=errors)
        await layer.new_channel()
        await asyncio.sleep(0.5)
        assert layer.stats().get("heartbeat_rtt_seconds") is not None
        assert layer._backplane._driver._loopback._client is None  # not needed
        assert errors.calls == []
        await layer.close()
    finally:
        await client.close()


async def test_a_users_client_that_does_not_echo_is_refused(nats_url: str) -> None:
    import nats

    client = await nats.connect(nats_url, no_echo=True)
    try:
        with pytest.raises(ConfigurationError) as raised:
            NatsDriver("abcdefghijkl", {"channel": "my-app", "client": client})
        assert raised.value.key == "client"
        assert "no_echo" in str(raised.value)
    finally:
        await client.close()
