"""Upkeep of this instance's state, on the home loop: what expired, what is due.

Every quarter of ``expiry`` (at most every second): messages past their deadline are
dropped and reported, a channel whose message expired unread leaves its groups,
memberships older than ``group_expiry`` end (looked at less often), credit that freed room
owes is sent, and aggregated reports that are due are made.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic

from ._credits import Grants
from ._registry import Registry
from ._reporting import Reporter, Stats
from .errors import MessageExpired

logger = logging.getLogger("crossws_channels")

__all__ = ["Housekeeping"]

# How often memberships are checked against group_expiry.
GROUP_SWEEP_EVERY = 30.0


def _expired(subject: str | None, count: int, names: dict[str, int]) -> Exception:
    return MessageExpired(count, list(names))


class Housekeeping:
    """The periodic sweep (see the module docstring); :meth:`run` is a backplane job."""

    def __init__(
        self,
        registry: Registry,
        grants: Grants,
        stats: Stats,
        reporter: Reporter,
        *,
        expiry: float,
        group_expiry: float,
    ) -> None:
        self._registry = registry
        self._grants = grants
        self._stats = stats
        self._reporter = reporter
        self._group_expiry = group_expiry
        self.interval = max(0.05, min(1.0, expiry / 4))
        self._group_every = min(GROUP_SWEEP_EVERY, group_expiry / 4)
        self._next_group_sweep = monotonic() + self._group_every

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.sweep()
            except Exception:
                logger.exception("sweeping expired messages failed")

    def sweep(self) -> None:
        now = monotonic()
        group_expiry: float | None = None
        if now >= self._next_group_sweep:
            group_expiry = self._group_expiry
            self._next_group_sweep = now + self._group_every
        expired, credits = self._registry.sweep(group_expiry)
        self._grants.send(credits)
        if expired:
            total = sum(expired.values())
            self._stats.incr("dropped.expired", total)
            self._reporter.tally("expired", None, "delivery", _expired, total, expired)
        self._reporter.flush_due()
