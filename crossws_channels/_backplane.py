"""Where the driver runs: one event loop, its "home", whatever loop the caller is on.

Channels calls a layer from the server's loop, from ``async_to_sync`` in sync views
(which under an ASGI server runs on the server's loop, and elsewhere on a fresh loop per
call), from management commands and worker threads. Network clients are bound to the loop
that opened them, so the driver lives on exactly one loop:

* the first loop that uses the layer, when that loop lives on (a server's loop);
* otherwise a daemon thread with a loop of its own, started on demand. A loop made by
  ``async_to_sync`` for a single call never becomes home, and once a home loop has ended
  (``asyncio.run`` returned) the thread takes over for good.

Calls from the home loop go straight to the driver. Calls from elsewhere are handed over
thread-safely; nothing is ever bound to a caller's short-lived loop, so nothing leaks
per loop and nothing is delivered into a loop that is gone.

Outgoing messages queue in an outbox that one task drains in batches: ``group_send``
costs a local fan-out and an append, and whatever queued during one network round trip
goes out in the next.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import random
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from asgiref.sync import AsyncToSync

from ._reporting import Reporter, Stats
from .drivers.base import (
    Deliver,
    Driver,
    DriverFactory,
    SupportsBatch,
    SupportsDirect,
    SupportsWorkerQueue,
)
from .errors import BackplaneOverloaded

logger = logging.getLogger("crossws_channels")

__all__ = ["Backplane"]

T = TypeVar("T")

MAX_BATCH = 512
# Above this many queued messages, a producer on the home loop waits for the flusher.
HIGH_WATER = 2048
# A producer never waits longer than this for room; past it, the message is dropped.
ROOM_TIMEOUT = 5.0
# How long a caller on another loop waits to see its message written.
HANDOVER_TIMEOUT = 10.0
# Bound on the final flush when the layer closes or its loop ends.
DRAIN_TIMEOUT = 2.0
SUBSCRIBE_BACKOFF = (0.05, 5.0)
# How long the first receivers wait for the first subscription attempt, so that a group
# joined right after start-up doesn't miss messages relayed a moment later.
FIRST_SUBSCRIBE_WAIT = 2.0
QUEUE_POP_TIMEOUT = 1.0
# How long a worker channel's fetcher waits for its receiver to come back for the next
# message, instead of ending and being started again for every item.
FETCHER_LINGER = 1.0


@dataclass(slots=True)
class _Outgoing:
    target: str | None
    text: str
    done: concurrent.futures.Future[None] | None = None


_capabilities: dict[type, tuple[bool, bool]] = {}


def capabilities(driver: Driver) -> tuple[SupportsBatch | None, SupportsDirect | None]:
    """The driver as its batch and direct-send capabilities, if it has them.

    Checking a runtime protocol costs microseconds; the answer depends on the class only,
    so it is worked out once per class, not once per message.
    """
    kind = type(driver)
    known = _capabilities.get(kind)
    if known is None:
        known = _capabilities[kind] = (
            isinstance(driver, SupportsBatch),
            isinstance(driver, SupportsDirect),
        )
    return (
        cast(SupportsBatch, driver) if known[0] else None,
        cast(SupportsDirect, driver) if known[1] else None,
    )


def _throwaway(loop: asyncio.AbstractEventLoop) -> bool:
    """True for the loop ``async_to_sync`` makes for one call and closes right after."""
    return loop in getattr(AsyncToSync, "loop_thread_executors", {})


class _LoopThread:
    """A daemon thread running an event loop, home when no caller's loop can be."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="crossws-channels", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def stop(self) -> None:
        if not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:
                pass
        if threading.current_thread() is not self._thread:
            self._thread.join(5)


_live: weakref.WeakSet[Backplane] = weakref.WeakSet()


def _forget_after_fork() -> None:
    # A forked child has none of its parent's threads or loops: nothing to flush at exit.
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


@atexit.register
def _close_at_exit() -> None:
    # A management command that sends and exits must not lose what is still queued.
    for backplane in list(_live):
        backplane.close_from_thread(DRAIN_TIMEOUT)


