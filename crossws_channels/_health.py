"""Outages: a failure is reported once when it starts, its end is logged once.

Each part of the layer that talks to the backplane owns the outages it can have (the
subscription, publishing, each worker channel's queue) as :class:`Outage` objects, and
reports the first failure of each; :class:`Health` is what the heartbeat and
``stats()["connected"]`` look at.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger("crossws_channels")

__all__ = ["Health", "Outage"]


class Outage:
    """One thing that can be down (``what``, for the log)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._since: float | None = None
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self._since is not None

    def begin(self) -> bool:
        """A failure: True if it starts an outage (report it), False during one."""
        with self._lock:
            if self._since is not None:
                return False
            self._since = time.monotonic()
            return True

    def end(self) -> float | None:
        """A success: the outage's length if one was under way (and it is logged)."""
        with self._lock:
            since, self._since = self._since, None
        if since is None:
            return None
        duration = time.monotonic() - since
        logger.info("backplane %s restored after %.2fs", self.what, duration)
        return duration


class Health:
    """The outages that mean "this instance is cut off from the cluster"."""

    def __init__(self) -> None:
        self.subscription = Outage("subscription")
        self.publishing = Outage("publishing")

    def ok(self) -> bool:
        return not (self.subscription.active or self.publishing.active)
