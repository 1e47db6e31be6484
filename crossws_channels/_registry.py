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

A mailbox also keeps what flow control needs: when its consumer last asked for a
message (``_flow``: is it reading?), the pause it holds the backplane in, and, for
messages sent to it from other instances, what each sender has been told (``_credits``).
Whenever a mailbox drains to half its capacity (its *low water*), the pause it held is
released and the senders that asked for credit get it.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING

from .loops import wake
from .serialize import Template

if TYPE_CHECKING:
    from ._flow import InboundFlow, Pause

__all__ = ["Credit", "GroupDelivery", "Item", "Mailbox", "Payload", "Registry"]

Payload = str | bytes
# What a mailbox holds: serialized data, or a message decoded once for many receivers.
Item = str | bytes | Template
Waiter = asyncio.Future["Item | None"]
Credit = tuple[str, str, int, int]
"""Credit for a sender: ``(sender instance, channel, highest number seen, room)``."""
_NO_DEADLINE = float("inf")
# Messages sent to a channel directly are taken beyond its capacity (their senders'
# windows allowed them), up to this many times the capacity.
DIRECT_HEADROOM = 4
# Senders whose credit a mailbox tracks; the oldest is forgotten first.
MAX_SENDERS = 64


class _Sender:
    """What a mailbox knows of one remote sender."""

    __slots__ = ("asked", "seen")

    def __init__(self) -> None:
        self.seen = 0  # the highest number that arrived from it
        self.asked = False  # it waits for credit


class Mailbox:
    """Messages waiting on one channel, and the receivers waiting for them."""

    __slots__ = (
        "asking",
        "capacity",
        "gate",
        "items",
        "last_read",
        "low_water",
        "name",
        "senders",
        "shared",
        "stalled",
        "waiters",
    )

    def __init__(self, name: str, capacity: int, shared: bool) -> None:
        self.name = name
        self.capacity = capacity
        self.low_water = capacity // 2
        # True for a worker channel fed from the backplane's shared queue.
        self.shared = shared
        self.items: deque[tuple[float, Item]] = deque()
        # Each resolves to the message handed over, or None: "look in items".
        self.waiters: deque[Waiter] = deque()
        # When a receive() last looked here (monotonic): is the consumer reading?
        self.last_read = float("-inf")
        # The pause of the backplane this mailbox holds until it drains (see _flow).
        self.gate: Pause | None = None
        # Waited a whole pause without draining: no overflow until it drains.
        self.stalled = False
        # Remote senders of direct messages, and how many of them wait for credit.
        self.senders: dict[str, _Sender] | None = None
        self.asking = 0

    def credit_for(self, sender: str, state: _Sender) -> Credit:
        return (sender, self.name, state.seen, max(0, self.capacity - len(self.items)))


class GroupDelivery:
    """What a group fan-out did."""

    __slots__ = ("delivered", "full", "shared")

    def __init__(self) -> None:
        self.delivered = 0
        self.full: list[str] = []
        # Worker channels in the group, when worker channels live in the backplane: the
        # layer pushes to them there instead of into a local mailbox.
        self.shared: list[str] = []


