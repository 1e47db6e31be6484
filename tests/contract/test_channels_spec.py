"""The Channels channel layer specification, on every driver.

``make_layer`` (``tests/contract/conftest.py``) builds layers of one cluster on each
driver in turn: ``local``, and the network drivers over their real servers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.exceptions import ChannelFull

from crossws_channels.errors import MessageExpired, MessagesDropped, MessageTooLarge
from tests.conftest import ErrorLog
from tests.waiting import eventually_async


async def receive(layer: Any, channel: str, timeout: float = 2.0) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), timeout)  # type: ignore[no-any-return]


async def nothing_on(layer: Any, channel: str, timeout: float = 0.2) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), timeout)


async def test_extensions(make_layer: Any) -> None:
    """The layer declares the groups and flush extensions."""
    assert set(make_layer().extensions) == {"groups", "flush"}


async def test_send_receive_in_order(make_layer: Any) -> None:
    """Messages on one channel arrive once each, in the order they were sent."""
    layer = make_layer()
    channel = await layer.new_channel()
    for n in range(20):
        await layer.send(channel, {"type": "n", "n": n})
    assert [(await receive(layer, channel))["n"] for _ in range(20)] == list(range(20))
    await nothing_on(layer, channel)


async def test_new_channel_names_are_valid_unique_and_use_the_prefix(make_layer: Any) -> None:
    """new_channel returns distinct valid names with the given prefix and a '!'."""
    layer = make_layer()
    names = {await layer.new_channel() for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert name.startswith("specific.") and "!" in name
        assert layer.require_valid_channel_name(name)
    custom = await layer.new_channel(prefix="chat.")
    assert custom.startswith("chat.")
    await layer.send(custom, {"type": "x"})
    assert await receive(layer, custom) == {"type": "x"}


@pytest.mark.parametrize("name", ["", "bad name", "é", "a" * 100, None, 5, "group!"])
async def test_invalid_group_names_raise_type_error(make_layer: Any, name: Any) -> None:
    """Group names are validated with Channels' own rules."""
    layer = make_layer()
    channel = await layer.new_channel()
    with pytest.raises(TypeError):
        await layer.group_add(name, channel)
    with pytest.raises(TypeError):
        await layer.group_discard(name, channel)
    with pytest.raises(TypeError):
        await layer.group_send(name, {"type": "x"})


@pytest.mark.parametrize("name", ["", "bad name", "é!", "a" * 100, None, b"bytes"])
async def test_invalid_channel_names_raise_type_error(make_layer: Any, name: Any) -> None:
    """Channel names are validated with Channels' own rules."""
    layer = make_layer()
    with pytest.raises(TypeError):
        await layer.send(name, {"type": "x"})
    with pytest.raises(TypeError):
        await layer.receive(name)
    with pytest.raises(TypeError):
        await layer.group_add("group", name)


async def test_a_message_must_be_a_dict(make_layer: Any) -> None:
    """Sending something that is not a dict raises TypeError."""
    layer = make_layer()
    with pytest.raises(TypeError, match="must be a dict"):
        await layer.send(await layer.new_channel(), ["not", "a", "dict"])  # type: ignore[arg-type]


async def test_groups(make_layer: Any) -> None:
    """group_send reaches current members only; group_discard removes one."""
    layer = make_layer()
    one, two, outsider = [await layer.new_channel() for _ in range(3)]
    await layer.group_add("g", one)
    await layer.group_add("g", two)
    await layer.group_add("g", two)  # twice is once
    await layer.group_send("g", {"type": "first"})
    assert await receive(layer, one) == {"type": "first"}
    assert await receive(layer, two) == {"type": "first"}
    await nothing_on(layer, two)
    await nothing_on(layer, outsider)
    await layer.group_discard("g", one)
    await layer.group_discard("g", outsider)  # not a member: no error
    await layer.group_send("g", {"type": "second"})
    assert await receive(layer, two) == {"type": "second"}
    await nothing_on(layer, one)


async def test_group_send_to_an_empty_group_is_fine(make_layer: Any) -> None:
    """A group nobody joined accepts messages, delivers and drops nothing."""
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.group_send("nobody-here", {"type": "x"})
    # Relayed all the same: members may live elsewhere.
    await eventually_async(lambda: layer.stats().get("published") == 1, what="the relay")
    stats = layer.stats()
    assert stats.get("delivered", 0) == 0
    assert not [name for name in stats if name.startswith("dropped.")]
    await nothing_on(layer, channel)


