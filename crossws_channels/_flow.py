"""Backpressure from this instance's channels to the backplane's subscription.

A driver reads the backplane in chunks: one socket read can bring hundreds of envelopes,
and the driver delivers them all before any consumer on the loop gets to run. Applying
``capacity`` inside such a chunk would drop most of a burst for a consumer that reads as
fast as it can. So when a relayed group message finds a member at capacity:

* if that member's consumer is *reading* (a ``receive()`` is waiting, or one was called
  within the last ``backpressure`` seconds) and is not stalled, the message goes in over
  capacity and ``deliver`` returns a :class:`Pause`'s future: the driver reads nothing
  more until every member the pause names has drained to half its capacity, and the
  transport holds the rest (the socket, the server's output buffer, the relay);
* a pause lasts at most ``backpressure`` seconds, so one consumer can't hold up the
  other channels of its process for longer. A member still full then is *stalled*: until
  it drains to half its capacity, messages beyond its capacity are dropped and reported,
  as they are for a member that is not reading at all.

A driver that ignores the future keeps delivering; while a pause is pending, a full
member then drops as if backpressure were off, so memory stays bounded either way.

Everything here runs under the registry's lock (``hold``, ``release``) or on the home
loop (``finish``, the pause's timer).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING

from ._reporting import Reporter, Stats
from .errors import ChannelStalled

if TYPE_CHECKING:
    from ._registry import Mailbox

__all__ = ["InboundFlow", "Pause"]


def _stalled_report(subject: str | None, count: int, names: dict[str, int]) -> Exception:
    return ChannelStalled(count, list(names))


class Pause:
    """One pause of the inbound flow: ``future`` resolves when it is over."""

    __slots__ = ("_flow", "_timer", "boxes", "future", "held", "loop")

    def __init__(self, flow: InboundFlow, loop: asyncio.AbstractEventLoop) -> None:
        self._flow = flow
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.boxes: list[Mailbox] = []
        self.held = 0
        self._timer: asyncio.TimerHandle | None = None

    def release(self, box: Mailbox) -> None:
        """``box`` has room again (or is gone). Called under the registry's lock, on any
        thread."""
        box.gate = None
        self.held -= 1
        if self.held <= 0:
            if asyncio.events._get_running_loop() is self.loop:
                self._open()
            else:
                try:
                    self.loop.call_soon_threadsafe(self._open)
                except RuntimeError:
                    pass  # the home loop is closed: nobody waits on this pause any more

    def _open(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        flow = self._flow
        if flow.pending is self:
            flow.pending = None
            flow.resumed_at = time.monotonic()
        if not self.future.done():
            self.future.set_result(None)

    def _expire(self) -> None:
        """The pause ran out: members still full are stalled, and relaying resumes."""
        self._timer = None
        flow = self._flow
        with flow.lock:
            stalled = [box for box in self.boxes if box.gate is self]
            for box in stalled:
                box.gate = None
                box.stalled = True
            self.held = 0
        self._open()
        if stalled:
            flow.stats.incr("stalled", len(stalled))
            flow.reporter.tally(
                "stalled",
                None,
                "delivery",
                _stalled_report,
                len(stalled),
                [box.name for box in stalled],
            )


class InboundFlow:
    """The backpressure policy of one layer instance (see the module docstring)."""

    def __init__(
        self, limit: float, lock: threading.Lock, reporter: Reporter, stats: Stats
    ) -> None:
        self.limit = limit
        """Seconds a pause may last, and how recently a consumer must have called
        ``receive()`` to count as reading; 0 turns backpressure off."""
        self.lock = lock
        self.reporter = reporter
        self.stats = stats
        self.pending: Pause | None = None
        """The pause handed to the driver and not over yet."""
        self.resumed_at = float("-inf")
        self.forming: Pause | None = None
        """The pause this delivery's full members wait for, until :meth:`finish`."""

    def may_overflow(self, box: Mailbox, now: float) -> bool:
        """Whether a relayed message may go into the full ``box`` (under the lock)."""
        return (
            self.pending is None
            and not box.stalled
            and (bool(box.waiters) or now - box.last_read <= self.limit)
            and self.limit > 0
        )

    def hold(self, box: Mailbox) -> None:
        """``box`` went over capacity: the pause being formed waits for it (under the
        lock, on the home loop)."""
        pause = self.forming
        if pause is None:
            pause = self.forming = Pause(self, asyncio.get_running_loop())
        if box.gate is None:
            box.gate = pause
            pause.boxes.append(box)
            pause.held += 1

    def finish(self) -> asyncio.Future[None] | None:
        """After one delivery: the future the driver must wait for, if it must."""
        pause = self.forming
        if pause is None:
            return None
        self.forming = None
        if pause.future.done() or pause.held <= 0:
            return None
        self.pending = pause
        pause._timer = pause.loop.call_later(self.limit, pause._expire)
        self.stats.incr("paused")
        return pause.future

    def paused_since(self, moment: float) -> bool:
        """Whether relaying was paused at any time since ``moment`` (``monotonic()``)."""
        return self.pending is not None or self.resumed_at >= moment
