"""Where the relay's subscriptions deliver: parts joined, backpressure honoured.

The driver's relay subscriptions (broadcast, this instance's subject, topics) share one
:class:`Inlet`, called by the protocol reader (:mod:`.reader`) with each message, in the
order the server sent them. When the layer asks the driver to hold back (``deliver``
returns a future, see :class:`~crossws_channels.drivers.base.Deliver`), the reader
can't stop reading: the same connection brings the worker channels' answers and the
server's PINGs. So what arrives meanwhile waits here, in order, and is delivered once
the future is done; past :data:`MAX_HELD` messages or :data:`MAX_HELD_BYTES` the newest
are dropped and reported (as nats-py does for a slow consumer).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import TypeAlias

from crossws_channels.errors import BackplaneOverloaded

from ..base import Deliver
from .chunks import HEADER, Assembler
from .reader import Runs

__all__ = ["Inlet"]

MAX_HELD = 1_000_000
MAX_HELD_BYTES = 256 * 1024 * 1024

# One held message: its data, or its data and headers.
Held: TypeAlias = bytes | tuple[bytes, dict[str, str]]


class Inlet(Runs):
    """Delivers the relay's messages to the layer (see the module docstring)."""

    __slots__ = ("_assembler", "_bytes", "_deliver", "_held", "_lost", "dropped")

    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._assembler = Assembler()
        # Messages waiting for a pause to end (their data, or data and headers); None
        # while delivering as they come.
        self._held: deque[Held] | None = None
        self._bytes = 0
        self._lost = 0  # dropped during this pause, reported when it ends
        self.dropped = 0

    def __call__(
        self, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> None:
        held = self._held
        if held is None:
            pause = self._deliver(data) if headers is None else self._whole(data, headers)
            if pause is not None:
                self._hold(deque(), pause)
            return
        self._keep([data if headers is None else (data, headers)], len(data))

    def run(self, payloads: list[bytes]) -> None:
        """Consecutive messages without headers: delivered until the layer pauses, the
        rest held (in one step, however many)."""
        if self._held is None:
            deliver = self._deliver
            for index, data in enumerate(payloads):
                pause = deliver(data)
                if pause is not None:
                    self._hold(deque(), pause)
                    rest = payloads[index + 1 :]
                    if rest:
                        self._keep(rest, sum(map(len, rest)))
                    return
            return
        self._keep(payloads, sum(map(len, payloads)))

    def _keep(self, items: Sequence[Held], size: int) -> None:
        """Hold ``items`` (``size`` bytes) until the pause ends, within the bounds."""
        held = self._held
        assert held is not None
        room = MAX_HELD - len(held)
        if len(items) > room or self._bytes + size > MAX_HELD_BYTES:
            for item in items:  # as many as fit, the newest dropped
                data = item if isinstance(item, bytes) else item[0]
                if len(held) >= MAX_HELD or self._bytes + len(data) > MAX_HELD_BYTES:
                    self.dropped += 1
                    self._lost += 1
                    continue
                held.append(item)
                self._bytes += len(data)
            return
        held.extend(items)
        self._bytes += size

    @property
    def holding(self) -> int:
        """How many messages wait for a pause to end."""
        return 0 if self._held is None else len(self._held)

    def _whole(self, data: bytes, headers: dict[str, str]) -> asyncio.Future[None] | None:
        part = headers.get(HEADER)
        if part is not None:
            whole = self._assembler.add(part, data)
            if whole is None:
                return None
            data = whole
        return self._deliver(data)

    def _hold(self, held: deque[Held], pause: asyncio.Future[None]) -> None:
        self._held = held
        pause.add_done_callback(self._resume)

    def _resume(self, _: object) -> None:
        held = self._held
        self._held = None
        if self._lost:
            lost, self._lost = self._lost, 0
            self._deliver.report(
                BackplaneOverloaded(
                    f"{lost} message(s) arrived while the layer held the backplane back, "
                    f"past the {MAX_HELD} (or {MAX_HELD_BYTES} bytes) that may wait: dropped"
                ),
                "delivery",
            )
        if held is None:
            return
        deliver = self._deliver
        while held:
            item = held.popleft()
            if isinstance(item, bytes):
                self._bytes -= len(item)
                pause = deliver(item)
            else:
                data, headers = item
                self._bytes -= len(data)
                pause = self._whole(data, headers)
            if pause is not None:
                self._hold(held, pause)
                return
        self._bytes = 0
