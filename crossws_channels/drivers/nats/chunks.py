"""Envelopes larger than the server's ``max_payload``, carried as several messages.

NATS refuses a message over ``max_payload`` (1 MiB by default), and an envelope can be
larger: a message of ``max_message_size`` bytes of binary data grows by a third in
base64. Such an envelope is published as consecutive parts on the same subject, each with
a header naming the whole (``<sender>.<number>``), its index and the count. A subscriber
sees one publisher's messages on a subject in order, so it only has to collect the parts
of each whole, which other publishers' messages may interleave with.

What a subscriber holds while collecting is bounded: at most :data:`MAX_PENDING` wholes
at once, at most :data:`MAX_BYTES` in all, each for at most :data:`PART_TIMEOUT` seconds;
past those the oldest incomplete whole is dropped (the layer never sees it, as if it was
lost on the way).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = ["HEADER", "Assembler", "split"]

logger = logging.getLogger("crossws_channels.drivers.nats")

HEADER = "Crossws-Part"
# Room left in each part for the header and the protocol line around it.
HEADER_ROOM = 512
MAX_PENDING = 64
MAX_BYTES = 64 * 1024 * 1024
PART_TIMEOUT = 30.0

_numbers = itertools.count(1)


def split(sender: str, data: bytes, limit: int) -> list[tuple[bytes, dict[str, str]]]:
    """``data`` as parts of at most ``limit`` bytes, each with its header."""
    size = max(1, limit - HEADER_ROOM)
    count = -(-len(data) // size)
    whole = f"{sender}.{next(_numbers)}"
    return [
        (data[i * size : (i + 1) * size], {HEADER: f"{whole} {i} {count}"}) for i in range(count)
    ]


@dataclass
class _Whole:
    count: int
    started: float
    parts: list[bytes] = field(default_factory=list)
    size: int = 0


class Assembler:
    """Collects parts into wholes (one per subscription side, on its event loop)."""

    def __init__(self) -> None:
        self._pending: OrderedDict[str, _Whole] = OrderedDict()
        self._bytes = 0
        self.dropped = 0

    def add(self, header: str, part: bytes) -> bytes | None:
        """The whole envelope once ``part`` completes it; None before (or if malformed)."""
        try:
            whole, index_text, count_text = header.split(" ")
            index, count = int(index_text), int(count_text)
        except ValueError:
            self._drop("a part with a malformed header")
            return None
        now = time.monotonic()
        self._expire(now)
        pending = self._pending.get(whole)
        if pending is None:
            if index != 0 or count < 2:
                return None  # the middle of a whole whose start this subscriber missed
            pending = self._pending[whole] = _Whole(count, now)
        elif index != len(pending.parts) or count != pending.count:
            self._forget(whole)
            self._drop("parts out of order")
            return None
        pending.parts.append(part)
        pending.size += len(part)
        self._bytes += len(part)
        if len(pending.parts) == pending.count:
            self._forget(whole)
            return b"".join(pending.parts)
        while self._pending and (len(self._pending) > MAX_PENDING or self._bytes > MAX_BYTES):
            self._forget(next(iter(self._pending)))
            self._drop("too much held in incomplete messages")
        return None

    def _expire(self, now: float) -> None:
        while self._pending:
            whole, pending = next(iter(self._pending.items()))
            if now - pending.started <= PART_TIMEOUT:
                return
            self._forget(whole)
            self._drop("a message whose parts stopped coming")

    def _forget(self, whole: str) -> None:
        pending = self._pending.pop(whole, None)
        if pending is not None:
            self._bytes -= pending.size

    def _drop(self, why: str) -> None:
        self.dropped += 1
        logger.debug("dropped an incomplete large message: %s", why)