async def test_members_get_independent_copies(make_layer: Any) -> None:
    """One consumer mutating its message can't change what another receives."""
    layer = make_layer()
    one, two = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("g", one)
    await layer.group_add("g", two)
    await layer.group_send("g", {"type": "t", "items": [1, 2]})
    first = await receive(layer, one)
    first["items"].append(3)
    assert await receive(layer, two) == {"type": "t", "items": [1, 2]}
    # A flat message (no nested dict or list) is copied too.
    await layer.group_send("g", {"type": "flat", "n": 1})
    first = await receive(layer, one)
    first["n"] = 2
    first["extra"] = True
    assert await receive(layer, two) == {"type": "flat", "n": 1}


async def test_send_raises_channel_full_at_capacity(make_layer: Any) -> None:
    """send raises ChannelFull once capacity messages wait; receiving makes room."""
    layer = make_layer(capacity=3)
    channel = await layer.new_channel()
    for n in range(3):
        await layer.send(channel, {"type": "n", "n": n})
    with pytest.raises(ChannelFull):
        await layer.send(channel, {"type": "n", "n": 3})
    assert (await receive(layer, channel))["n"] == 0
    await layer.send(channel, {"type": "n", "n": 4})


async def test_channel_capacity_globs(make_layer: Any) -> None:
    """channel_capacity sets capacity per glob pattern; the first match wins."""
    layer = make_layer(capacity=100, channel_capacity={"tiny-*": 1, "tiny-but-*": 50})
    await layer.send("tiny-but-first-match", {"type": "x"})
    with pytest.raises(ChannelFull):
        await layer.send("tiny-but-first-match", {"type": "x"})
    for _ in range(5):
        await layer.send("roomy", {"type": "x"})


async def test_group_send_drops_for_a_full_member_and_reports_it(
    make_layer: Any, errors: ErrorLog
) -> None:
    """A full member misses the message (reported, stage delivery); the others get it."""
    layer = make_layer(capacity=1, on_error=errors)
    full, fine = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("g", full)
    await layer.group_add("g", fine)
    await layer.send(full, {"type": "filler"})
    await layer.group_send("g", {"type": "news"})
    assert await receive(layer, fine) == {"type": "news"}
    assert await receive(layer, full) == {"type": "filler"}
    await nothing_on(layer, full)
    reported = errors.of(ChannelFull, "delivery")
    assert len(reported) == 1 and full in str(reported[0])
    assert layer.stats()["dropped.full"] == 1


async def test_members_behind_keep_capacity_messages_in_order(
    make_layer: Any, errors: ErrorLog
) -> None:
    """Members that don't receive while a group is busy queue up to capacity each, in
    order; each message beyond that is dropped for them, counted, and reported at most
    once per group per second, each report with the count since the previous one."""
    layer = make_layer(capacity=3, on_error=errors)
    members = [await layer.new_channel() for _ in range(3)]
    for channel in members:
        await layer.group_add("g", channel)
    for n in range(5):
        await layer.group_send("g", {"type": "n", "n": n})
    for channel in members:
        assert [(await receive(layer, channel))["n"] for _ in range(3)] == [0, 1, 2]
        await nothing_on(layer, channel)
    assert layer.stats()["delivered"] == 9
    assert layer.stats()["dropped.full"] == 6
    first = errors.of(ChannelFull, "delivery")
    assert len(first) == 1 and isinstance(first[0], MessagesDropped)
    assert first[0].count == 3 and first[0].group == "g"
    await layer.close()  # what was still to report is reported now
    reported = errors.of(MessagesDropped, "delivery")
    assert len(reported) == 2 and sum(error.count for error in reported) == 6
    assert sorted(reported[1].channels) == sorted(members)


async def test_messages_expire(make_layer: Any, errors: ErrorLog) -> None:
    """A message unread after `expiry` seconds is dropped and reported."""
    layer = make_layer(expiry=0.2, on_error=errors)
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "old"})
    await asyncio.sleep(0.35)
    await layer.send(channel, {"type": "new"})
    assert await receive(layer, channel) == {"type": "new"}
    assert errors.of(MessageExpired, "delivery")
    assert layer.stats()["dropped.expired"] == 1


