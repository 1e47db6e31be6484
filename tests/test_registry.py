"""The registry's fast paths give the same answers as its general ones."""

from __future__ import annotations

import asyncio
from time import monotonic

from crossws_channels._registry import GroupDelivery, Registry


def _registry(capacity: int = 4) -> Registry:
    return Registry(lambda channel: capacity, shared_workers=False, expiry=60.0)


async def test_group_put_counts_when_every_member_took_it() -> None:
    registry = _registry()
    registry.group_add("g", "a!1")
    registry.group_add("g", "b!1")
    loop = asyncio.get_running_loop()
    assert registry.group_put("g", "m", monotonic() + 60, 0.0) == 2
    assert registry.group_put("g", "m", monotonic() + 60, 0.0, current=loop) == 2
    assert registry.group_put("nobody", "m", monotonic() + 60, 0.0) == 0


async def test_group_put_says_which_members_were_full() -> None:
    registry = _registry(capacity=1)
    registry.group_add("g", "a!1")
    registry.group_add("g", "b!1")
    assert registry.group_put("g", "first", monotonic() + 60, 0.0) == 2
    registry.take_queued("b!1")
    result = registry.group_put("g", "second", monotonic() + 60, 0.0)
    assert isinstance(result, GroupDelivery)
    assert (result.delivered, result.full) == (1, ["a!1"])


async def test_group_put_lets_expired_members_go() -> None:
    registry = _registry()
    registry.group_add("g", "a!1")
    result = registry.group_put("g", "m", monotonic() + 60, joined_after=monotonic() + 1)
    assert result == 0
    assert registry.member_count("g") == 0


async def test_take_queued_takes_live_messages_in_order() -> None:
    registry = _registry()
    for n in range(3):
        assert registry.put("a!1", f"m{n}", monotonic() + 60)
    assert [registry.take_queued("a!1") for _ in range(4)] == ["m0", "m1", "m2", None]
    assert registry.take_queued("never!1") is None


async def test_take_queued_leaves_expired_messages_to_take() -> None:
    registry = _registry()
    registry.put("a!1", "old", monotonic() - 1)
    registry.put("a!1", "new", monotonic() + 60)
    assert registry.take_queued("a!1") is None  # take() drops and counts it
    payload, waiter, expired, _, _ = registry.take("a!1", asyncio.get_running_loop())
    assert (payload, waiter, expired) == ("new", None, 1)


async def test_take_queued_leaves_the_low_water_mark_to_take() -> None:
    """A mailbox that owes something when it drains (here: senders waiting for
    credit) is taken from by take(), which pays it."""
    registry = _registry(capacity=4)
    for n in range(3):
        registry.put("a!1", f"m{n}", monotonic() + 60)
    box = registry._mailboxes["a!1"]
    box.asking = 1
    assert registry.take_queued("a!1") is None  # 2 left would be at low water
    box.asking = 0
    assert registry.take_queued("a!1") == "m0"
