"""Messages with sequence numbers, and the bookkeeping that finds losses and duplicates.

Every benchmark message carries ``seq``, its index in the run (warm-up messages have a
negative one). A receiver marks each ``(member, seq)`` it gets: a second mark is a
duplicate, an unmarked pair at the end a loss.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from .procs import Sync

STALL = 2.0
"""Seconds without progress after which a throttled sender stops waiting."""

PAD = "x" * 52
"""Pads a message to about 100 bytes serialized (``{"type": ..., "seq": ..., "pad": ...}``)."""


def message(seq: int) -> dict[str, Any]:
    return {"type": "bench.message", "seq": seq, "pad": PAD}


def raw_payload(seq: int) -> str:
    return json.dumps(message(seq))


class Tally:
    """Receipts of ``members`` receivers of ``size`` numbered messages each."""

    def __init__(self, members: int, size: int) -> None:
        self.size = size
        self.marks = [bytearray(size) for _ in range(members)]
        self.unique = 0
        self.duplicates = 0
        self.warm = 0
        self.first = 0.0
        self.last = 0.0

    def hit(self, member: int, seq: int) -> None:
        now = time.monotonic()
        if seq < 0:
            self.warm += 1
            return
        if not self.unique:
            self.first = now
        self.last = now
        marks = self.marks[member]
        if marks[seq]:
            self.duplicates += 1
            if marks[seq] < 255:
                marks[seq] += 1
        else:
            marks[seq] = 1
            self.unique += 1

    def counts(self, member: int, upto: int) -> bytes:
        """How often member received each of the first ``upto`` messages."""
        return bytes(self.marks[member][:upto])


async def wait_for_warm(tally: Tally, expected: int, timeout: float = 10.0) -> bool:
    """Wait until ``expected`` warm-up messages arrived; False if they did not."""
    deadline = time.monotonic() + timeout
    while tally.warm < expected:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def wait_until_done(
    tally: Tally,
    sync: Sync,
    slot: int,
    *,
    per_message: int = 1,
    idle: float = 2.0,
    grace: float = 0.2,
    limit: float = 600.0,
) -> None:
    """Receive until every message arrived (then ``grace`` more seconds of quiet, to catch
    duplicates), or until ``idle`` seconds pass without one once the sender is done.

    ``per_message`` is how many receipts one sent message makes here (group members).
    With several receivers, ``sync.progress`` adds up what they all received.
    """
    started = time.monotonic()
    while True:
        await asyncio.sleep(0.01)
        sync.progress[slot] = tally.unique
        now = time.monotonic()
        quiet = now - max(tally.last, started)
        sent = sync.sent.value
        if sent >= 0:
            if sync.received() >= sent * per_message and quiet >= grace:
                return
            if quiet >= idle:
                return
        if now - started > limit:
            return


async def throttle(
    sync: Sync, sent: int, per_message: int, window: int, stall: float = STALL
) -> None:
    """Flow control: keep the sender at most ``window`` receipts ahead of the receivers.

    Gives up after ``stall`` seconds without progress: messages that were lost never
    arrive, and waiting for them would hang the sender.
    """
    received = sync.received()
    since = time.monotonic()
    # The receivers' progress lives in shared memory: polling it is the cheapest signal.
    while sent * per_message - received > window:
        await asyncio.sleep(0.0005)
        now_received = sync.received()
        now = time.monotonic()
        if now_received != received:
            received, since = now_received, now
        elif now - since > stall:
            return


def rss_bytes() -> int:
    """This process's resident set size."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
