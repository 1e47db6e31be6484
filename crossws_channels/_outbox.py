"""What this instance relays out: one queue, drained by one task in batches.

``group_send`` costs a local fan-out and an append here; whatever queued during one
network round trip goes out in the next, as one batch when the driver takes batches.
Publishing failures are one outage (reported once, each failed message counted). A
message is never written twice: a batch whose write was cut short is counted as lost,
never resent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from ._health import Outage
from ._home import Home
from ._reporting import Reporter, Stats
from .drivers.base import (
    Driver,
    SubscribingDriver,
    SupportsBatch,
    SupportsDirect,
    SupportsPublishNow,
    SupportsTopics,
    Topic,
    capabilities,
)
from .errors import BackplaneOverloaded

logger = logging.getLogger("crossws_channels")

__all__ = ["DRAIN_TIMEOUT", "HIGH_WATER", "Outbox"]

MAX_BATCH = 512
# Messages a sender publishes itself (a buffering driver) before it yields to the loop.
INLINE_RUN = 64
# Above this many queued messages, a producer on the home loop waits for the flusher.
HIGH_WATER = 2048
# A producer never waits longer than this for room; past it, the message is dropped.
ROOM_TIMEOUT = 5.0
# How long a caller on another loop waits to see its message written.
HANDOVER_TIMEOUT = 10.0
# Bound on the final flush when the layer closes or its loop ends.
DRAIN_TIMEOUT = 2.0


@dataclass(slots=True)
class _Outgoing:
    target: str | None
    text: str
    done: concurrent.futures.Future[None] | None = None

    def release(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


class Outbox:
    """The queue of envelopes to relay, and its flusher (:meth:`run`, on the home loop)."""

    def __init__(self, home: Home, stats: Stats, reporter: Reporter, outage: Outage) -> None:
        self._home = home
        self._stats = stats
        self._reporter = reporter
        self._outage = outage
        self._queue: deque[_Outgoing] = deque()
        # Set when the backplane stops: the flusher sends what is queued, then ends.
        self._closing = False
        self._idle = False
        self._wake: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        # The flusher's driver, when its publishing only buffers (DeclaresBuffering).
        self._buffering: Driver | SubscribingDriver | None = None
        # Its synchronous publishing, when it has that too (SupportsPublishNow).
        self._publish_now: Callable[[str | None, str], bool] | None = None
        self._inline = 0

    # Producers

    def publish_now(
        self, target: str | None, text: str, loop: asyncio.AbstractEventLoop | None
    ) -> bool:
        """:meth:`publish` in its common case, without a coroutine: True if the driver
        took the envelope synchronously; False, doing nothing, otherwise (then await
        :meth:`publish`). ``loop``: the caller's running loop (it looked it up already)."""
        now = self._publish_now
        if (
            now is None
            or not self._idle
            or self._queue
            or self._inline >= INLINE_RUN - 1  # publish() lets the client write now
            or self._outage.active
            or loop is not self._home.loop
            or not now(target, text)
        ):
            return False
        self._inline += 1
        self._stats.home["published"] += 1  # on the home loop
        return True

    async def publish(self, target: str | None, text: str) -> None:
        """Queue one envelope (for instance ``target``, or every instance). Never raises
        for backplane failures. From the home loop this returns once it is queued (it
        waits only when the queue is over its high water); from another loop, once it is
        written, so that a command or sync view that sends and exits has really sent
        (unless relaying is known to be failing: then it returns at once)."""
        home = self._home.loop
        if home is None:
            return
        if asyncio.get_running_loop() is home:
            buffering = self._buffering
            if buffering is not None and self._idle and not self._queue and not self._outage.active:
                # Nothing waits to be relayed and publishing can't block: publish now
                # rather than wake the flusher for one message (a turn of the loop).
                await self._send(buffering, [_Outgoing(target, text)])
                self._inline += 1
                if self._inline >= INLINE_RUN:
                    # A sender in a loop would never yield: let the client write what it
                    # holds now and then, as the flusher does after each batch.
                    self._inline = 0
                    await asyncio.sleep(0)
                return
            self._queue.append(_Outgoing(target, text))
            self._wake_up()
            if len(self._queue) >= HIGH_WATER:
                await self._wait_for_room()
            return
        if self._outage.active:
            # Relaying is known to be failing (and was reported): a sync view or command
            # must not wait for each attempt to fail too. The message goes with the next
            # attempt; past the high water it is dropped and counted instead of queued.
            if len(self._queue) >= HIGH_WATER:
                self._stats.incr("dropped.publish")
                return
            self._queue.append(_Outgoing(target, text))
            self._home.call_soon(self._wake_up)
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.append(_Outgoing(target, text, done))
        if not self._home.call_soon(self._wake_up):
            return
        try:
            await asyncio.wait_for(asyncio.wrap_future(done), HANDOVER_TIMEOUT)
        except asyncio.TimeoutError:
            logger.warning(
                "a message waited %ss to be relayed; not waiting longer", HANDOVER_TIMEOUT
            )

    def post(self, target: str | None, text: str) -> None:
        """Queue one envelope without waiting, from any thread (control traffic)."""
        if self._home.loop is None:
            return
        self._queue.append(_Outgoing(target, text))
        self._home.call_soon(self._wake_up)

    def _wake_up(self) -> None:
        if self._idle:
            self._idle = False
            wake = self._wake
            if wake is not None and not wake.done():
                wake.set_result(None)

    async def _wait_for_room(self) -> None:
        loop = asyncio.get_running_loop()
        if self._room is None or self._room.done():
            self._room = loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._room), ROOM_TIMEOUT)
        except asyncio.TimeoutError:
            dropped = 0
            while len(self._queue) >= HIGH_WATER:
                self._queue.pop().release()
                dropped += 1
            self._stats.incr("dropped.overloaded", dropped)
            self._reporter.report(
                BackplaneOverloaded(
                    f"{dropped} message(s) waited over {ROOM_TIMEOUT}s to be relayed and "
                    "were dropped"
                ),
                "publish",
            )

    def _signal_room(self) -> None:
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    # The flusher, on the home loop

    async def run(self, driver: Driver | SubscribingDriver) -> None:
        """Send what is queued, batch after batch, until :meth:`finish` and empty."""
        loop = asyncio.get_running_loop()
        self._closing = False
        can = capabilities(driver)
        self._buffering = driver if can.buffers else None
        if can.publish_now:
            self._publish_now = cast(SupportsPublishNow, driver).publish_now
        try:
            await self._flush_until_finished(loop, driver)
        finally:
            self._buffering = self._publish_now = None

    async def _flush_until_finished(
        self, loop: asyncio.AbstractEventLoop, driver: Driver | SubscribingDriver
    ) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._signal_room()
                if self._closing:
                    return
                self._wake = loop.create_future()
                self._idle = True
                if queue:  # something arrived between the check and going idle
                    self._idle = False
                    continue
                await self._wake
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]
            if len(queue) < HIGH_WATER:
                self._signal_room()
            await self._send(driver, batch)

    def finish(self) -> None:
        """Let the flusher end once the queue is empty (the backplane stops)."""
        self._closing = True
        self._wake_up()

    async def _send(self, driver: Driver | SubscribingDriver, batch: list[_Outgoing]) -> None:
        sent = 0
        can = capabilities(driver)
        try:
            if can.batch and len(batch) > 1:
                await cast(SupportsBatch, driver).publish_batch(
                    [(item.target, item.text) for item in batch]
                )
                sent = len(batch)
            else:
                for item in batch:
                    if type(item.target) is Topic:
                        await cast(SupportsTopics, driver).publish_topic(item.target, item.text)
                    elif item.target is not None and can.direct:
                        await cast(SupportsDirect, driver).publish_to(item.target, item.text)
                    else:
                        await driver.publish(item.text)
                    sent += 1
        except asyncio.CancelledError:
            # The batch may be on the wire already: never send it again (at most once).
            self._stats.incr("dropped.publish", len(batch) - sent)
            raise
        except Exception as exc:
            self._stats.incr("dropped.publish", len(batch) - sent)
            self._reporter.failed(self._outage, exc, "publish")
        else:
            self._outage.end()
        finally:
            self._stats.incr("published", sent)
            for item in batch:
                item.release()

    async def drain(self, driver: Driver | SubscribingDriver) -> None:
        """Send what is still queued, within a bound, before the driver closes."""
        queue = self._queue
        if not queue:
            return

        async def drain() -> None:
            while queue:
                await self._send(
                    driver, [queue.popleft() for _ in range(min(len(queue), MAX_BATCH))]
                )

        try:
            await asyncio.wait_for(drain(), DRAIN_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass
        if queue:
            self._stats.incr("dropped.publish", len(queue))
            logger.warning("%d queued message(s) were not relayed before closing", len(queue))
            for item in queue:
                item.release()
            queue.clear()
