"""Putting messages into this instance's channels: a group's members, or one channel.

Both ``group_send`` (for the members here, before anything is relayed) and relayed
messages come through :class:`Delivery`. A group message is decoded once when several
members get it, each receiving its own copy; a worker channel in a group is fed through
the shared queue; full members are counted and reported, aggregated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from time import monotonic

from . import serialize
from ._flow import InboundFlow
from ._histograms import Histogram
from ._registry import Credit, GroupDelivery, Item, Payload, Registry
from ._reporting import Reporter, Stats
from ._workers import WorkerChannels
from .errors import MessagesDropped

__all__ = ["Delivery"]


def _dropped(subject: str | None, count: int, names: dict[str, int]) -> Exception:
    return MessagesDropped(count, list(names))


def _dropped_in_group(group: str | None, count: int, names: dict[str, int]) -> Exception:
    return MessagesDropped(count, list(names), group)


class Delivery:
    """Delivers into the registry (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        workers: WorkerChannels,
        stats: Stats,
        reporter: Reporter,
        *,
        expiry: float,
        group_expiry: float,
        fanout: Histogram | None = None,
    ) -> None:
        self._registry = registry
        self._workers = workers
        self._stats = stats
        self._reporter = reporter
        self._expiry = expiry
        self._group_expiry = group_expiry
        # How many members a group message reached here (where it reached any).
        self._fanout = fanout

    def to_group(
        self,
        group: str,
        payload: Payload,
        flow: InboundFlow | None = None,
        members: int | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Deliver to the members of ``group`` here; with ``flow``, a relayed message that
        may hold up the backplane for full members that read (see ``_flow``).
        ``members``: how many the group has here, if the caller just looked; ``loop``:
        the caller's running loop, if it knows it (the relay: the home loop)."""
        if members is None:
            members = self._registry.member_count(group)
        # One member (the usual relayed case) takes the payload as it is: no call.
        item = payload if members <= 1 else self._item(payload, members, group)
        if item is not None:
            self._put(group, payload, item, flow, monotonic(), loop)

    def to_groups(
        self, groups: Sequence[str], payload: Payload, flow: InboundFlow | None = None
    ) -> None:
        """One message to the members of each of ``groups`` here, as :meth:`to_group`
        for each, decoded once for all of them."""
        members = sum(self._registry.member_count(group) for group in groups)
        item = self._item(payload, members, groups)
        if item is None:
            return
        now = monotonic()
        for group in groups:
            self._put(group, payload, item, flow, now)

    def _item(self, payload: Payload, members: int, groups: str | Sequence[str]) -> Item | None:
        """What to queue for ``members`` receivers: with several, the message decoded once
        (each receives its own copy of that); None if it can't be (reported)."""
        if members <= 1:
            return payload
        try:
            return serialize.Template(serialize.loads(payload))
        except Exception as exc:
            what = f"group {groups!r}" if isinstance(groups, str) else f"groups {list(groups)!r}"
            self._reporter.drop_malformed(f"a message for {what}: {exc}")
            return None

    def _put(
        self,
        group: str,
        payload: Payload,
        item: Item,
        flow: InboundFlow | None,
        now: float,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        result = self._registry.group_put(
            group, item, now + self._expiry, now - self._group_expiry, flow, now, loop
        )
        if isinstance(result, GroupDelivery):
            self._after(group, payload, result, flow)
            return
        if result:
            fanout = self._fanout
            if flow is None:
                self._stats.incr("delivered", result)
                if fanout is not None:
                    fanout.observe(result)
            else:  # relayed: on the home loop
                self._stats.home["delivered"] += result
                if fanout is not None:
                    fanout.observe_home(result)

    def _after(
        self, group: str, payload: Payload, result: GroupDelivery, flow: InboundFlow | None
    ) -> None:
        """Count and report what a fan-out did; feed the worker channels among them."""
        if result.delivered:
            if flow is None:
                self._stats.incr("delivered", result.delivered)
            else:  # relayed: on the home loop
                self._stats.incr_home("delivered", result.delivered)
        fanout = self._fanout
        if fanout is not None:
            reached = result.delivered + len(result.full) + len(result.shared)
            if reached:
                if flow is None:
                    fanout.observe(reached)
                else:  # relayed: on the home loop
                    fanout.observe_home(reached)
        if result.full:
            self._stats.incr("dropped.full", len(result.full))
            self._reporter.tally(
                "group full", group, "delivery", _dropped_in_group, len(result.full), result.full
            )
        for channel in result.shared:
            self._workers.push_soon(channel, payload, self.dropped)

    def to_channel(
        self, sender: str, channel: str, payload: Payload, number: int | None, ask: bool
    ) -> Credit | None:
        """Deliver a message another instance sent to ``channel``, numbered when its
        sender keeps a window onto it (see ``_credits``); the credit to send at once,
        if any."""
        deadline = monotonic() + self._expiry
        credit = None
        if number is None:
            taken = self._registry.put(channel, payload, deadline)
        else:
            taken, credit = self._registry.put_direct(
                channel, payload, deadline, sender, number, ask
            )
        if taken:
            self._stats.incr("delivered")
        else:
            self.dropped(channel)
        return credit

    def dropped(self, channel: str) -> None:
        """One message for ``channel`` dropped because it is full: counted, reported."""
        self._stats.incr("dropped.full")
        self._reporter.tally("full", channel, "delivery", _dropped, 1, [channel])
