"""Running one layer's driver on its home loop (``_home``), and stopping it cleanly.

While the backplane runs, these run on the home loop, each in a task of its own:

* the :class:`~crossws_channels._supervisor.Supervisor`, which keeps the subscription up
  and hands what arrives to the layer's inbound side (``_inbound``);
* the :class:`~crossws_channels._outbox.Outbox`'s flusher, which relays what the layer
  queues;
* worker channels' fetchers (``_workers``), when the driver has a shared queue;
* the layer's periodic *jobs*: its housekeeping and its heartbeat. A heartbeat that finds
  the subscription deaf raises ``DeafSubscription``: the backplane counts and reports it
  as a lost subscription and renews it.

When it stops (``close()``, or the home loop ending under it), it lets the flusher finish
the batch it is writing and relay what is queued (within a bound), then closes the
driver. If the home loop stopped without that, the next call starts afresh on a thread
with a new driver from the factory: the old driver's connections belong to a loop that
can no longer run them.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ._home import Home
from ._outbox import DRAIN_TIMEOUT, Outbox
from ._reporting import Stats
from ._supervisor import Supervisor
from ._workers import WorkerChannels
from .drivers.base import Deliver, Driver, DriverFactory, SubscribingDriver, capabilities
from .errors import DeafSubscription

logger = logging.getLogger("crossws_channels")

__all__ = ["Backplane", "Job"]

T = TypeVar("T")

Job = Callable[[], Awaitable[None]]
"""A coroutine function run on the home loop for as long as the backplane runs."""

# How long the first receivers wait for the first subscription attempt, so that a group
# joined right after start-up doesn't miss messages relayed a moment later.
FIRST_SUBSCRIBE_WAIT = 2.0
# A job that failed unexpectedly starts again after this long.
JOB_RESTART = 1.0

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
    """Runs one layer's driver on its home loop (see the module docstring)."""

    def __init__(
        self,
        *,
        home: Home,
        factory: DriverFactory,
        instance_id: str,
        options: Any,
        driver: Driver | SubscribingDriver,
        deliver: Deliver,
        outbox: Outbox,
        workers: WorkerChannels | None,
        jobs: Sequence[Job],
        stats: Stats,
    ) -> None:
        self._home = home
        self._factory = factory
        self._instance_id = instance_id
        self._options = options
        self._driver: Driver | SubscribingDriver | None = driver
        self._deliver = deliver
        self._outbox = outbox
        self._workers = workers
        self._jobs = tuple(jobs)
        self._stats = stats
        self._runner: asyncio.Future[None] | concurrent.futures.Future[None] | None = None
        self._stop: asyncio.Future[None] | None = None
        self._supervisor: Supervisor | None = None
        self._subscription: asyncio.Task[None] | None = None
        self._running = False
        self._tasks: set[asyncio.Task[None]] = set()  # renewals in flight
        self._restarting: asyncio.Task[None] | None = None
        # Mirrors the first attempt's future for settled(), which every receive calls: a
        # concurrent future's done() takes a lock.
        self._first_attempt_seen = False
        _live.add(self)

    # Starting

    @property
    def home(self) -> asyncio.AbstractEventLoop | None:
        return self._home.loop

    async def ensure(self) -> asyncio.AbstractEventLoop:
        """Start the backplane if it isn't running; return its home loop."""
        home = self._home.loop
        current = asyncio.get_running_loop()
        if home is not None and (home is current or (home.is_running() and not home.is_closed())):
            return home
        return self._start(current)

    def settled(self, current: asyncio.AbstractEventLoop) -> bool:
        """Running on a live home loop, past the first subscription attempt: a caller
        on loop ``current`` needn't wait for anything (every receive asks this)."""
        home = self._home.loop
        return (
            self._first_attempt_seen and home is not None and (home is current or home.is_running())
        )

    async def subscribed(self) -> None:
        """Wait (boundedly, and only at start-up) for the subscription to be in place."""
        await self.ensure()
        supervisor = self._supervisor
        if supervisor is None or self._first_attempt_seen:
            return
        attempt = supervisor.first_attempt
        if not attempt.done():
            try:
                await asyncio.wait_for(
                    asyncio.shield(asyncio.wrap_future(attempt)), FIRST_SUBSCRIBE_WAIT
                )
            except asyncio.TimeoutError:
                logger.warning(
                    "the backplane subscription is still not in place; not waiting longer"
                )
        self._first_attempt_seen = True

    def _start(self, current: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        home = self._home
        with home.lock:
            loop = home.loop
            if loop is not None:
                if loop is current or (loop.is_running() and not loop.is_closed()):
                    return loop
                # The home loop stopped without letting the backplane shut down (it was
                # closed with tasks pending, or is paused). Its connections can't be used
                # from here; start afresh on the thread.
                logger.warning("the backplane's event loop stopped; restarting it on a thread")
                self._driver = None
                home.prefer_thread = True
                home.loop = None
            driver = self._driver
            if driver is None:
                driver = self._driver = self._factory(self._instance_id, self._options)
            self._supervisor = Supervisor(driver, self._deliver)
            self._first_attempt_seen = False
            if self._workers is not None:
                self._workers.bind(driver)  # a send may come before the runner runs
            loop, on_thread = home.choose(current)
            home.loop = loop
            self._stop = loop.create_future()
            if on_thread:
                self._runner = asyncio.run_coroutine_threadsafe(self._run(driver, self._stop), loop)
            else:
                self._runner = loop.create_task(self._run(driver, self._stop))
            return loop

    # Running, on the home loop

    async def _run(self, driver: Driver | SubscribingDriver, stop: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        assert self._supervisor is not None
        self._running = True
        flusher = loop.create_task(self._outbox.run(driver))
        self._subscription = loop.create_task(self._supervisor.run())
        helpers = [loop.create_task(self._supervised(job)) for job in self._jobs]
        if self._workers is not None:
            helpers.append(loop.create_task(self._workers.run(driver)))
        ended = False
        try:
            await stop
        except asyncio.CancelledError:
            # The loop is shutting down under us (asyncio.run returned, a test ended).
            ended = True
            raise
        finally:
            self._running = False
            await self._stop_tasks([self._subscription, *helpers, *self._tasks])
            self._subscription = None
            # Let the flusher finish the batch it is writing, and what queued behind it:
            # cancelling a write that may be on the wire already would leave no choice
            # but to lose the batch or send it twice.
            self._outbox.finish()
            await asyncio.wait({flusher}, timeout=DRAIN_TIMEOUT)
            await self._stop_tasks([flusher])
            await self._outbox.drain(driver)
            try:
                await asyncio.wait_for(driver.close(), DRAIN_TIMEOUT)
            except Exception as exc:
                logger.warning("closing the backplane driver failed: %s", exc, exc_info=exc)
            home = self._home
            with home.lock:
                if home.loop is loop:
                    home.loop = None
                    self._driver = None
                    if ended:
                        home.prefer_thread = True

    @staticmethod
    async def _stop_tasks(tasks: list[asyncio.Task[Any]]) -> None:
        """Cancel ``tasks`` and wait for them, within a bound: a driver whose listen()
        ignores cancellation must not keep the layer from closing."""
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT)
        for task in pending:
            logger.warning("%r did not stop within %gs of being cancelled", task, DRAIN_TIMEOUT)

    async def _supervised(self, job: Job) -> None:
        while True:
            try:
                await job()
                return
            except asyncio.CancelledError:
                raise
            except DeafSubscription as exc:
                self._stats.incr("deaf")
                self._deliver.connection_lost(exc)
                self._renew()
            except Exception:
                logger.exception("a backplane background job failed; restarting it")
                await asyncio.sleep(JOB_RESTART)

    def _renew(self) -> None:
        """Subscribe again from scratch (on the home loop): the subscription is deaf."""
        driver, supervisor = self._driver, self._supervisor
        if driver is None or supervisor is None:
            return
        if not capabilities(driver).listens:
            # A driver that keeps its own subscription up can only be renewed whole.
            self.restart()
            return
        old = self._subscription

        async def renew() -> None:
            if old is not None:
                await self._stop_tasks([old])
            if self._running and self._subscription is old:
                self._subscription = asyncio.get_running_loop().create_task(supervisor.run())

        self._spawn(renew())

    def restart(self) -> None:
        """Close the driver and start again with a new one, on the home loop."""

        async def renew() -> None:
            await self._shutdown_here()
            self._start(asyncio.get_running_loop())

        def begin() -> None:
            # Not one of the runner's tasks: it outlives the runner it stops.
            self._restarting = asyncio.get_running_loop().create_task(renew())

        self._home.call_soon(begin)

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run ``work`` on the home loop (the caller is on it) until done or stopped."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Driver calls from any loop

    def publish_now(
        self, target: str | None, text: str, loop: asyncio.AbstractEventLoop | None
    ) -> bool:
        """Publish one envelope synchronously if the driver can take it so now (see
        ``Outbox.publish_now``); False, doing nothing, otherwise: then :meth:`publish`.
        ``loop``: the caller's running loop."""
        return self._outbox.publish_now(target, text, loop)

    async def publish(self, target: str | None, text: str) -> None:
        """Queue one envelope for relaying. Never raises for backplane failures."""
        if self._home.loop is not asyncio.get_running_loop():
            await self.ensure()
        await self._outbox.publish(target, text)

    async def call(self, operation: Callable[[Driver | SubscribingDriver], Awaitable[T]]) -> T:
        """Run ``operation(driver)`` on the home loop and return its result."""
        await self.ensure()

        async def run() -> T:
            driver = self._driver
            if driver is None:
                raise RuntimeError("the backplane is not running")
            return await operation(driver)

        return await self._home.run(run)

    # Stopping

    async def close(self) -> None:
        """Relay what is queued (bounded), close the driver, stop the thread if any."""
        home = self._home.loop
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
        thread = self._home.release_thread()
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.stop)

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
        home = self._home.loop
        thread = self._home.thread()
        if home is None or thread is None or not home.is_running():
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown_here(), home)
        try:
            future.result(timeout)
        except Exception:
            logger.debug("closing the backplane at exit failed", exc_info=True)
        thread.stop()
