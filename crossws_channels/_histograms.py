"""Distributions a counter can't show: relay lag and group fan-out.

Each is a fixed set of bucket bounds and a count per bucket, cheap enough to observe on
every message (a bisection and an increment: under a lock, or on the home loop without
one). ``stats()["histograms"]`` shows them; the Prometheus export
(``crossws_channels.prometheus``) turns them into Prometheus histograms.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Any

__all__ = ["FANOUT_BOUNDS", "LAG_BOUNDS", "Histogram", "Histograms"]

# Seconds from the send in one process to the delivery into a channel in another: a
# local relay takes a fraction of a millisecond, a congested one seconds.
LAG_BOUNDS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Members of a group one instance delivered a group message to.
FANOUT_BOUNDS = (0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000)


class Histogram:
    """Counts of observations per bucket (``value <= bound``), their sum and number."""

    def __init__(self, bounds: tuple[float, ...], *, threads: bool = True) -> None:
        """``threads=False``: observed from the home loop's thread only (read from any),
        so :meth:`observe` takes no lock."""
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()
        # What the home loop's thread observed without the lock (observe_home); a
        # snapshot adds it in, and may see its sum a moment apart from its counts.
        self._home_counts = [0] * (len(bounds) + 1)
        self._home_sum = 0.0
        if not threads:
            self.observe = self.observe_home  # type: ignore[method-assign]

    def observe(self, value: float) -> None:
        index = bisect_left(self.bounds, value)
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def observe_home(self, value: float) -> None:
        """:meth:`observe` from the home loop's thread, and no other: no lock."""
        self._home_counts[bisect_left(self.bounds, value)] += 1
        self._home_sum += value

    def snapshot(self) -> dict[str, Any]:
        """``buckets``: [bound, cumulative count] pairs, "+Inf" last, as Prometheus has them."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        home = list(self._home_counts)
        counts = [a + b for a, b in zip(counts, home, strict=True)]
        total += self._home_sum
        buckets: list[list[Any]] = []
        running = 0
        for bound, count in zip((*self.bounds, "+Inf"), counts, strict=True):
            running += count
            buckets.append([bound, running])
        return {"buckets": buckets, "sum": total, "count": running}


class Histograms:
    """The layer's histograms, by name."""

    def __init__(self) -> None:
        # Observed by the backplane's subscription only, on the home loop: per message.
        self.relay_lag = Histogram(LAG_BOUNDS, threads=False)
        self.fanout = Histogram(FANOUT_BOUNDS)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            "relay_lag_seconds": self.relay_lag.snapshot(),
            "group_fanout": self.fanout.snapshot(),
        }
