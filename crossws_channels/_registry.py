"""This instance's channels and groups: mailboxes, waiting receivers, memberships.

Everything here is guarded by one lock, because Channels code calls the layer from many
threads and event loops at once: the server's loop, ``async_to_sync`` in sync views, a
fresh loop per call in management commands. A mailbox holds serialized payloads; each
receiver decodes its own copy, so no two consumers ever share a mutable dict.

Receivers wait on a future of their own loop. A sender on that same loop hands the
message to the first waiter directly (the common case: a server's consumers and the
relay share the server's loop). A sender on another thread appends the message and
wakes the waiter, which takes it itself once it runs. Either way a cancelled receiver
loses nothing: a message handed to it is put back at the head of the mailbox, and a
wake-up it can no longer use is passed on.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

from .serialize import Template

__all__ = ["GroupDelivery", "Item", "Mailbox", "Payload", "Registry", "wake"]

Payload = str | bytes
# What a mailbox holds: serialized data, or a message decoded once for many receivers.
Item = str | bytes | Template
Waiter = asyncio.Future["Item | None"]
_NO_DEADLINE = float("inf")


class Mailbox:
    """Messages waiting on one channel, and the receivers waiting for them."""

    __slots__ = ("capacity", "items", "shared", "waiters")

    def __init__(self, capacity: int, shared: bool) -> None:
        self.capacity = capacity
        # True for a worker channel fed from the backplane's shared queue.
        self.shared = shared
        self.items: deque[tuple[float, Item]] = deque()
        # Each resolves to the message handed over, or None: "look in items".
        self.waiters: deque[Waiter] = deque()


@dataclass
class GroupDelivery:
    """What a group fan-out did."""

    delivered: int = 0
    full: list[str] = field(default_factory=list)
    # Worker channels in the group, when worker channels live in the backplane: the
    # layer pushes to them there instead of into a local mailbox.
    shared: list[str] = field(default_factory=list)


def _resolve(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


def wake(future: asyncio.Future[Any], current: asyncio.AbstractEventLoop | None) -> bool:
    """Wake a waiting receiver on whatever loop it waits on; False if it is gone."""
    if future.done():
        return False
    loop = future.get_loop()
    if loop is current:
        future.set_result(None)
        return True
    try:
        loop.call_soon_threadsafe(_resolve, future)
    except RuntimeError:
        # Its loop is closed: nobody will ever run that receiver again.
        return False
    return True


class Registry:
    """Mailboxes and group memberships of one layer instance."""

    def __init__(
        self,
        capacity_for: Callable[[str], int],
        shared_workers: Callable[[], bool],
        expiry: float,
    ) -> None:
        self.lock = threading.Lock()
        self._expiry = expiry
        self._capacity_for = capacity_for
        self._shared_workers = shared_workers
        self._mailboxes: dict[str, Mailbox] = {}
        # Mailboxes that may hold messages, so the sweep doesn't visit idle ones.
        self._pending: set[str] = set()
        # Mailboxes a receive emptied: the sweep frees those nobody waits on any more.
        self._emptied: set[str] = set()
        self._groups: dict[str, dict[str, float]] = {}
        self._memberships: dict[str, set[str]] = {}

    # Mailboxes

    def _mailbox(self, channel: str) -> Mailbox:
        box = self._mailboxes.get(channel)
        if box is None:
            shared = "!" not in channel and self._shared_workers()
            box = self._mailboxes[channel] = Mailbox(self._capacity_for(channel), shared)
        return box

    def _put(
        self,
        channel: str,
        payload: Item,
        deadline: float,
        current: asyncio.AbstractEventLoop | None,
        force: bool = False,
    ) -> bool:
        box = self._mailboxes.get(channel) or self._mailbox(channel)
        waiters = box.waiters
        if not box.items:
            # Hand over directly to a receiver waiting on this very loop.
            while waiters:
                waiter = waiters[0]
                if waiter.done():
                    waiters.popleft()
                elif waiter.get_loop() is current:
                    waiters.popleft()
                    waiter.set_result(payload)
                    return True
                else:
                    break
        if not force and len(box.items) >= box.capacity:
            return False
        box.items.append((deadline, payload))
        self._pending.add(channel)
        while waiters and not wake(waiters.popleft(), current):
            pass
        return True

    def put(self, channel: str, payload: Payload, deadline: float, force: bool = False) -> bool:
        """Queue ``payload`` on ``channel``; False if the channel is at capacity."""
        current = asyncio.events._get_running_loop()
        with self.lock:
            return self._put(channel, payload, deadline, current, force)

    def group_put(
        self, group: str, payload: Item, deadline: float, joined_after: float
    ) -> GroupDelivery:
        """Queue ``payload`` on every member of ``group`` that has room.

        Members that joined before ``joined_after`` have outlived ``group_expiry``: they
        leave the group instead.
        """
        result = GroupDelivery()
        current = asyncio.events._get_running_loop()
        with self.lock:
            members = self._groups.get(group)
            if not members:
                return result
            shared = self._shared_workers()
            mailboxes = self._mailboxes
            pending = self._pending
            entry = (deadline, payload)
            delivered = 0
            stale: list[str] = []
            for channel, joined in members.items():
                box = mailboxes.get(channel)
                if joined < joined_after:
                    stale.append(channel)
                elif shared and "!" not in channel:
                    result.shared.append(channel)
                elif (
                    box is not None
                    and box.items
                    and not box.waiters
                    and len(box.items) < box.capacity
                ):
                    # A member busy with earlier messages (the usual case under load):
                    # nobody to hand over to or wake, just queue it.
                    box.items.append(entry)
                    pending.add(channel)
                    delivered += 1
                elif self._put(channel, payload, deadline, current):
                    delivered += 1
                else:
                    result.full.append(channel)
            result.delivered = delivered
            for channel in stale:
                self._discard(group, channel)
        return result

    def take(
        self, channel: str, loop: asyncio.AbstractEventLoop
    ) -> tuple[Item | None, Waiter | None, int, bool]:
        """Pop the next live message, or register a waiter.

        Returns ``(payload, waiter, expired, shared)``: exactly one of payload and waiter
        is set; ``expired`` counts messages dropped for being past their deadline;
        ``shared`` tells whether the channel is fed from the backplane's queue.
        """
        now = monotonic()
        expired = 0
        with self.lock:
            box = self._mailboxes.get(channel) or self._mailbox(channel)
            items = box.items
            while items:
                deadline, payload = items.popleft()
                if deadline >= now:
                    if not items:
                        self._pending.discard(channel)
                        self._emptied.add(channel)
                    return payload, None, expired, box.shared
                expired += 1
            self._pending.discard(channel)
            waiter: Waiter = loop.create_future()
            box.waiters.append(waiter)
            return None, waiter, expired, box.shared

    def put_back(self, channel: str, payload: Item) -> None:
        """Return a message handed to a receiver that was cancelled, at the head."""
        with self.lock:
            self._mailbox(channel).items.appendleft((monotonic() + self._expiry, payload))
            self._pending.add(channel)

    def abandon(self, channel: str, waiter: Waiter) -> list[Item]:
        """Forget a receiver that was cancelled; free the mailbox if nothing is left.

        Returns messages of a shared worker channel that no receiver here wants any
        more, for the caller to hand back to the backplane's queue.
        """
        current = asyncio.events._get_running_loop()
        with self.lock:
            box = self._mailboxes.get(channel)
            if box is None:
                return []
            try:
                box.waiters.remove(waiter)
            except ValueError:
                pass  # already woken: pass the wake-up on below
            while box.items and box.waiters and not wake(box.waiters.popleft(), current):
                pass
            leftovers: list[Item] = []
            if not box.waiters:
                if box.shared and box.items:
                    leftovers = [payload for _, payload in box.items]
                    box.items.clear()
                if not box.items:
                    self._pending.discard(channel)
                    del self._mailboxes[channel]
            return leftovers

    def has_waiters(self, channel: str) -> bool:
        with self.lock:
            box = self._mailboxes.get(channel)
            return box is not None and bool(box.waiters)

    def put_if_wanted(self, channel: str, payload: Payload) -> bool:
        """Hand a message fetched from the shared queue to a waiting receiver, if any."""
        current = asyncio.events._get_running_loop()
        with self.lock:
            box = self._mailboxes.get(channel)
            if box is None or not box.waiters:
                return False
            return self._put(channel, payload, _NO_DEADLINE, current, force=True)

    # Groups

    def group_add(self, group: str, channel: str) -> None:
        with self.lock:
            self._groups.setdefault(group, {})[channel] = monotonic()
            self._memberships.setdefault(channel, set()).add(group)

    def group_discard(self, group: str, channel: str) -> None:
        with self.lock:
            self._discard(group, channel)

    def _discard(self, group: str, channel: str) -> None:
        members = self._groups.get(group)
        if members is not None:
            members.pop(channel, None)
            if not members:
                del self._groups[group]
        groups = self._memberships.get(channel)
        if groups is not None:
            groups.discard(group)
            if not groups:
                del self._memberships[channel]

    def member_count(self, group: str) -> int:
        """How many members ``group`` has here (read without the lock: a hint only)."""
        return len(self._groups.get(group, ()))

    def members(self, group: str) -> list[str]:
        with self.lock:
            return list(self._groups.get(group, ()))

    # Housekeeping

    def sweep(self, group_expiry: float | None) -> dict[str, int]:
        """Drop expired messages; drop the memberships of channels nobody reads.

        A channel whose message expired unread has no live consumer (one that reads
        would have taken it), so it leaves every group, as Channels' in-memory layer
        does. With ``group_expiry``, memberships older than that many seconds end too.
        Returns the number of expired messages per channel.
        """
        now = monotonic()
        expired: dict[str, int] = {}
        with self.lock:
            for channel in self._emptied:
                box = self._mailboxes.get(channel)
                if box is not None and not box.items and not box.waiters:
                    del self._mailboxes[channel]
            self._emptied.clear()
            for channel in list(self._pending):
                box = self._mailboxes.get(channel)
                if box is None:
                    self._pending.discard(channel)
                    continue
                items = box.items
                count = 0
                while items and items[0][0] < now:
                    items.popleft()
                    count += 1
                if count:
                    expired[channel] = count
                    if not box.waiters:
                        for group in list(self._memberships.get(channel, ())):
                            self._discard(group, channel)
                if not items:
                    self._pending.discard(channel)
                    if not box.waiters:
                        del self._mailboxes[channel]
            if group_expiry is not None:
                cutoff = now - group_expiry
                for group, members in list(self._groups.items()):
                    for channel, joined in list(members.items()):
                        if joined < cutoff:
                            self._discard(group, channel)
        return expired

    def flush(self) -> None:
        """Forget every message and membership; waiting receivers keep waiting."""
        with self.lock:
            for channel, box in list(self._mailboxes.items()):
                box.items.clear()
                if not box.waiters:
                    del self._mailboxes[channel]
            self._pending.clear()
            self._groups.clear()
            self._memberships.clear()

    def sizes(self) -> dict[str, int]:
        """How much this instance holds, for ``stats()`` and leak tests."""
        with self.lock:
            return {
                "channels": len(self._mailboxes),
                "queued": sum(len(box.items) for box in self._mailboxes.values()),
                "receivers": sum(len(box.waiters) for box in self._mailboxes.values()),
                "groups": len(self._groups),
                "memberships": sum(len(members) for members in self._groups.values()),
            }

    def owned_channels(self, instance_id: str) -> list[str]:
        """This instance's process-specific channels: receiving, or in a group."""
        marker = instance_id + "!"
        with self.lock:
            names = set(self._mailboxes) | set(self._memberships)
        return [name for name in names if marker in name]

    def channels_with_items(self) -> Iterable[str]:
        with self.lock:
            return list(self._pending)
