"""Counting and reporting: the one funnel every backplane failure goes through.

Failures never raise into ``send``/``group_send``; they end here, in the ``on_error``
hook or, without one, in ``logging``. An outage (a broken subscription, a backplane that
refuses writes) is reported once when it starts (see ``_health``); the failures during it
are only counted (:meth:`Reporter.count`).

Events that can happen once per message (a drop for a full channel, an expiry, malformed
traffic, a gap in a sender's numbering) are *tallied*: counted exactly in ``stats()``, and
reported at most once per key (a group, a channel) per :data:`REPORT_INTERVAL`, each
report carrying the count since the previous one. A process that is falling behind must
not also spend its time writing one log line per message it could not deliver.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

from ._health import Outage
from .errors import ErrorHandler, MalformedMessage, Stage, UnauthenticatedMessage

logger = logging.getLogger("crossws_channels")

__all__ = ["HOME_COUNTS", "REPORT_INTERVAL", "HasLoop", "MakeReport", "Reporter", "Stats"]

REPORT_INTERVAL = 1.0
"""At most one report per tally key in this many seconds."""
# Keys tallied at once. Past this, events of a kind share one key (subject None), so
# traffic naming many groups or senders can't grow this state without bound.
MAX_TALLIES = 256
# Names (channels, senders, descriptions) a report lists; the count covers all of them.
MAX_NAMES = 8
# Reports kept for the status page, and how much of each one's text.
RECENT_REPORTS = 20
REPORT_TEXT = 300

MakeReport: TypeAlias = Callable[["str | None", int, "dict[str, int]"], Exception]
"""Builds the error of one report: ``make(subject, count, names)``, where ``names`` maps
up to :data:`MAX_NAMES` names to their share of ``count``; ``subject`` is ``None`` when
the key overflowed into its kind's shared one."""


def _malformed(subject: str | None, count: int, names: dict[str, int]) -> Exception:
    return MalformedMessage(f"{count} malformed message(s) dropped; " + "; ".join(names))


def _unauthenticated(subject: str | None, count: int, names: dict[str, int]) -> Exception:
    reasons = ", ".join(f"{reason} ({n})" for reason, n in names.items())
    return UnauthenticatedMessage(
        f"{count} backplane message(s) refused, not from a holder of the cluster's keys or "
        f"not new: {reasons}"
    )


@dataclass(slots=True)
class _Tally:
    stage: Stage
    make: MakeReport
    subject: str | None
    count: int = 0
    names: Counter[str] = field(default_factory=Counter)
    reported_at: float = float("-inf")

    def note(self, count: int, names: Iterable[str] | Mapping[str, int]) -> None:
        self.count += count
        shares: Iterable[tuple[str, int]]
        if isinstance(names, Mapping):
            shares = names.items()
        else:
            listed = list(names)
            # One name takes the whole count; several share it, one each.
            shares = [(listed[0], count)] if len(listed) == 1 else [(n, 1) for n in listed]
        for name, share in shares:
            if name in self.names or len(self.names) < MAX_NAMES:
                self.names[name] += share

    def take(self, now: float) -> Exception:
        error = self.make(self.subject, self.count, dict(self.names))
        self.count = 0
        self.names.clear()
        self.reported_at = now
        return error


# The counters bumped for every message relayed in or published from the home loop.
HOME_COUNTS = ("relayed_in", "delivered", "published")


class Stats:
    """Thread-safe counters; :meth:`snapshot` is what ``layer.stats()`` shows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self.home: dict[str, int] = dict.fromkeys(HOME_COUNTS, 0)
        """Bumped on the home loop's thread only, without a lock: what is counted per
        relayed message. A plain dict whose per-message counters are there from the
        start, so the relay adds to them in place (``home["delivered"] += n``)."""

    def incr(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def incr_home(self, name: str, amount: int = 1) -> None:
        """:meth:`incr` from the home loop's thread, and no other: no lock to take, for
        what is counted per relayed message."""
        home = self.home
        home[name] = home.get(name, 0) + amount

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._counts)
        for name, amount in list(self.home.items()):  # copied at once, under the GIL
            if amount:
                counts[name] = counts.get(name, 0) + amount
        return counts


class HasLoop(Protocol):
    """What knows the layer's home loop (``_home.Home``)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None: ...


