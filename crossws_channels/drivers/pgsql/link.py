"""A session of the pgsql driver's own, opened on first use and reopened after it broke."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .session import Opener, Session, retrieve

__all__ = ["Link", "StatementTimeout", "close_quietly", "first_line", "within"]

logger = logging.getLogger("crossws_channels.drivers.pgsql")

T = TypeVar("T")


class StatementTimeout(TimeoutError):
    """A statement got no answer within ``statement_timeout``; its connection is closed."""


async def within(
    session: Session, work: Awaitable[T], limit: float, what: str = "a statement"
) -> T:
    """``await work`` (statements on ``session``), or shut the session down and raise
    :class:`StatementTimeout` if it takes longer than ``limit`` seconds.

    A half-open connection (a dead NAT entry, a frozen server) never fails by itself:
    the statement would wait for TCP to give up, a quarter of an hour. Not
    ``asyncio.wait_for``: cancelling a statement in flight makes psycopg ask the server
    to cancel it and wait for that, over the same connection that hangs.
    """
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=limit)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(retrieve)
        raise
    if done:
        return task.result()
    task.add_done_callback(retrieve)
    session.abort()  # the statement fails now; the connection is freed once it has
    raise StatementTimeout(
        f"{what} got no answer from PostgreSQL within {limit:g} s (statement_timeout); "
        "the connection was closed"
    )


class Link:
    """A driver-owned session opened on first use and reopened after it breaks.

    One statement (or transaction) runs on it at a time; the lock keeps asyncpg, which
    refuses concurrent use, and psycopg transactions from interleaving.
    """

    def __init__(self, opener: Opener, limit: float) -> None:
        self._opener = opener
        self._limit = limit
        self._session: Session | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._stale = False
        self._closed = False

    async def run(self, op: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await op(session, *args)`` on this link's session."""
        if self._closed:
            raise RuntimeError("this pgsql driver is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Built on a loop that is gone: its session can only be dropped, not closed.
            if self._session is not None:
                self._session.abort()
                self._session = None
            self._lock = asyncio.Lock()
            self._loop = loop
        async with self._lock:
            if self._closed:
                raise RuntimeError("this pgsql driver is closed")
            session = await self._get()
            try:
                return await within(session, op(session, *args), self._limit)
            except StatementTimeout:
                self._session = None
                raise
            except asyncio.CancelledError:
                # The statement may be half-way through the protocol: never reuse it.
                # (It has returned: the session only frees the connection when idle.)
                self._session = None
                session.abort()
                raise
            except Exception:
                if not session.usable():
                    self._session = None
                    await close_quietly(session)
                raise

    async def _get(self) -> Session:
        session = self._session
        if session is not None and (self._stale or not session.usable()):
            self._session = None
            await close_quietly(session)
            session = None
        self._stale = False
        if session is None:
            session = await self._opener.open()
            self._session = session
        return session

    def invalidate(self) -> None:
        """Reconnect before the next statement (the server went away)."""
        self._stale = True

    async def close(self) -> None:
        # A statement may still run (close() waits for them only so long): the session
        # makes it fail first and frees the connection after it.
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await close_quietly(session)


async def close_quietly(session: Session) -> None:
    try:
        await session.close()
    except Exception as exc:
        logger.debug("closing a pgsql session failed: %s", exc)
        session.abort()


def first_line(error: BaseException) -> str:
    # libpq's messages run over several lines; a log line should not.
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
