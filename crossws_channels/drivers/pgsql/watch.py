"""Watching PostgreSQL's notification queue, which every NOTIFY of the server shares.

A listener that stops reading (a session idle in a long transaction, a process stuck)
holds back the queue for everyone: it fills (8 GB by default), and then every NOTIFY of
every application on the server fails. ``pg_notification_queue_usage()`` says how full it
is; past one half the driver reports :class:`NotificationQueueFilling` once, and again only
after it came back below a quarter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from crossws_channels.errors import NotificationQueueFilling, Stage

from .link import Link
from .tables import fetch

__all__ = ["QueueWatch"]

logger = logging.getLogger("crossws_channels.drivers.pgsql")

QUEUE_USAGE = "SELECT pg_catalog.pg_notification_queue_usage()"
WARN_ABOVE = 0.5
CLEAR_BELOW = 0.25


class QueueWatch:
    """Reports a notification queue past :data:`WARN_ABOVE` (see the module docstring)."""

    def __init__(self, link: Link, interval: float) -> None:
        self._link = link
        self._interval = interval
        self._warned = False
        self.usage: float | None = None

    async def run(self, report: Callable[[Exception, Stage], None]) -> None:
        """Look every ``interval`` seconds until cancelled."""
        while True:
            try:
                rows = await self._link.run(fetch, QUEUE_USAGE)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The publishing side reports a server that fails; this only looks.
                logger.debug("reading the notification queue's usage failed: %s", exc)
            else:
                self.observe(float(rows[0][0]), report)
            await asyncio.sleep(self._interval)

    def observe(self, usage: float, report: Callable[[Exception, Stage], None]) -> None:
        self.usage = usage
        if usage > WARN_ABOVE and not self._warned:
            self._warned = True
            report(
                NotificationQueueFilling(
                    f"PostgreSQL's notification queue is {usage:.0%} full: a session that "
                    "LISTENs without reading (often one idle in a long transaction; see "
                    "pg_stat_activity) holds it back, and once it is full every NOTIFY on "
                    "the server fails"
                ),
                "subscribe",
            )
        elif usage < CLEAR_BELOW:
            self._warned = False
