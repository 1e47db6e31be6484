"""Running a driver's ``listen()`` in a driver-level test, the way the layer runs it.

:func:`listen` starts the layer's own supervisor over the driver (so reconnecting, with
the layer's backoff, is exercised for real) and returns once the first subscription is
in place, raising what made the first attempt fail, if it failed. The deliver it is
given sees what the layer would report: ``connection_lost`` once per outage (when an
established subscription broke, not for each failed attempt after that) and
``connection_made`` when it is back, so that a :class:`~tests.drivers.collector.Collector`
counts outages and recoveries. ``driver.close()`` stops the listening first, as the
layer does before it closes a driver.
"""

from __future__ import annotations

import asyncio
from typing import Any

from crossws_channels._supervisor import Supervisor
from crossws_channels.errors import Stage

__all__ = ["Listening", "listen"]


class _Watch:
    """Passes everything to ``deliver``, remembering how the first attempt went."""

    def __init__(self, deliver: Any) -> None:
        self._deliver = deliver
        self.made = 0
        self.first_error: Exception | None = None
        self._up = False

    def __call__(self, raw: str | bytes, /) -> asyncio.Future[None] | None:
        result: asyncio.Future[None] | None = self._deliver(raw)
        return result

    def report(self, error: Exception, stage: Stage, /) -> None:
        self._deliver.report(error, stage)

    def connection_lost(self, error: Exception, /) -> None:
        if not self.made and self.first_error is None:
            self.first_error = error
        if self._up:
            self._up = False
            self._deliver.connection_lost(error)

    def connection_made(self) -> None:
        self.made += 1
        self._up = True
        if self.made > 1:
            self._deliver.connection_made()


class Listening:
    """A driver listening under the supervisor; :meth:`close` stops and closes it."""

    def __init__(self, driver: Any, deliver: Any) -> None:
        self.driver = driver
        self._watch = _Watch(deliver)
        self._supervisor = Supervisor(driver, self._watch)
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 15.0) -> Listening:
        close = self.driver.close

        async def stop_then_close() -> None:
            await self.stop()
            await close()

        self.driver.close = stop_then_close
        self._task = asyncio.get_running_loop().create_task(self._supervisor.run())
        await asyncio.wait_for(asyncio.wrap_future(self._supervisor.first_attempt), timeout)
        error = self._watch.first_error
        if error is not None and not self._watch.made:
            await self.stop()
            raise error
        return self

    async def stop(self) -> None:
        """Stop listening (as the layer does before it closes the driver)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        await self.driver.close()

    async def __aenter__(self) -> Listening:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def listen(driver: Any, deliver: Any, timeout: float = 15.0) -> Listening:
    """``driver`` listening into ``deliver``, once subscribed (see the module docstring)."""
    return await Listening(driver, deliver).start(timeout)