class Reporter:
    """Calls the ``on_error`` hook (sync or async), or logs."""

    def __init__(self, hook: ErrorHandler | None, stats: Stats, home: HasLoop) -> None:
        self._hook = hook
        self._stats = stats
        # Where to run an async hook when the report comes from outside any loop.
        self._home = home
        self._lock = threading.Lock()
        self._pending: set[asyncio.Task[Any]] = set()
        self._tallies: dict[tuple[str, str | None], _Tally] = {}
        # The last reports made, for the status page (stats()["recent_reports"]).
        self._recent: deque[tuple[float, str, str, str]] = deque(maxlen=RECENT_REPORTS)

    def report(self, error: Exception, stage: Stage) -> None:
        """Hand ``error`` to the hook, or log it. Never raises."""
        self._stats.incr(f"errors.{stage}")
        self._hand_over(error, stage)

    def _hand_over(self, error: Exception, stage: Stage) -> None:
        with self._lock:
            self._recent.append((time.time(), stage, type(error).__name__, str(error)))
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

    def tally(
        self,
        kind: str,
        subject: str | None,
        stage: Stage,
        make: MakeReport,
        count: int = 1,
        names: Iterable[str] | Mapping[str, int] = (),
    ) -> None:
        """Count ``count`` events of ``kind`` about ``subject`` (a group, a channel) and
        report them, aggregated: at once if the key had no report within the interval,
        otherwise with the next report that :meth:`flush_due` makes. Never raises."""
        self._stats.incr(f"errors.{stage}", count)
        now = time.monotonic()
        with self._lock:
            tallies = self._tallies
            key = (kind, subject)
            entry = tallies.get(key)
            if entry is None:
                if len(tallies) >= MAX_TALLIES:
                    self._forget_idle(now)
                if len(tallies) >= MAX_TALLIES:
                    key = (kind, None)
                    entry = tallies.get(key)
                if entry is None:
                    entry = tallies[key] = _Tally(stage, make, key[1])
            entry.note(count, names)
            if now - entry.reported_at < REPORT_INTERVAL:
                return
            error = entry.take(now)
        self._hand_over(error, stage)

    def recent(self) -> list[dict[str, Any]]:
        """The last reports made, oldest first, each message cut to a few hundred characters."""
        with self._lock:
            recent = list(self._recent)
        return [
            {"time": when, "stage": stage, "error": kind, "message": text[:REPORT_TEXT]}
            for when, stage, kind, text in recent
        ]

    def flush_due(self, everything: bool = False) -> None:
        """Make the reports whose interval has passed (all pending ones, at close)."""
        now = time.monotonic()
        due: list[tuple[Exception, Stage]] = []
        with self._lock:
            for entry in self._tallies.values():
                if entry.count and (everything or now - entry.reported_at >= REPORT_INTERVAL):
                    due.append((entry.take(now), entry.stage))
            self._forget_idle(now)
        for error, stage in due:
            self._hand_over(error, stage)

    def _forget_idle(self, now: float) -> None:
        """Drop keys with nothing pending and no report within the interval."""
        idle = [
            key
            for key, entry in self._tallies.items()
            if not entry.count and now - entry.reported_at >= REPORT_INTERVAL
        ]
        for key in idle:
            del self._tallies[key]

    def drop_malformed(self, what: str, kind: str = "malformed") -> None:
        """Count (as ``dropped.<kind>``) and report (aggregated) backplane traffic that
        is dropped as malformed."""
        self._stats.incr(f"dropped.{kind}")
        self.tally(kind, None, "delivery", _malformed, 1, [what])

    def drop_unauthenticated(self, reason: str, kind: str = "unauthenticated") -> None:
        """Count (as ``dropped.<kind>``) and report (aggregated, by reason) traffic
        refused by ``signing_keys``/``encryption_keys``: unsigned, badly signed or
        replayed."""
        self._stats.incr(f"dropped.{kind}")
        self.tally("unauthenticated", None, "delivery", _unauthenticated, 1, [reason])

    def count(self, error: Exception, stage: Stage) -> None:
        """A failure during an outage that was reported when it began: counted only."""
        self._stats.incr(f"errors.{stage}")
        logger.debug("backplane %s still failing: %s", stage, error)

    def failed(self, outage: Outage, error: Exception, stage: Stage) -> None:
        """A failure of what ``outage`` watches: reported if it starts the outage,
        counted only while one is under way."""
        if outage.begin():
            self.report(error, stage)
        else:
            self.count(error, stage)

    def _schedule(self, awaitable: Any, stage: Stage) -> None:
        async def run() -> None:
            try:
                await awaitable
            except Exception:
                logger.exception("the on_error hook raised while handling a %s error", stage)

        loop = asyncio.events._get_running_loop()
        if loop is None:
            loop = self._home.loop
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