async def test_an_expired_message_removes_its_channel_from_groups(make_layer: Any) -> None:
    """A channel nobody reads for `expiry` seconds leaves its groups, as in Channels' layers."""
    layer = make_layer(expiry=0.2)
    dead, alive = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("g", dead)
    await layer.group_add("g", alive)
    receiving = asyncio.ensure_future(layer.receive(alive))
    await layer.group_send("g", {"type": "x"})
    assert await asyncio.wait_for(receiving, 1) == {"type": "x"}
    await asyncio.sleep(0.5)  # the sweep runs every expiry/4
    assert layer.stats()["memberships"] == 1
    await layer.group_send("g", {"type": "y"})
    assert await receive(layer, alive) == {"type": "y"}


async def test_group_expiry(make_layer: Any) -> None:
    """Memberships older than `group_expiry` seconds end."""
    layer = make_layer(group_expiry=0.2, expiry=0.2)
    channel = await layer.new_channel()
    await layer.group_add("g", channel)
    await asyncio.sleep(0.5)
    await layer.group_send("g", {"type": "late"})
    await nothing_on(layer, channel)


async def test_defaults(make_layer: Any) -> None:
    """expiry defaults to 60 s, group_expiry to a day, capacity to 100."""
    layer = make_layer()
    assert (layer.expiry, layer.group_expiry, layer.capacity) == (60, 86400, 100)


async def test_cancelled_receive_loses_no_message(make_layer: Any) -> None:
    """A message sent just as a receive is cancelled is there for the next receive."""
    layer = make_layer()
    channel = await layer.new_channel()
    for n in range(200):
        waiting = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(0)
        await layer.send(channel, {"type": "n", "n": n})
        waiting.cancel()  # the receiver was woken but has not run yet
        try:
            got = await waiting
        except asyncio.CancelledError:
            got = await receive(layer, channel)
        assert got == {"type": "n", "n": n}
    await nothing_on(layer, channel)


async def test_cancelled_receives_free_what_they_held(make_layer: Any) -> None:
    """Consumers that connect, wait and disconnect leave nothing behind."""
    layer = make_layer()
    for _ in range(500):
        channel = await layer.new_channel()
        waiting = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    sizes = layer.stats()
    assert (sizes["channels"], sizes["receivers"], sizes["queued"]) == (0, 0, 0)


async def test_two_receivers_on_one_channel_share_its_messages(make_layer: Any) -> None:
    """Each message goes to exactly one of several concurrent receivers."""
    layer = make_layer()
    channel = await layer.new_channel()
    receivers = [asyncio.ensure_future(layer.receive(channel)) for _ in range(5)]
    await asyncio.sleep(0)
    for n in range(5):
        await layer.send(channel, {"type": "n", "n": n})
    got = await asyncio.wait_for(asyncio.gather(*receivers), 2)
    assert sorted(message["n"] for message in got) == list(range(5))


async def test_flush(make_layer: Any) -> None:
    """flush forgets queued messages and group memberships."""
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "x"})
    await layer.send("worker-jobs", {"type": "job"})
    await layer.group_add("g", channel)
    await layer.flush()
    await layer.group_send("g", {"type": "after"})
    await nothing_on(layer, channel)
    await nothing_on(layer, "worker-jobs")


async def test_close_then_use_again(make_layer: Any) -> None:
    """A closed layer starts again on next use."""
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.close()
    await layer.send(channel, {"type": "x"})
    assert await receive(layer, channel) == {"type": "x"}


async def test_oversized_and_unserializable_messages_are_refused(make_layer: Any) -> None:
    """Too-large messages raise MessageTooLarge and bad values TypeError, at the call."""
    layer = make_layer(max_message_size=1000)
    channel = await layer.new_channel()
    await layer.group_add("g", channel)
    for call in (layer.send, layer.group_send):
        target = channel if call == layer.send else "g"
        with pytest.raises(MessageTooLarge, match="1000"):
            await call(target, {"type": "big", "data": "x" * 1001})
        with pytest.raises(TypeError, match="set"):
            await call(target, {"type": "bad", "data": {1}})
    await nothing_on(layer, channel)
    await layer.send(channel, {"type": "fits", "data": "x" * 900})
    assert (await receive(layer, channel))["type"] == "fits"
