"""Waiting for a condition instead of sleeping for a guess: ``eventually()``.

Tests synchronise on what they can observe (a counter in ``stats()``, a receiver in
place), polling it, never on a fixed sleep that is too short on a slow machine and
wasted time on a fast one.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

__all__ = ["eventually", "eventually_async"]

T = TypeVar("T")
POLL = 0.02


def _poll(found: Callable[[], T], deadline: float, timeout: float, what: str) -> T | None:
    """``found()`` if truthy; None to poll again; AssertionError once past ``deadline``."""
    value = found()
    if value:
        return value
    if time.monotonic() > deadline:
        raise AssertionError(f"{what} did not happen within {timeout} s (last: {value!r})")
    return None


def eventually(found: Callable[[], T], timeout: float = 10.0, what: str = "the condition") -> T:
    """Call ``found`` until it returns something truthy, and return that; fail after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (value := _poll(found, deadline, timeout, what)) is None:
        time.sleep(POLL)
    return value


async def eventually_async(
    found: Callable[[], T | Awaitable[T]], timeout: float = 10.0, what: str = "the condition"
) -> T:
    """:func:`eventually` for a test running on an event loop; ``found`` may be a
    coroutine function (a query to a server, say)."""
    deadline = time.monotonic() + timeout
    while True:
        value = found()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return cast(T, value)
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s (last: {value!r})")
        await asyncio.sleep(POLL)
