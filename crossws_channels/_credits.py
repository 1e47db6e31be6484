"""Flow control for ``send()`` to a channel another instance owns.

Channels' contract is that ``send`` raises ``ChannelFull`` when the channel is full. A
channel of another instance can't be looked at from here, so the sender keeps a *window*
per remote channel: how many more messages the owner has room for.

* Every direct message carries a number (the envelope's ``seq``, counted per sending
  instance). The window starts at the channel's capacity and shrinks by one per send.
* When it falls to half the capacity, the next message asks for credit (``"ask":true``).
  The owner answers once the channel has drained to half its capacity: a ``!credit``
  naming the highest number it has seen from this sender on that channel and the room it
  has now. Messages sent after that number are still on their way and count against
  the room.
* A send that finds no room sends a ``!ask`` probe (which also tells the owner the
  highest number sent, so messages lost in transit stop counting) and waits up to
  ``backpressure`` seconds for credit; then it raises ``ChannelFull``, and later sends
  raise at once until credit comes. They probe again, at most once per
  ``backpressure``, and the owner answers once the channel has drained.

So a message ``send`` accepted is taken by the owner even beyond capacity, because its
window said there was room; the owner only refuses what no window allowed (several
senders bursting at once, traffic from elsewhere), at four times the capacity.

In steady state this costs one ``!credit`` per half a capacity's worth of messages, and
nothing extra on the hot path: the ask rides on a message that was going anyway.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from channels.exceptions import ChannelFull

from .loops import wake

if TYPE_CHECKING:
    from ._frames import Frames
    from ._outbox import Outbox
    from ._registry import Credit

__all__ = ["CREDIT", "PROBE", "Grants", "SendWindows"]

CREDIT = "!credit"
PROBE = "!ask"
# Windows remembered; the least recently used one without a waiting sender goes first.
MAX_WINDOWS = 4096


class _Window:
    __slots__ = ("asked", "last_sent", "outstanding", "probed_at", "room", "stalled", "waiters")

    def __init__(self, capacity: int) -> None:
        self.room = capacity
        # Numbers sent that the owner had not seen at its last credit, oldest first.
        self.outstanding: deque[int] = deque()
        self.last_sent = 0
        self.asked = False  # a credit is asked for and not yet come
        self.probed_at = float("-inf")
        self.stalled = False  # waited for credit in vain: raise at once until it comes
        self.waiters: list[asyncio.Future[None]] = []


class SendWindows:
    """This instance's windows onto remote channels (any thread, any loop)."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self._lock = threading.Lock()
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._numbers = itertools.count(1)

    async def reserve(
        self, channel: str, capacity: int, probe: Callable[[int], Awaitable[None]]
    ) -> tuple[int, bool]:
        """Take one message's room on ``channel``: its number, and whether it asks for
        credit. Waits for credit if there is no room (sending ``probe(last number)``),
        and raises ``ChannelFull`` if none comes in time."""
        loop: asyncio.AbstractEventLoop | None = None
        deadline = 0.0
        while True:
            now = time.monotonic()
            with self._lock:
                window = self._window(channel, capacity)
                available = window.room - len(window.outstanding)
                if available > 0:
                    number = next(self._numbers)
                    window.outstanding.append(number)
                    window.last_sent = number
                    ask = not window.asked and available - 1 <= capacity // 2
                    if ask:
                        window.asked = True
                    return number, ask
                send_probe = now - window.probed_at >= self.wait
                if send_probe:
                    window.probed_at = now
                    window.asked = True
                last = window.last_sent
                waiter: asyncio.Future[None] | None = None
                if not window.stalled:
                    if loop is None:
                        loop = asyncio.get_running_loop()
                        deadline = now + self.wait
                    waiter = loop.create_future()
                    window.waiters.append(waiter)
            if send_probe:
                await probe(last)
            if waiter is None:
                raise ChannelFull(channel)
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:
                with self._lock:
                    window.stalled = True
                    window.probed_at = time.monotonic()
                    if waiter in window.waiters:
                        window.waiters.remove(waiter)
                raise ChannelFull(channel) from None
            except asyncio.CancelledError:
                with self._lock:
                    if waiter in window.waiters:
                        window.waiters.remove(waiter)
                raise

    def credit(self, channel: str, seen: int, room: int) -> None:
        """The owner of ``channel`` has seen our numbers up to ``seen`` and has ``room``."""
        current = asyncio.events._get_running_loop()
        with self._lock:
            window = self._windows.get(channel)
            if window is None:
                return
            outstanding = window.outstanding
            while outstanding and outstanding[0] <= seen:
                outstanding.popleft()
            window.room = room
            window.asked = False
            window.stalled = False
            window.probed_at = float("-inf")
            waiters, window.waiters = window.waiters, []
        for waiter in waiters:
            wake(waiter, current)

    def _window(self, channel: str, capacity: int) -> _Window:
        windows = self._windows
        window = windows.get(channel)
        if window is not None:
            windows.move_to_end(channel)
            return window
        if len(windows) >= MAX_WINDOWS:
            for name, old in windows.items():
                if not old.waiters:
                    del windows[name]
                    break
        window = windows[channel] = _Window(capacity)
        return window


class Grants:
    """The owner's side: sends the credits this instance's channels owe their senders."""

    def __init__(self, frames: Frames, outbox: Outbox) -> None:
        self._frames = frames
        self._outbox = outbox

    def send(self, credits: list[Credit] | None) -> None:
        """Relay ``credits`` (from any thread); nothing if there are none."""
        for sender, channel, seen, room in credits or ():
            frame = self._frames.frame(CREDIT, json.dumps([sender, channel, seen, room]))
            self._outbox.post(sender, frame)