class Backplane:
    """Runs one layer's driver on its home loop: subscription, outbox, queues, sweeps."""

    def __init__(
        self,
        *,
        instance_id: str,
        factory: DriverFactory,
        options: Any,
        driver: Driver,
        inbox: Deliver,
        reporter: Reporter,
        stats: Stats,
        sweep: Callable[[], None],
        sweep_interval: float,
        worker_wanted: Callable[[str], bool],
        worker_item: Callable[[str, str], bool],
        on_restored: Callable[[], None],
    ) -> None:
        self._instance_id = instance_id
        self._factory = factory
        self._options = options
        self._driver: Driver | None = driver
        self._inbox = inbox
        self._reporter = reporter
        self._stats = stats
        self._sweep = sweep
        self._sweep_interval = sweep_interval
        self._worker_wanted = worker_wanted
        self._worker_item = worker_item
        self._on_restored = on_restored
        self.shared_queues = isinstance(driver, SupportsWorkerQueue)

        self._lock = threading.Lock()
        self._home: asyncio.AbstractEventLoop | None = None
        self._thread: _LoopThread | None = None
        self._prefer_thread = False
        self._runner: asyncio.Future[None] | concurrent.futures.Future[None] | None = None
        self._stop: asyncio.Future[None] | None = None

        self._outbox: deque[_Outgoing] = deque()
        # Set when the backplane stops: the flusher sends what is queued, then ends.
        self._closing = False
        self._flusher_idle = False
        self._flusher_wake: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self._fetchers: dict[str, asyncio.Task[None]] = {}
        self._wanted: dict[str, asyncio.Event] = {}
        # Set once the first subscription attempt of the current run has finished.
        self._first_attempt: concurrent.futures.Future[None] = concurrent.futures.Future()
        # Mirrors _first_attempt.done() for settled(), which every receive calls: a
        # concurrent future's done() takes a lock.
        self._first_attempt_seen = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # Coroutines run on the home loop for as long as the backplane runs (heartbeat).
        self.periodic: list[Callable[[], Awaitable[None]]] = []
        _live.add(self)

    # Home loop

    @property
    def home(self) -> asyncio.AbstractEventLoop | None:
        return self._home

    async def ensure(self) -> asyncio.AbstractEventLoop:
        """Start the backplane if it isn't running; return its home loop."""
        home = self._home
        current = asyncio.get_running_loop()
        if home is not None and (home is current or (home.is_running() and not home.is_closed())):
            return home
        return self._start(current)

    def settled(self, current: asyncio.AbstractEventLoop) -> bool:
        """Running on a live home loop, past the first subscription attempt: a caller
        on loop ``current`` needn't wait for anything (every receive asks this)."""
        home = self._home
        return (
            self._first_attempt_seen and home is not None and (home is current or home.is_running())
        )

    async def subscribed(self) -> None:
        """Wait (boundedly, and only at start-up) for the subscription to be in place."""
        await self.ensure()
        attempt = self._first_attempt
        if attempt.done():
            return
        try:
            await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(attempt)), FIRST_SUBSCRIBE_WAIT
            )
        except asyncio.TimeoutError:
            logger.warning("the backplane subscription is still not in place; not waiting longer")
            self._first_attempt_done()

    def _start(self, current: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        with self._lock:
            home = self._home
            if home is not None:
                if home is current or (home.is_running() and not home.is_closed()):
                    return home
                # The home loop stopped without letting the backplane shut down (it was
                # closed with tasks pending, or is paused). Its connections can't be used
                # from here; start afresh on the thread.
                logger.warning("the backplane's event loop stopped; restarting it on a thread")
                self._driver = None
                self._prefer_thread = True
                self._home = None
            driver = self._driver
            if driver is None:
                driver = self._driver = self._factory(self._instance_id, self._options)
            if self._first_attempt.done():
                self._first_attempt = concurrent.futures.Future()
                self._first_attempt_seen = False
            if not self._prefer_thread and not _throwaway(current):
                home = current
                self._home = home
                self._stop = home.create_future()
                self._runner = current.create_task(self._run(driver, self._stop))
            else:
                if self._thread is None:
                    self._thread = _LoopThread()
                home = self._thread.loop
                self._home = home
                self._stop = home.create_future()
                self._runner = asyncio.run_coroutine_threadsafe(self._run(driver, self._stop), home)
            return home

    def _on_home(self) -> bool:
        return asyncio.events._get_running_loop() is self._home

    async def _run(self, driver: Driver, stop: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        self._closing = False
        flusher = loop.create_task(self._flush_forever(driver))
        sweeper = loop.create_task(self._sweep_forever())
        subscriber = loop.create_task(self._subscribe(driver))
        extras = [loop.create_task(self._supervised(job)) for job in self.periodic]
        ended = False
        try:
            await stop
        except asyncio.CancelledError:
            # The loop is shutting down under us (asyncio.run returned, a test ended).
            ended = True
            raise
        finally:
            helpers = [subscriber, sweeper, *extras, *self._fetchers.values()]
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            self._fetchers.clear()
            self._wanted.clear()
            # Let the flusher finish the batch it is writing, and what queued behind it:
            # cancelling a write that may be on the wire already would leave no choice
            # but to lose the batch or send it twice.
            self._closing = True
            self._wake_flusher()
            await asyncio.wait({flusher}, timeout=DRAIN_TIMEOUT)
            if not flusher.done():
                flusher.cancel()
                await asyncio.gather(flusher, return_exceptions=True)
            await self._drain(driver)
            try:
                await asyncio.wait_for(driver.close(), DRAIN_TIMEOUT)
            except Exception as exc:
                logger.warning("closing the backplane driver failed: %s", exc, exc_info=exc)
            with self._lock:
                if self._home is loop:
                    self._home = None
                    self._driver = None
                    if ended:
                        self._prefer_thread = True

    async def _subscribe(self, driver: Driver) -> None:
        delay, limit = SUBSCRIBE_BACKOFF
        while True:
            try:
                await driver.subscribe(self._inbox)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._reporter.outage_started("subscription", exc, "subscribe")
                self._first_attempt_done()
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, limit)
            else:
                self._stats.incr("subscribed")
                self._first_attempt_done()
                if self._reporter.outage_ended("subscription") is not None:
                    self._on_restored()
                return

    def _first_attempt_done(self) -> None:
        attempt = self._first_attempt
        if not attempt.done():
            attempt.set_result(None)
        self._first_attempt_seen = True

    async def _supervised(self, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await job()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("a backplane background job failed; restarting it")
                await asyncio.sleep(1.0)

    def restart(self) -> None:
        """Close the driver and subscribe again with a new one, on the home loop."""
        home = self._home
        if home is None:
            return

        async def renew() -> None:
            await self._shutdown_here()
            self._start(asyncio.get_running_loop())

        def begin() -> None:
            task = asyncio.get_running_loop().create_task(renew())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        if self._on_home():
            begin()
        else:
            try:
                home.call_soon_threadsafe(begin)
            except RuntimeError:
                pass

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                self._sweep()
            except Exception:
                logger.exception("sweeping expired messages failed")

    # Outbox

    async def publish(self, target: str | None, text: str) -> None:
        """Queue one envelope for relaying. Never raises for backplane failures."""
        home = await self.ensure()
        if asyncio.get_running_loop() is home:
            self._outbox.append(_Outgoing(target, text))
            self._wake_flusher()
            if len(self._outbox) >= HIGH_WATER:
                await self._wait_for_room()
            return
        # From another loop: hand over and wait until it's written, so that a command
        # or sync view that sends and then exits has really sent.
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._outbox.append(_Outgoing(target, text, done))
        try:
            home.call_soon_threadsafe(self._wake_flusher)
        except RuntimeError:
            return
        try:
            await asyncio.wait_for(asyncio.wrap_future(done), HANDOVER_TIMEOUT)
        except asyncio.TimeoutError:
            logger.warning(
                "a message waited %ss to be relayed; not waiting longer", HANDOVER_TIMEOUT
            )

    def post(self, target: str | None, text: str) -> None:
        """Queue one envelope for relaying, from any thread, without waiting (control
        traffic: credits). Dropped if the backplane is not running."""
        home = self._home
        if home is None:
            return
        self._outbox.append(_Outgoing(target, text))
        if self._on_home():
            self._wake_flusher()
        else:
            try:
                home.call_soon_threadsafe(self._wake_flusher)
            except RuntimeError:
                pass

    def _wake_flusher(self) -> None:
        if self._flusher_idle:
            self._flusher_idle = False
            wake = self._flusher_wake
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
            while len(self._outbox) >= HIGH_WATER:
                item = self._outbox.pop()
                if item.done is not None and not item.done.done():
                    item.done.set_result(None)
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

    async def _flush_forever(self, driver: Driver) -> None:
        loop = asyncio.get_running_loop()
        outbox = self._outbox
        while True:
            if not outbox:
                self._signal_room()
                if self._closing:
                    return
                self._flusher_wake = loop.create_future()
                self._flusher_idle = True
                if outbox:  # something arrived between the check and going idle
                    self._flusher_idle = False
                    continue
                await self._flusher_wake
                continue
            batch = [outbox.popleft() for _ in range(min(len(outbox), MAX_BATCH))]
            if len(outbox) < HIGH_WATER:
                self._signal_room()
            await self._send(driver, batch)

    async def _send(self, driver: Driver, batch: list[_Outgoing]) -> None:
        sent = 0
        batching, direct = capabilities(driver)
        try:
            if batching is not None and len(batch) > 1:
                await batching.publish_batch([(item.target, item.text) for item in batch])
                sent = len(batch)
            else:
                for item in batch:
                    if item.target is not None and direct is not None:
                        await direct.publish_to(item.target, item.text)
                    else:
                        await driver.publish(item.text)
                    sent += 1
        except asyncio.CancelledError:
            # The batch may be on the wire already: never send it again (at most once).
            self._stats.incr("dropped.publish", len(batch) - sent)
            raise
        except Exception as exc:
            self._stats.incr("dropped.publish", len(batch) - sent)
            self._reporter.outage_started("publishing", exc, "publish")
        else:
            self._reporter.outage_ended("publishing")
        finally:
            self._stats.incr("published", sent)
            for item in batch:
                if item.done is not None and not item.done.done():
                    item.done.set_result(None)

    async def _drain(self, driver: Driver) -> None:
        """Send what is still queued, within a bound, before the driver closes."""
        if not self._outbox:
            return

        async def drain() -> None:
            while self._outbox:
                batch = [self._outbox.popleft() for _ in range(min(len(self._outbox), MAX_BATCH))]
                await self._send(driver, batch)

        try:
            await asyncio.wait_for(drain(), DRAIN_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass
        if self._outbox:
            self._stats.incr("dropped.publish", len(self._outbox))
            logger.warning(
                "%d queued message(s) were not relayed before closing", len(self._outbox)
            )
            for item in self._outbox:
                if item.done is not None and not item.done.done():
                    item.done.set_result(None)
            self._outbox.clear()

    # Driver calls from any loop

    async def call(self, operation: Callable[[Driver], Awaitable[T]]) -> T:
        """Run ``operation(driver)`` on the home loop and return its result."""
        home = await self.ensure()
        if asyncio.get_running_loop() is home:
            return await self._call_here(operation)
        future = asyncio.run_coroutine_threadsafe(self._call_here(operation), home)
        return await asyncio.wrap_future(future)

    async def _call_here(self, operation: Callable[[Driver], Awaitable[T]]) -> T:
        driver = self._driver
        if driver is None:
            raise RuntimeError("the backplane is not running")
        return await operation(driver)

    def spawn(self, make: Callable[[Driver], Awaitable[Any]], description: str) -> None:
        """Run ``make(driver)`` on the home loop in the background; report failures."""
        home = self._home
        if home is None:
            return

        def start() -> None:
            driver = self._driver
            if driver is None:
                return

            async def run() -> None:
                try:
                    await make(driver)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    logger.debug("%s failed", description, exc_info=exc)
                    self._reporter.report(exc, "publish")

            task = asyncio.get_running_loop().create_task(run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        if self._on_home():
            start()
        else:
            try:
                home.call_soon_threadsafe(start)
            except RuntimeError:
                pass

    # Worker channels backed by the driver's shared queue

    def want(self, channel: str) -> None:
        """A receiver waits on worker channel ``channel``: make sure it is fetched."""
        home = self._home
        if home is None:
            return
        if self._on_home():
            self._start_fetcher(channel)
        else:
            try:
                home.call_soon_threadsafe(self._start_fetcher, channel)
            except RuntimeError:
                pass

    def _start_fetcher(self, channel: str) -> None:
        wanted = self._wanted.get(channel)
        if wanted is not None:
            wanted.set()  # a fetcher lingers for this channel: tell it a receiver is back
            return
        driver = self._driver
        if driver is None:
            return
        self._wanted[channel] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._fetch(driver, channel))
        self._fetchers[channel] = task

    async def _lingered(self, channel: str) -> bool:
        """Wait briefly for a receiver of ``channel`` to come back (a consumer that is
        busy with the previous message); False if none did."""
        wanted = self._wanted[channel]
        wanted.clear()
        if self._worker_wanted(channel):
            return True
        try:
            await asyncio.wait_for(wanted.wait(), FETCHER_LINGER)
        except asyncio.TimeoutError:
            return self._worker_wanted(channel)
        return True

    async def _fetch(self, driver: Driver, channel: str) -> None:
        queue = cast(SupportsWorkerQueue, driver)
        delay, limit = SUBSCRIBE_BACKOFF
        failing = False
        try:
            while self._worker_wanted(channel) or await self._lingered(channel):
                try:
                    item = await queue.queue_pop(channel, QUEUE_POP_TIMEOUT)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failing = True
                    self._reporter.outage_started(f"queue {channel}", exc, "subscribe")
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, limit)
                    continue
                if failing:
                    failing = False
                    delay = SUBSCRIBE_BACKOFF[0]
                    self._reporter.outage_ended(f"queue {channel}")
                if item is not None and not self._worker_item(channel, item):
                    # The receiver gave up while the item was on its way: put it back.
                    await queue.queue_return(channel, item)
        finally:
            if self._fetchers.get(channel) is asyncio.current_task():
                del self._fetchers[channel]
                self._wanted.pop(channel, None)
        # A receiver may have arrived just as this fetcher decided to stop.
        if self._worker_wanted(channel):
            self._start_fetcher(channel)

    # Shutdown

    async def close(self) -> None:
        """Flush what is queued (bounded), close the driver, stop the thread if any."""
        with self._lock:
            home = self._home
            thread = self._thread
            self._thread = None
        if home is not None:
            current = asyncio.get_running_loop()
            if home is current:
                await self._shutdown_here()
            elif home.is_running():
                future = asyncio.run_coroutine_threadsafe(self._shutdown_here(), home)
                try:
                    await asyncio.wait_for(asyncio.wrap_future(future), DRAIN_TIMEOUT * 2)
                except asyncio.TimeoutError:
                    logger.warning("the backplane did not shut down in time")
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.stop)
        with self._lock:
            self._prefer_thread = False

    async def _shutdown_here(self) -> None:
        stop = self._stop
        runner = self._runner
        if stop is not None and not stop.done():
            stop.set_result(None)
        if isinstance(runner, asyncio.Future):
            await asyncio.gather(runner, return_exceptions=True)
        elif isinstance(runner, concurrent.futures.Future):
            await asyncio.gather(asyncio.wrap_future(runner), return_exceptions=True)

    def close_from_thread(self, timeout: float) -> None:
        """Close from plain (non-async) code, such as an atexit hook."""
        with self._lock:
            home = self._home
            thread = self._thread
        if home is None or thread is None or not home.is_running():
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown_here(), home)
        try:
            future.result(timeout)
        except Exception:
            logger.debug("closing the backplane at exit failed", exc_info=True)
        thread.stop()
