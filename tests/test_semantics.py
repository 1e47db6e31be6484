"""The seed's semantics: local first, one envelope per group_send, no echo, no raising."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import pytest

from crossws_channels.drivers.base import Deliver, Outgoing
from crossws_channels.drivers.local import LocalDriver
from crossws_channels.errors import MalformedMessage
from tests import hooks
from tests.conftest import ErrorLog


class CountingDriver(LocalDriver):
    """The local driver, counting what the layer hands it."""

    instances: ClassVar[list[CountingDriver]] = []

    def __init__(self, instance_id: str, options: Mapping[str, Any]) -> None:
        super().__init__(instance_id, options)
        self.published: list[str] = []
        CountingDriver.instances.append(self)

    async def publish(self, envelope: str, /) -> None:
        self.published.append(envelope)
        await super().publish(envelope)

    async def publish_batch(self, batch: Sequence[Outgoing], /) -> None:
        self.published.extend(text for _, text in batch)
        await super().publish_batch(batch)


class StalledDriver(LocalDriver):
    """A backplane that accepts a subscription but never finishes a publish."""

    async def publish(self, envelope: str, /) -> None:
        await asyncio.Event().wait()

    async def publish_batch(self, batch: Sequence[Outgoing], /) -> None:
        await asyncio.Event().wait()


class DownDriver:
    """A backplane that is unreachable: every call fails. It has the earlier form of the
    driver contract (``subscribe``), which the layer still retries with backoff."""

    subscribe_attempts: ClassVar[int] = 0

    def __init__(self, instance_id: str, options: Mapping[str, Any]) -> None:
        pass

    async def publish(self, envelope: str, /) -> None:
        raise ConnectionRefusedError("backplane is down")

    async def subscribe(self, deliver: Deliver, /) -> None:
        DownDriver.subscribe_attempts += 1
        raise ConnectionRefusedError("backplane is down")

    async def close(self) -> None:
        pass


async def test_local_members_get_the_message_before_the_backplane_does(make_layer: Any) -> None:
    """Local delivery doesn't wait for the backplane, even one that never answers."""
    layer = make_layer(driver=StalledDriver)
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    await asyncio.wait_for(layer.group_send("room", {"type": "fast"}), 1)
    assert layer.stats()["queued"] == 1  # delivered synchronously, before any await
    assert await asyncio.wait_for(layer.receive(channel), 1) == {"type": "fast"}


async def test_one_envelope_per_group_send_whatever_the_members(make_layer: Any) -> None:
    """A group of 100 local and 100 remote members costs one backplane message."""
    CountingDriver.instances.clear()
    a, b = make_layer(driver=CountingDriver), make_layer(driver=CountingDriver)
    channels = [await a.new_channel() for _ in range(100)] + [
        await b.new_channel() for _ in range(100)
    ]
    for channel in channels:
        await (a if a.instance_id in channel else b).group_add("big", channel)
    await a.group_send("big", {"type": "hello"})
    for channel in channels:
        owner = a if a.instance_id in channel else b
        assert await asyncio.wait_for(owner.receive(channel), 2) == {"type": "hello"}
    driver_a = next(d for d in CountingDriver.instances if d._instance_id == a.instance_id)
    assert len(driver_a.published) == 1


async def test_own_echo_is_suppressed(make_layer: Any) -> None:
    """The backplane echoes our publish back; members still get it once."""
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    await layer.group_send("room", {"type": "once"})
    assert await asyncio.wait_for(layer.receive(channel), 1) == {"type": "once"}
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), 0.3)
    assert layer.stats().get("relayed_in", 0) == 0


async def test_a_down_backplane_never_raises_and_local_delivery_continues(
    make_layer: Any, errors: ErrorLog
) -> None:
    """Publish and subscribe failures go to on_error; send and group_send work locally."""
    DownDriver.subscribe_attempts = 0
    layer = make_layer(driver=DownDriver, on_error=errors)
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    for n in range(5):
        await layer.group_send("room", {"type": "n", "n": n})
        await layer.send(channel, {"type": "direct", "n": n})
        await layer.send("specific.ElsewhereXYZ!abc", {"type": "remote"})
    for _ in range(10):
        await asyncio.wait_for(layer.receive(channel), 1)
    await asyncio.sleep(0.3)
    publish = [e for e, stage in errors.calls if stage == "publish"]
    subscribe = [e for e, stage in errors.calls if stage == "subscribe"]
    assert len(publish) == 1 and isinstance(publish[0], ConnectionRefusedError)  # once per outage
    assert len(subscribe) == 1
    assert DownDriver.subscribe_attempts > 1  # it keeps retrying
    assert layer.stats()["dropped.publish"] >= 10


async def test_malformed_backplane_traffic_is_dropped_and_reported(
    make_layer: Any, errors: ErrorLog
) -> None:
    """Garbage on the backplane is dropped with a delivery report; the layer keeps working."""
    layer = make_layer(on_error=errors)
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    intruder = LocalDriver("intruder0000", {"channel": layer.config.channel})
    for raw in [
        "not json",
        '{"id":"x"}',
        '{"id":"x","msg":{"namespace":"","topic":"room","binary":true,"data":"wWN3McE="}}',
        "\x00" * 10,
    ]:
        await intruder.publish(raw)
    await intruder.publish(
        '{"id":"x","msg":{"namespace":"","topic":"room","binary":false,"data":"{\\"type\\":\\"ok\\"}"}}'
    )
    assert await asyncio.wait_for(layer.receive(channel), 1) == {"type": "ok"}
    assert errors.of(MalformedMessage, "delivery")
    assert layer.stats()["dropped.malformed"] == 4


@pytest.mark.parametrize(
    "hook", ["tests.hooks.record", "tests.hooks.record_async", hooks.record, hooks.record_async]
)
async def test_on_error_hook_forms(make_layer: Any, hook: Any) -> None:
    """on_error may be a dotted path or a callable, sync or async."""
    hooks.calls.clear()
    layer = make_layer(driver=DownDriver, on_error=hook)
    await layer.group_send("room", {"type": "x"})
    for _ in range(50):
        if {stage for _, stage in hooks.calls} >= {"publish", "subscribe"}:
            break
        await asyncio.sleep(0.02)
    assert {stage for _, stage in hooks.calls} >= {"publish", "subscribe"}


async def test_a_broken_hook_is_logged_and_changes_nothing(
    make_layer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that raises is logged; the layer carries on."""
    layer = make_layer(driver=DownDriver, on_error="tests.hooks.explode")
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    with caplog.at_level(logging.ERROR, logger="crossws_channels"):
        await layer.group_send("room", {"type": "x"})
        assert await asyncio.wait_for(layer.receive(channel), 1) == {"type": "x"}
        await asyncio.sleep(0.1)
    assert "on_error hook raised" in caplog.text


async def test_without_a_hook_failures_are_logged(
    make_layer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """With no on_error, failures go to the crossws_channels logger with their stage."""
    layer = make_layer(driver=DownDriver)
    with caplog.at_level(logging.WARNING, logger="crossws_channels"):
        await layer.group_send("room", {"type": "x"})
        await asyncio.sleep(0.2)
    assert "backplane publish failed" in caplog.text
    assert "backplane subscribe failed" in caplog.text
