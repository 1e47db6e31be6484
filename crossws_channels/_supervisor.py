"""The one reconnect loop: keeps a driver's subscription up, whatever the driver.

A driver's ``listen(deliver, ready)`` subscribes, calls ``ready()`` once the
subscription is in place, and delivers until the subscription is lost; then it returns
or raises. The :class:`Supervisor` calls it again after a :class:`Backoff`, for as long as
the layer runs, and tells the layer what happened through the same two calls a driver
of the older form (``subscribe``, which keeps its subscription alive by itself) makes:
``deliver.connection_lost(error)`` and ``deliver.connection_made()``. The layer turns
those into one report per outage, the counters, and the resync.

A driver of the older form is subscribed once (again with backoff until that works);
from then on it is its own supervisor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
from typing import cast

from .drivers.base import Deliver, Driver, SubscribingDriver, capabilities

logger = logging.getLogger("crossws_channels")

__all__ = ["Backoff", "SubscriptionEnded", "Supervisor"]


class Backoff:
    """Jittered exponential backoff: the pause before the next attempt.

    The first pause is at most ``initial`` seconds, each later one at most twice the one
    before, up to ``cap``; each is drawn from the upper half of its range, so instances
    that lost the server together do not come back in lockstep. The cap bounds how long
    an instance stays disconnected after the server answers again.
    """

    def __init__(self, initial: float = 0.05, cap: float = 1.0) -> None:
        self.initial = initial
        self.cap = cap
        self._limit = initial

    def next(self) -> float:
        delay = self._limit * random.uniform(0.5, 1.0)
        self._limit = min(self._limit * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._limit = self.initial


class SubscriptionEnded(ConnectionError):
    """A driver's ``listen()`` returned: its subscription ended without an error."""


class Supervisor:
    """Runs ``driver``'s subscription on the home loop (see the module docstring).

    :meth:`run` is the loop; cancelling its task ends the subscription (the backplane
    does that to stop, and to renew a deaf subscription with a new task).
    """

    def __init__(self, driver: Driver | SubscribingDriver, deliver: Deliver) -> None:
        self._driver = driver
        self._deliver = deliver
        self._backoff = Backoff()
        # Done once the first attempt succeeded or failed: receivers wait for it at
        # start-up (a concurrent future: they may wait from any thread).
        self.first_attempt: concurrent.futures.Future[None] = concurrent.futures.Future()

    async def run(self) -> None:
        """Subscribe and keep the subscription up; returns only when a driver of the
        older form has subscribed (it keeps itself up from then on)."""
        driver = self._driver
        listens = capabilities(driver).listens
        while True:
            try:
                if listens:
                    await cast(Driver, driver).listen(self._deliver, self._ready)
                    error: Exception = SubscriptionEnded("the driver's subscription ended")
                else:
                    await cast(SubscribingDriver, driver).subscribe(self._deliver)
                    self._ready()
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
            self._first_done()
            try:
                self._deliver.connection_lost(error)
            except Exception:
                logger.exception("deliver.connection_lost raised")
            await asyncio.sleep(self._backoff.next())

    def _ready(self) -> None:
        self._backoff.reset()
        self._first_done()
        try:
            self._deliver.connection_made()
        except Exception:
            logger.exception("deliver.connection_made raised")

    def _first_done(self) -> None:
        if not self.first_attempt.done():
            self.first_attempt.set_result(None)