class Registry:
    """Mailboxes and group memberships of one layer instance."""

    def __init__(
        self,
        capacity_for: Callable[[str], int],
        shared_workers: bool,
        expiry: float,
        *,
        track_vanished: bool = False,
    ) -> None:
        self.lock = threading.Lock()
        self._expiry = expiry
        self._capacity_for = capacity_for
        # Worker channels live in the backplane's shared queue (the driver has one).
        self.shared_workers = shared_workers
        self._mailboxes: dict[str, Mailbox] = {}
        # Mailboxes that may hold messages, so the sweep doesn't visit idle ones.
        self._pending: set[str] = set()
        # Mailboxes a receive emptied: the sweep frees those nobody waits on any more.
        self._emptied: set[str] = set()
        self._groups: dict[str, dict[str, float]] = {}
        self._memberships: dict[str, set[str]] = {}
        # Groups whose last member here left, one entry each time (routing "groups":
        # the routes stop listening to a topic no group here needs any more).
        self._vanished: list[str] = []
        self._track_vanished = track_vanished

    # Mailboxes

    def _mailbox(self, channel: str) -> Mailbox:
        box = self._mailboxes.get(channel)
        if box is None:
            shared = "!" not in channel and self.shared_workers
            box = self._mailboxes[channel] = Mailbox(channel, self._capacity_for(channel), shared)
        return box

    def _drained(self, box: Mailbox) -> list[Credit] | None:
        """``box`` is at or below its low water: release what waited for that."""
        if box.gate is not None:
            box.gate.release(box)
        box.stalled = False
        if not box.asking or box.senders is None:
            return None
        box.asking = 0
        credits = []
        for sender, state in box.senders.items():
            if state.asked:
                state.asked = False
                credits.append(box.credit_for(sender, state))
        return credits

    def _forget(self, channel: str, box: Mailbox) -> list[Credit] | None:
        """Free ``box`` (empty, nobody waiting), answering whatever waited on it."""
        del self._mailboxes[channel]
        if box.gate is not None or box.asking:
            return self._drained(box)
        return None

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
                    # A receiver that waited is reading, however long it waited.
                    box.last_read = monotonic()
                    return True
                else:
                    break
        if not force and len(box.items) >= box.capacity:
            return False
        box.items.append((deadline, payload))
        self._pending.add(channel)
        while waiters:
            if wake(waiters.popleft(), current):
                box.last_read = monotonic()  # woken: it will read as soon as it runs
                break
        return True

    def put(self, channel: str, payload: Payload, deadline: float, force: bool = False) -> bool:
        """Queue ``payload`` on ``channel``; False if the channel is at capacity."""
        current = asyncio.events._get_running_loop()
        with self.lock:
            return self._put(channel, payload, deadline, current, force)

    def group_put(
        self,
        group: str,
        payload: Item,
        deadline: float,
        joined_after: float,
        flow: InboundFlow | None = None,
        now: float = 0.0,
        current: asyncio.AbstractEventLoop | None = None,
    ) -> GroupDelivery | int:
        """Queue ``payload`` on every member of ``group`` that has room.

        Members that joined before ``joined_after`` have outlived ``group_expiry``: they
        leave the group instead. With ``flow`` (a message relayed from the backplane), a
        full member whose consumer is reading takes it over capacity and holds the
        backplane until it drains (``flow.finish()`` tells the driver). ``current``: the
        caller's event loop, when it knows it (the relay, on the home loop).

        Returns how many members took it when nothing else happened (the usual case,
        which then costs no object), else a :class:`GroupDelivery` saying what did.
        """
        if current is None:
            current = asyncio.events._get_running_loop()
        with self.lock:
            members = self._groups.get(group)
            if not members:
                return 0
            shared = self.shared_workers
            mailboxes = self._mailboxes
            pending = self._pending
            entry = (deadline, payload)
            delivered = 0
            result: GroupDelivery | None = None
            stale: list[str] = []
            for channel, joined in members.items():
                box = mailboxes.get(channel)
                if joined < joined_after:
                    stale.append(channel)
                elif shared and "!" not in channel:
                    if result is None:
                        result = GroupDelivery()
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
                elif flow is not None and flow.may_overflow(full := mailboxes[channel], now):
                    full.items.append(entry)
                    pending.add(channel)
                    flow.hold(full)
                    delivered += 1
                else:
                    if result is None:
                        result = GroupDelivery()
                    result.full.append(channel)
            for channel in stale:
                self._discard(group, channel)
        if result is None:
            return delivered
        result.delivered = delivered
        return result

    def take_queued(self, channel: str) -> Item | None:
        """The next message queued on ``channel`` when taking it is all there is to do
        (it is live, and the mailbox stays above its low water or owes nothing there);
        else None, and :meth:`take` does the rest. What a consumer that keeps up with a
        burst calls for nearly every message: no event loop to look up, nothing to build.
        """
        with self.lock:
            box = self._mailboxes.get(channel)
            if box is None:
                return None
            items = box.items
            if not items:
                return None
            now = monotonic()
            deadline, payload = items[0]
            if deadline < now or (
                len(items) <= box.low_water + 1
                and (box.gate is not None or box.stalled or box.asking)
            ):
                return None
            items.popleft()
            box.last_read = now
            if not items:
                self._pending.discard(channel)
                self._emptied.add(channel)
            return payload

    def take(
        self, channel: str, loop: asyncio.AbstractEventLoop
    ) -> tuple[Item | None, Waiter | None, int, bool, list[Credit] | None]:
        """Pop the next live message, or register a waiter.

        Returns ``(payload, waiter, expired, shared, credits)``: exactly one of payload
        and waiter is set; ``expired`` counts messages dropped for being past their
        deadline; ``shared`` tells whether the channel is fed from the backplane's queue;
        ``credits`` are due to remote senders now that the channel has room.
        """
        now = monotonic()
        expired = 0
        credits = None
        with self.lock:
            box = self._mailboxes.get(channel) or self._mailbox(channel)
            box.last_read = now
            items = box.items
            while items:
                deadline, payload = items.popleft()
                if deadline >= now:
                    if not items:
                        self._pending.discard(channel)
                        self._emptied.add(channel)
                    if len(items) <= box.low_water and (
                        box.gate is not None or box.stalled or box.asking
                    ):
                        credits = self._drained(box)
                    return payload, None, expired, box.shared, credits
                expired += 1
            self._pending.discard(channel)
            if box.gate is not None or box.stalled or box.asking:
                credits = self._drained(box)
            waiter: Waiter = loop.create_future()
            box.waiters.append(waiter)
            return None, waiter, expired, box.shared, credits

    def put_back(self, channel: str, payload: Item) -> None:
        """Return a message handed to a receiver that was cancelled, at the head."""
        with self.lock:
            self._mailbox(channel).items.appendleft((monotonic() + self._expiry, payload))
            self._pending.add(channel)

    def abandon(self, channel: str, waiter: Waiter) -> tuple[list[Item], list[Credit] | None]:
        """Forget a receiver that was cancelled; free the mailbox if nothing is left.

        Returns messages of a shared worker channel that no receiver here wants any
        more, for the caller to hand back to the backplane's queue, and credits due.
        """
        current = asyncio.events._get_running_loop()
        with self.lock:
            box = self._mailboxes.get(channel)
            if box is None:
                return [], None
            try:
                box.waiters.remove(waiter)
            except ValueError:
                pass  # already woken: pass the wake-up on below
            while box.items and box.waiters and not wake(box.waiters.popleft(), current):
                pass
            leftovers: list[Item] = []
            credits = None
            if not box.waiters:
                if box.shared and box.items:
                    leftovers = [payload for _, payload in box.items]
                    box.items.clear()
                if not box.items:
                    self._pending.discard(channel)
                    credits = self._forget(channel, box)
            return leftovers, credits

    def has_waiters(self, channel: str) -> bool:
        with self.lock:
            box = self._mailboxes.get(channel)
            return box is not None and bool(box.waiters)

    def put_if_wanted(self, channel: str, payload: Item) -> bool:
        """Hand a message fetched from the shared queue to a waiting receiver, if any."""
        current = asyncio.events._get_running_loop()
        with self.lock:
            box = self._mailboxes.get(channel)
            if box is None or not box.waiters:
                return False
            return self._put(channel, payload, _NO_DEADLINE, current, force=True)

    # Messages from other instances' send()

    def put_direct(
        self, channel: str, payload: Payload, deadline: float, sender: str, number: int, ask: bool
    ) -> tuple[bool, Credit | None]:
        """Queue a message ``sender`` sent to ``channel`` under flow control.

        Its window allowed it, so it is taken even beyond capacity, up to
        ``DIRECT_HEADROOM`` times the capacity. Returns whether it was taken, and the
        credit to send at once when it asks for credit and the channel has room.
        """
        current = asyncio.events._get_running_loop()
        with self.lock:
            box = self._mailboxes.get(channel) or self._mailbox(channel)
            if len(box.items) >= box.capacity * DIRECT_HEADROOM:
                return False, None
            self._put(channel, payload, deadline, current, force=True)
            state = self._sender(box, sender)
            if number > state.seen:
                state.seen = number
            if not ask:
                return True, None
            return True, self._ask(box, sender, state)

    def probe(self, channel: str, sender: str, number: int) -> Credit | None:
        """``sender`` has no room left on ``channel`` and sent up to ``number``: its
        credit now if the channel has room, else once it drains."""
        with self.lock:
            box = self._mailboxes.get(channel)
            if box is None:
                # Nothing waits here: all the room there is.
                return (sender, channel, number, self._capacity_for(channel))
            state = self._sender(box, sender)
            # Sent over the same ordered path as its messages: whatever it sent before
            # this arrived already, or is lost.
            if number > state.seen:
                state.seen = number
            return self._ask(box, sender, state)

    def _sender(self, box: Mailbox, sender: str) -> _Sender:
        senders = box.senders
        if senders is None:
            senders = box.senders = {}
        state = senders.get(sender)
        if state is None:
            if len(senders) >= MAX_SENDERS:
                oldest = next(iter(senders))
                if senders.pop(oldest).asked:
                    box.asking -= 1
            state = senders[sender] = _Sender()
        return state

    def _ask(self, box: Mailbox, sender: str, state: _Sender) -> Credit | None:
        if len(box.items) <= box.low_water:
            if state.asked:
                state.asked = False
                box.asking -= 1
            return box.credit_for(sender, state)
        if not state.asked:
            state.asked = True
            box.asking += 1
        return None

    # Groups

    def group_add(self, group: str, channel: str) -> bool:
        """Add the membership; return whether ``group`` had no member here before."""
        with self.lock:
            members = self._groups.get(group)
            created = members is None
            if members is None:
                members = self._groups[group] = {}
            members[channel] = monotonic()
            self._memberships.setdefault(channel, set()).add(group)
        return created

    def group_discard(self, group: str, channel: str) -> None:
        with self.lock:
            self._discard(group, channel)

    def _discard(self, group: str, channel: str) -> None:
        members = self._groups.get(group)
        if members is not None:
            members.pop(channel, None)
            if not members:
                del self._groups[group]
                if self._track_vanished:
                    self._vanished.append(group)
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

    def sweep(self, group_expiry: float | None) -> tuple[dict[str, int], list[Credit]]:
        """Drop expired messages; drop the memberships of channels nobody reads.

        A channel whose message expired unread has no live consumer (one that reads
        would have taken it), so it leaves every group, as Channels' in-memory layer
        does. With ``group_expiry``, memberships older than that many seconds end too.
        Returns the number of expired messages per channel, and credits due.
        """
        now = monotonic()
        expired: dict[str, int] = {}
        credits: list[Credit] = []
        with self.lock:
            for channel in self._emptied:
                box = self._mailboxes.get(channel)
                if box is not None and not box.items and not box.waiters:
                    credits += self._forget(channel, box) or ()
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
                    if len(items) <= box.low_water:
                        credits += self._drained(box) or ()
                if not items:
                    self._pending.discard(channel)
                    if not box.waiters:
                        credits += self._forget(channel, box) or ()
            if group_expiry is not None:
                cutoff = now - group_expiry
                for group, members in list(self._groups.items()):
                    for channel, joined in list(members.items()):
                        if joined < cutoff:
                            self._discard(group, channel)
        return expired, credits

    def flush(self) -> list[Credit]:
        """Forget every message and membership; waiting receivers keep waiting.

        Returns the credits due to remote senders, who now have all the room there is.
        """
        credits: list[Credit] = []
        with self.lock:
            for channel, box in list(self._mailboxes.items()):
                box.items.clear()
                credits += self._drained(box) or ()
                if not box.waiters:
                    del self._mailboxes[channel]
            self._pending.clear()
            if self._track_vanished:
                self._vanished.extend(self._groups)
            self._groups.clear()
            self._memberships.clear()
        return credits

    def take_vanished(self) -> list[str]:
        """The groups that lost their last member here since the last call, once for
        each time they did (a group may have come back since)."""
        with self.lock:
            vanished, self._vanished = self._vanished, []
        return vanished

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
