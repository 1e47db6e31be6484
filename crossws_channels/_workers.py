"""Worker channels (names without ``!``) in the backplane's shared queue.

With a driver that has a shared queue (``SupportsWorkerQueue``), a message sent to a
worker channel waits in the backplane, up to ``expiry``, and is handed to exactly one
receiver in the whole cluster. This module is all of it on this instance's side:

* :meth:`WorkerChannels.push` for ``send`` (``False`` when the queue is full), and
  :meth:`push_soon` for a worker channel that is a member of a group;
* a *fetcher* per worker channel that has receivers here: it pops items while someone
  waits, lingering a moment after the last receive for the next one, and hands each item
  to a waiting receiver, or back to the queue if the receiver gave up meanwhile;
* :meth:`give_back` for what a cancelled receive held.

Every driver call runs on the home loop (:class:`~crossws_channels._home.Home`); the
fetchers run for as long as :meth:`run` does, which the backplane calls with each driver.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import cast

from . import serialize
from ._frames import Frames
from ._health import Outage
from ._home import Home
from ._registry import Item, Payload, Registry
from ._reporting import Reporter, Stats
from ._sealing import ReplayGuard, Unauthenticated
from ._supervisor import Backoff
from .drivers.base import (
    Driver,
    SubscribingDriver,
    SupportsQueueTake,
    SupportsWorkerQueue,
    capabilities,
)
from .envelope import SyncMessage, decode_envelope
from .errors import MessageExpired
from .serialize import relayed_template

logger = logging.getLogger("crossws_channels")

__all__ = ["WorkerChannels"]

QUEUE_POP_TIMEOUT = 1.0
# How long a worker channel's fetcher waits for its receiver to come back for the next
# message, instead of ending and being started again for every item (scenario D of the
# benchmark: one fetcher per item cost a task and a pop round trip each).
FETCHER_LINGER = 1.0


def _expired(subject: str | None, count: int, names: dict[str, int]) -> Exception:
    return MessageExpired(count, list(names))


class WorkerChannels:
    """This instance's side of the cluster's worker channels (see the module docstring)."""

    def __init__(
        self,
        home: Home,
        registry: Registry,
        frames: Frames,
        stats: Stats,
        reporter: Reporter,
        *,
        expiry: float,
        capacity_for: Callable[[str], int],
        guard: ReplayGuard | None = None,
    ) -> None:
        self._home = home
        # With a sealer (signing_keys, encryption_keys): what was delivered here.
        self._guard = guard
        self._registry = registry
        self._frames = frames
        self._stats = stats
        self._reporter = reporter
        self._expiry = expiry
        self._capacity_for = capacity_for
        self._driver: SupportsWorkerQueue | None = None
        self._fetchers: dict[str, asyncio.Task[None]] = {}
        self._wanted: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # pushes and returns in flight
        # Pushes that fail one after another (the server is down, or refuses the queue)
        # are one outage: reported once, each lost message counted.
        self._pushing = Outage("worker-channel pushes")

    def bind(self, driver: Driver | SubscribingDriver) -> None:
        """Use ``driver`` from now on (the backplane starts with it)."""
        self._driver = cast(SupportsWorkerQueue, driver)

    async def run(self, driver: Driver | SubscribingDriver) -> None:
        """Serve worker channels through ``driver`` until cancelled (on the home loop)."""
        self.bind(driver)
        try:
            await asyncio.Event().wait()
        finally:
            self._driver = None
            tasks = [*self._fetchers.values(), *self._tasks]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._fetchers.clear()
            self._wanted.clear()

    # Sending

    def _item(self, channel: str, payload: Payload) -> tuple[str, float]:
        expires = time.time() + self._expiry
        return self._frames.frame(channel, payload, expires), expires

    async def push(self, channel: str, payload: Payload) -> bool:
        """Queue ``payload`` on ``channel``; False if it is full. Never raises for the
        backplane: a failure is reported (stage ``publish``) and the message counted as
        lost."""
        text, expires = self._item(channel, payload)
        capacity = self._capacity_for(channel)

        async def push() -> bool:
            return await self._queue().queue_push(channel, text, capacity, expires)

        try:
            pushed = await self._home.run(push)
        except Exception as exc:
            self._stats.incr("dropped.publish")
            self._reporter.failed(self._pushing, exc, "publish")
            return True
        self._pushing.end()
        self._stats.incr("published" if pushed else "dropped.full")
        return pushed

    def push_soon(self, channel: str, payload: Payload, dropped: Callable[[str], None]) -> None:
        """Queue a group's message on its member ``channel``, in the background;
        ``dropped(channel)`` if the queue is full."""
        text, expires = self._item(channel, payload)
        capacity = self._capacity_for(channel)

        async def push() -> None:
            if await self._queue().queue_push(channel, text, capacity, expires):
                self._stats.incr("published")
            else:
                dropped(channel)

        self._spawn(push, f"push to {channel!r}")

    def give_back(self, channel: str, item: Item) -> None:
        """Return what a cancelled receive held to the head of ``channel``'s queue."""
        payload = serialize.dumps(item.message) if isinstance(item, serialize.Template) else item
        text, _ = self._item(channel, payload)
        self.give_back_item(channel, text)

    def _queue(self) -> SupportsWorkerQueue:
        driver = self._driver
        if driver is None:
            raise RuntimeError("the backplane is not running")
        return driver

    def _spawn(self, make: Callable[[], Awaitable[None]], description: str) -> None:
        """Run ``make()`` on the home loop in the background; report what fails."""

        async def run() -> None:
            try:
                await make()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("%s failed", description, exc_info=exc)
                self._reporter.failed(self._pushing, exc, "publish")
            else:
                self._pushing.end()

        def start() -> None:
            if self._driver is not None:
                task = asyncio.get_running_loop().create_task(run())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        self._home.call_soon(start)

    # Receiving

    def want(self, channel: str) -> None:
        """A receiver waits on ``channel``: make sure it is fetched (from any thread)."""
        self._home.call_soon(self._start_fetcher, channel)

    def _start_fetcher(self, channel: str) -> None:
        wanted = self._wanted.get(channel)
        if wanted is not None:
            wanted.set()  # a fetcher lingers for this channel: tell it a receiver is back
            return
        driver = self._driver
        if driver is None:
            return
        self._wanted[channel] = asyncio.Event()
        self._fetchers[channel] = asyncio.get_running_loop().create_task(
            self._fetch(driver, channel)
        )

    async def _lingered(self, channel: str) -> bool:
        """Wait briefly for a receiver of ``channel`` to come back (a consumer that is
        busy with the previous message); False if none did."""
        wanted = self._wanted[channel]
        wanted.clear()
        if self._registry.has_waiters(channel):
            return True
        # The receiver just handed a message usually asks again within this turn of
        # the loop: look once more before paying for a timed wait.
        await asyncio.sleep(0)
        if self._registry.has_waiters(channel):
            return True
        try:
            await asyncio.wait_for(wanted.wait(), FETCHER_LINGER)
        except asyncio.TimeoutError:
            return self._registry.has_waiters(channel)
        return True

    async def _fetch(self, queue: SupportsWorkerQueue, channel: str) -> None:
        registry = self._registry
        backoff = Backoff()
        outage = Outage(f"queue {channel}")
        try:
            while registry.has_waiters(channel) or await self._lingered(channel):
                try:
                    item = await queue.queue_pop(channel, QUEUE_POP_TIMEOUT)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._reporter.failed(outage, exc, "subscribe")
                    await asyncio.sleep(backoff.next())
                    continue
                if outage.end() is not None:
                    backoff.reset()
                if item is not None and not self._take(channel, item):
                    # The receiver gave up while the item was on its way: put it back.
                    await queue.queue_return(channel, item)
        finally:
            if self._fetchers.get(channel) is asyncio.current_task():
                del self._fetchers[channel]
                self._wanted.pop(channel, None)
        # A receiver may have arrived just as this fetcher decided to stop.
        if registry.has_waiters(channel):
            self._start_fetcher(channel)

    def take_now(self, channel: str) -> bool:
        """Hand ``channel``'s waiting receiver an item the driver already has at hand
        (``SupportsQueueTake``), on the home loop; False if there is none (then
        :meth:`want` it)."""
        driver = self._driver
        if (
            driver is None
            or not capabilities(driver).take
            or asyncio.events._get_running_loop() is not self._home.loop
        ):
            return False
        taking = cast(SupportsQueueTake, driver)
        while True:
            item = taking.queue_take(channel)
            if item is None:
                return False
            if not self._take(channel, item):
                self.give_back_item(channel, item)
                return False
            if not self._registry.has_waiters(channel):
                return True  # handed over
            # Dropped (expired, malformed): the receiver still waits for another.

    def give_back_item(self, channel: str, item: str) -> None:
        """Put a queue item back at the head of ``channel``'s queue, in the background."""

        async def give_back() -> None:
            await self._queue().queue_return(channel, item)

        self._spawn(give_back, f"return an item to {channel!r}")

    def _take(self, channel: str, item: str) -> bool:
        """Hand an item popped from the queue to a waiting receiver; False to put it back."""
        sealer = self._frames.sealer
        opened = None
        if sealer is not None:
            try:
                opened = sealer.open(item)
            except Unauthenticated as exc:
                self._reporter.drop_unauthenticated(f"{exc} (an item of {channel!r})")
                return True
        envelope = decode_envelope(item)
        if envelope is None:
            self._reporter.drop_malformed(f"an item of {channel!r} that is not an envelope")
            return True
        if envelope.expires is not None and envelope.expires < time.time():
            self._stats.incr("dropped.expired")
            self._reporter.tally("expired", channel, "delivery", _expired, 1, [channel])
            return True
        msg = envelope.msg
        if opened is not None:
            assert sealer is not None
            if envelope.expires is None or msg.topic != channel:
                self._reporter.drop_unauthenticated(f"not an item of {channel!r}")
                return True
            try:
                data = sealer.data_of(opened, envelope.id, msg.topic, msg.data)
            except Unauthenticated as exc:
                self._reporter.drop_unauthenticated(f"{exc} (an item of {channel!r})")
                return True
            if data is not msg.data:
                msg = SyncMessage(msg.namespace, msg.topic, data)
        try:
            payload = relayed_template(msg)
        except ValueError as exc:
            self._reporter.drop_malformed(f"an item of {channel!r}: {exc}")
            return True
        guard = self._guard
        if opened is not None:
            assert envelope.expires is not None and guard is not None
            if not guard.delivered_stored(envelope.id, opened.number, envelope.expires):
                self._reporter.drop_unauthenticated(
                    f"replayed (an item of {channel!r})", "replayed"
                )
                return True
        if self._registry.put_if_wanted(channel, payload):
            self._stats.incr("delivered")
            return True
        if opened is not None and guard is not None:
            guard.forget_stored(envelope.id, opened.number)
        return False
