"""The pgsql driver's worker channels: a table read with ``FOR UPDATE SKIP LOCKED``.

A push calls the cluster's push function (capacity, expiry and a wake-up NOTIFY in one
statement, see :mod:`.sql`); a pop deletes the head row of its channel. Receivers wait
for a wake-up on the listening connection (the relay hands them to :meth:`Queues.wake`)
and look again every second anyway, since a wake-up sent while the listener was down is
lost. Everything runs on a connection of its own, so queue traffic never delays the
relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from crossws_channels.errors import MessageExpired, Stage

from .link import Link, first_line
from .options import Names
from .session import PING_TIMEOUT, Session, sqlstate
from .sql import NOTIFY_ONE, Statements
from .tables import MISSING, Tables, fetch

__all__ = ["Queues"]

logger = logging.getLogger("crossws_channels.drivers.pgsql")

# A waiting queue_pop() looks again this often even without a wake-up NOTIFY, which could
# have been missed while the listening connection was down.
POLL_INTERVAL = 1.0
POLL_INTERVAL_UNSUBSCRIBED = 0.2

# A push sends a wake-up only when the queue was empty or nearly so (see sql.py). One
# that found more rows relies on the receivers taking them to go on popping until the
# queue is empty: a receiver that looked while they were being taken, and waits, was not
# woken by that push. So if the caller of a queue_pop() that returned an item has not
# popped that channel again this many seconds later (it stopped receiving, or is slow), the
# driver sends the wake-up on its behalf.
HANDOFF_DELAY = 0.05

# How long an item put back with queue_return() may wait when the driver doesn't know its
# deadline (it was not popped by this driver).
RETURN_TTL = 60.0

# Expired worker messages no receiver reached are purged every PURGE_INTERVAL seconds (by
# the next push), at most PURGE_ROWS at a time. A receiver drops expired messages it meets
# at the head of a queue, and a push that finds its queue full purges that queue first.
PURGE_INTERVAL = 30.0
PURGE_ROWS = 1000

# Items this driver popped, with their deadlines, for queue_return() to put back as they
# were (a receiver gives one back within moments, so the oldest are forgotten first), and
# channels it found empty (forgetting one only costs a look at the server).
POPPED_KEPT = 1024
DRAINED_KEPT = 1024


class Queues:
    """Worker-channel queues of one pgsql driver (see the module docstring)."""

    def __init__(self, link: Link, tables: Tables, sql: Statements, names: Names) -> None:
        self._link = link
        self._tables = tables
        self._sql = sql
        self._names = names
        # Where to report what the queues find expired (the layer, once listening).
        self.report: Callable[[Exception, Stage], None] | None = None
        # Whether the listening connection is up: waiting receivers then rely on it
        # for wake-ups and look at the table less often.
        self.listening = False
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._popped: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._handoffs: dict[str, asyncio.TimerHandle] = {}
        # Worker channels whose last pop here found nothing after the row it took (or no
        # row), with no wake-up since: as far as this driver knows, they are empty.
        self._drained: set[str] = set()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._purge_due = 0.0
        self._closed = False

    # Push

    async def push(self, channel: str, item: str, capacity: int, expires: float) -> bool:
        rows = await self._link.run(
            self._tables.run,
            fetch,
            self._sql.push,
            channel,
            capacity,
            item,
            expires - time.time(),
            self._names.wakeup,
        )
        added, purged = rows[0][0]
        if purged:
            self._report_expired(purged, [channel])
        if time.monotonic() >= self._purge_due:
            await self._purge()
        return bool(added)

    async def _purge(self) -> None:
        """Delete expired messages of worker channels no receiver reached, now and then."""
        self._purge_due = time.monotonic() + PURGE_INTERVAL
        try:
            rows = await self._link.run(
                self._tables.run, fetch, self._sql.purge, PURGE_ROWS, self._names.wakeup
            )
        except Exception as exc:
            logger.debug("pgsql channel %r: purging expired messages failed: %s", self, exc)
            return
        if rows:
            self._report_expired(sum(int(n) for _, n, _ in rows), [str(c) for c, _, _ in rows])

    # Pop

    async def pop(self, channel: str, timeout: float) -> str | None:
        loop = asyncio.get_running_loop()
        self._cancel_handoff(channel)  # popping again: the hand-over is not needed
        deadline = loop.time() + max(timeout, 0.0)
        event = asyncio.Event()
        waiters = self._waiters.setdefault(channel, set())
        waiters.add(event)
        # A channel this driver found empty, with no wake-up since (one arriving from now
        # on sets the event): wait for one instead of asking the server again. A push to
        # an empty queue always sends one; the periodic look below stays the safety net.
        drained = timeout > 0 and self.listening and channel in self._drained
        try:
            while True:
                if drained:
                    drained = False
                else:
                    # Cleared before the query: a wake-up arriving while it runs is kept.
                    event.clear()
                    item, more = await self._pop_once(channel)
                    if item is not None:
                        if more:
                            self._arm_handoff(loop, channel)
                        return item
                remaining = deadline - loop.time()
                if remaining <= 0 or self._closed:
                    return None
                interval = POLL_INTERVAL if self.listening else POLL_INTERVAL_UNSUBSCRIBED
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, interval))
                if self._closed:
                    return None
        finally:
            waiters.discard(event)
            if not waiters and self._waiters.get(channel) is waiters:
                del self._waiters[channel]

    async def _pop_once(self, channel: str) -> tuple[str | None, bool]:
        """Take the head of ``channel``: the item (or None), and whether rows followed it."""
        self._drained.discard(channel)
        task = asyncio.ensure_future(self._link.run(self._pop, channel))
        self._track(task)
        try:
            # Shielded: once the DELETE is sent its item is gone from the table, so a
            # cancelled receiver must still get the result, to put the item back.
            expired, item, expires, more = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(functools.partial(self._give_back_orphan, channel))
            raise
        if expired:
            self._report_expired(expired, [channel])
        if not more:
            if len(self._drained) >= DRAINED_KEPT:
                self._drained.clear()
            self._drained.add(channel)
        if item is not None:
            self._popped[(channel, item)] = expires
            while len(self._popped) > POPPED_KEPT:
                self._popped.popitem(last=False)
        return item, more

    async def _pop(self, session: Session, channel: str) -> tuple[int, str | None, float, bool]:
        """Take the head of ``channel``; drop the expired ones found first (counted)."""
        expired = 0
        while True:
            rows = await self._tables.run(session, fetch, self._sql.pop, channel)
            if not rows:
                return expired, None, 0.0, False
            item, expires, is_expired, more = rows[0]
            if not is_expired:
                return expired, item, float(expires), bool(more)
            expired += 1

    def _arm_handoff(self, loop: asyncio.AbstractEventLoop, channel: str) -> None:
        """Wake the other receivers of ``channel`` if this driver's caller doesn't pop it
        again soon: they may have looked while this receiver was taking its item, and the
        pushes since then, finding the queue not empty, sent no wake-up."""
        self._cancel_handoff(channel)
        self._handoffs[channel] = loop.call_later(HANDOFF_DELAY, self._hand_off, channel)

    def _cancel_handoff(self, channel: str) -> None:
        handoff = self._handoffs.pop(channel, None)
        if handoff is not None:
            handoff.cancel()

    def _hand_off(self, channel: str) -> None:
        self._handoffs.pop(channel, None)
        if self._closed:
            return
        self.wake(channel)
        self._track(asyncio.ensure_future(self._send_handoff(channel)))

    async def _send_handoff(self, channel: str) -> None:
        try:
            await self._link.run(_notify_one, self._names.wakeup, channel)
        except Exception as exc:
            # The receivers' periodic look at the queue still finds the rows.
            logger.debug("pgsql channel %r: a queue wake-up failed: %s", self, exc)

    # Return

    def _give_back_orphan(
        self, channel: str, task: asyncio.Future[tuple[int, str | None, float, bool]]
    ) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        _expired, item, expires, _more = task.result()
        if item is not None:
            # Also while closing: close() waits for this before closing the connections.
            self._track(asyncio.ensure_future(self._give_back_orphaned(channel, item, expires)))

    async def give_back(self, channel: str, item: str) -> None:
        """Put ``item`` back at the head of ``channel``, with the deadline it had when
        this driver popped it, if it did."""
        await self._give_back(channel, item, self._popped.pop((channel, item), None))

    async def _give_back(self, channel: str, item: str, expires: float | None) -> None:
        args = (channel, item, expires, self._names.wakeup, RETURN_TTL)
        while True:
            rows = await self._link.run(self._tables.run, fetch, self._sql.give_back, *args)
            if rows[0][0]:
                return
            # Another give-back took the position before the head at the same moment.

    async def _give_back_orphaned(self, channel: str, item: str, expires: float) -> None:
        try:
            await self._give_back(channel, item, expires)
        except Exception as exc:
            # Nobody waits for this: the receiver that took the item was cancelled.
            logger.warning(
                "pgsql channel %r: a worker message on %r could not be put back and is lost: %s",
                self._names.broadcast,
                channel,
                first_line(exc),
            )

    # Flush, wake-ups, closing

    async def flush(self) -> None:
        """Delete this cluster's waiting worker messages and large messages."""

        async def flush(session: Session) -> None:
            for statement in (self._sql.flush_queue, self._sql.flush_large):
                try:
                    await session.execute(statement)
                except Exception as exc:
                    if sqlstate(exc) not in MISSING:
                        raise

        await self._link.run(flush)

    def wake(self, channel: str) -> None:
        """A wake-up NOTIFY for ``channel`` arrived: its receivers look again."""
        self._drained.discard(channel)
        for event in self._waiters.get(channel, ()):
            event.set()

    def wake_all(self) -> None:
        """Wake-ups may have been missed (the listener was down): everyone looks again."""
        self._drained.clear()
        for events in self._waiters.values():
            for event in events:
                event.set()

    def _report_expired(self, count: int, channels: list[str]) -> None:
        error = MessageExpired(count, channels)
        if self.report is not None:
            self.report(error, "delivery")
        else:
            logger.warning("%s", error)

    def _track(self, task: asyncio.Future[Any]) -> None:
        """Keep a background task referenced until it is done, and close() waiting for it."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop waiting; let pops in flight, and the give-backs they start, finish."""
        self._closed = True
        for handoff in self._handoffs.values():
            handoff.cancel()
        self._handoffs.clear()
        self.wake_all()
        deadline = time.monotonic() + PING_TIMEOUT
        while self._tasks and (remaining := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._tasks), timeout=remaining)

    def __repr__(self) -> str:
        return f"<pgsql queues of {self._names.broadcast!r}>"


async def _notify_one(session: Session, channel: str, payload: str) -> None:
    await session.execute(NOTIFY_ONE, channel, payload)
