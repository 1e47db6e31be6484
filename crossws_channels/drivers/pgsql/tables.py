"""The cluster's tables (worker queues, large messages) and push function, made on demand.

They are created the first time a statement needs them, and again if someone dropped
them since: a statement that fails because one is missing failed as a whole, so running
it again after creating them can't do anything twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .session import Session, sqlstate
from .sql import DDL_LOCK, OBJECTS_EXIST, Statements

__all__ = ["MISSING", "Tables"]

T = TypeVar("T")

UNDEFINED_TABLE = "42P01"
UNDEFINED_FUNCTION = "42883"
# A table or the push function is missing (never created, or dropped by hand).
MISSING = frozenset({UNDEFINED_TABLE, UNDEFINED_FUNCTION})


class Tables:
    """Runs statements that need the cluster's tables, creating them first if need be."""

    def __init__(self, sql: Statements) -> None:
        self._sql = sql
        self._ready = False

    async def run(self, session: Session, op: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await op(session, *args)``, with the tables and function in place."""
        if not self._ready:
            await self._create(session)
        try:
            return await op(session, *args)
        except Exception as exc:
            if sqlstate(exc) not in MISSING:
                raise
        await self._create(session)
        return await op(session, *args)

    async def _create(self, session: Session) -> None:
        sql = self._sql
        async with session.transaction():
            await session.execute(DDL_LOCK)
            rows = await session.fetch(OBJECTS_EXIST, sql.queue, sql.large, sql.push_signature)
            queue_exists, large_exists, push_exists = rows[0]
            for statement in () if queue_exists else sql.create_queue:
                await session.execute(statement)
            for statement in () if push_exists else sql.create_push:
                await session.execute(statement)
            for statement in () if large_exists else sql.create_large:
                await session.execute(statement)
        self._ready = True


async def fetch(session: Session, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    return await session.fetch(statement, *args)
