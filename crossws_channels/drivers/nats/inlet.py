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

from crossws_channels.errors import BackplaneOverloaded

from ..base import Deliver
from .chunks import HEADER, Assembler

__all__ = ["Inlet"]

MAX_HELD = 1_000_000
MAX_HELD_BYTES = 256 * 1024 * 1024


class Inlet:
    """Delivers the relay's messages to the layer (see the module docstring)."""

    __slots__ = ("_assembler", "_bytes", "_deliver", "_held", "_lost", "dropped")

    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._assembler = Assembler()
        # Messages waiting for a pause to end; None while delivering as they come.
        self._held: deque[tuple[bytes, dict[str, str] | None]] | None = None
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
        if len(held) >= MAX_HELD or self._bytes + len(data) > MAX_HELD_BYTES:
            self.dropped += 1
            self._lost += 1
            return
        held.append((data, headers))
        self._bytes += len(data)

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

    def _hold(
        self, held: deque[tuple[bytes, dict[str, str] | None]], pause: asyncio.Future[None]
    ) -> None:
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
        while held:
            data, headers = held.popleft()
            self._bytes -= len(data)
            pause = self._deliver(data) if headers is None else self._whole(data, headers)
            if pause is not None:
                self._hold(held, pause)
                return
        self._bytes = 0
