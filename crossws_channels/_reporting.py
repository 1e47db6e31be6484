"""Counting and reporting: the one funnel every backplane failure goes through.

Failures never raise into ``send``/``group_send``; they end here, in the ``on_error``
hook or, without one, in ``logging``. An outage (a broken subscription, a backplane that
refuses writes) is reported once when it starts, not once per failed message, and its
end is logged.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from .errors import ErrorHandler, Stage

logger = logging.getLogger("crossws_channels")

__all__ = ["Reporter", "Stats"]


class Stats:
    """Thread-safe counters; :meth:`snapshot` is what ``layer.stats()`` shows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def incr(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def get(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


class Reporter:
    """Calls the ``on_error`` hook (sync or async), or logs, and tracks outages."""

    def __init__(
        self,
        hook: ErrorHandler | None,
        stats: Stats,
        home_loop: Callable[[], asyncio.AbstractEventLoop | None],
    ) -> None:
        self._hook = hook
        self._stats = stats
        self._home_loop = home_loop
        self._outages: dict[str, float] = {}
        self._lock = threading.Lock()
        self._pending: set[asyncio.Task[Any]] = set()
        # Rate limit for reports that can come in floods (malformed traffic).
        self._last_flood_report: dict[str, float] = {}
        self._flood_suppressed: Counter[str] = Counter()

    def report(self, error: Exception, stage: Stage) -> None:
        """Hand ``error`` to the hook, or log it. Never raises."""
        self._stats.incr(f"errors.{stage}")
        if self._hook is None:
            logger.warning("backplane %s failed: %s", stage, error, exc_info=error)
            return
        try:
            result = self._hook(error, stage)
        except Exception:
            logger.exception("the on_error hook raised while handling a %s error", stage)
            return
        if inspect.isawaitable(result):
            self._schedule(result, stage)

    def report_flood(self, key: str, error: Exception, stage: Stage, interval: float = 1.0) -> None:
        """Report ``error`` unless one of the same ``key`` was reported within ``interval``."""
        now = time.monotonic()
        with self._lock:
            last = self._last_flood_report.get(key)
            if last is not None and now - last < interval:
                self._flood_suppressed[key] += 1
                self._stats.incr(f"errors.{stage}")
                return
            self._last_flood_report[key] = now
            suppressed = self._flood_suppressed.pop(key, 0)
        if suppressed:
            logger.warning("%d more %s reports were suppressed in the last second", suppressed, key)
        self.report(error, stage)

    def outage_started(self, key: str, error: Exception, stage: Stage) -> bool:
        """Report the first failure of an outage; later ones only count. True if new."""
        with self._lock:
            new = key not in self._outages
            if new:
                self._outages[key] = time.monotonic()
        if new:
            self.report(error, stage)
        else:
            self._stats.incr(f"errors.{stage}")
            logger.debug("backplane %s still failing: %s", stage, error)
        return new

    def outage_ended(self, key: str) -> float | None:
        """End the outage ``key`` if one is under way; return how long it lasted."""
        with self._lock:
            started = self._outages.pop(key, None)
        if started is None:
            return None
        duration = time.monotonic() - started
        logger.info("backplane %s restored after %.2fs", key, duration)
        return duration

    def in_outage(self, key: str) -> bool:
        with self._lock:
            return key in self._outages

    def _schedule(self, awaitable: Any, stage: Stage) -> None:
        async def run() -> None:
            try:
                await awaitable
            except Exception:
                logger.exception("the on_error hook raised while handling a %s error", stage)

        loop = asyncio.events._get_running_loop()
        if loop is None:
            loop = self._home_loop()
            if loop is None or loop.is_closed():
                logger.warning("no event loop to run the async on_error hook for a %s error", stage)
                if inspect.iscoroutine(awaitable):
                    awaitable.close()
                return
            asyncio.run_coroutine_threadsafe(run(), loop)
            return
        task = loop.create_task(run())
        # Keep a reference: the loop only holds tasks weakly.
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
