"""A real ``Deliver`` for driver-level tests: it records what a driver hands the layer."""

from __future__ import annotations

import asyncio

from crossws_channels.envelope import Envelope, decode_envelope
from crossws_channels.errors import Stage


class Collector:
    """Collects raw deliveries, reports and connection events, and lets a test wait."""

    def __init__(self) -> None:
        self.raw: list[str | bytes] = []
        self.reports: list[tuple[Exception, Stage]] = []
        self.lost: list[Exception] = []
        self.made = 0
        self._changed = asyncio.Event()

    def __call__(self, raw: str | bytes, /) -> None:
        self.raw.append(raw)
        self._changed.set()

    def report(self, error: Exception, stage: Stage, /) -> None:
        self.reports.append((error, stage))
        self._changed.set()

    def connection_lost(self, error: Exception, /) -> None:
        self.lost.append(error)
        self._changed.set()

    def connection_made(self) -> None:
        self.made += 1
        self._changed.set()

    @property
    def envelopes(self) -> list[Envelope]:
        decoded = (decode_envelope(raw) for raw in self.raw)
        return [envelope for envelope in decoded if envelope is not None]

    async def wait_for(self, predicate: object, timeout: float = 5.0) -> None:
        """Wait until ``predicate(self)`` is true; fail the test after ``timeout``."""
        assert callable(predicate)

        async def until() -> None:
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), timeout)
