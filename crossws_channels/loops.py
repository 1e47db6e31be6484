"""Helpers for code that waits on one event loop and is woken from another.

Channels calls a layer from many loops and threads at once, so a receiver may wait on
one loop while the message for it arrives on another. Drivers that keep queues of their
own (the ``local`` driver) need the same.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["wake"]


def _resolve(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


def wake(future: asyncio.Future[Any], current: asyncio.AbstractEventLoop | None) -> bool:
    """Resolve ``future`` (with ``None``) on whatever loop it belongs to, from loop
    ``current`` (``None``: no running loop); False if it is done or its loop is closed,
    so that nobody will ever run what waits on it."""
    if future.done():
        return False
    loop = future.get_loop()
    if loop is current:
        future.set_result(None)
        return True
    try:
        loop.call_soon_threadsafe(_resolve, future)
    except RuntimeError:
        return False
    return True
