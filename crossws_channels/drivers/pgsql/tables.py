"""The cluster's tables (worker queues, large messages) and push function, made on demand.

They are created the first time a statement needs them, and again if someone dropped
them since: a statement that fails because one is missing failed as a whole, so running
it again after creating them can't do anything twice.

An object found under one of these names is used only if the driver could have made it:
owned by this session's role (or a role it is a member of) and, for the function, with
the driver's body and ``search_path``. Anything else (another role's table or function
planted beforehand under the computed name, CVE-2018-1058's pattern) is refused with
:class:`ForeignObject`, and every statement that needs it fails the same way until it is
removed. A function of the driver's own role with another body (an older version of the
driver) is replaced.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from crossws_channels.errors import ForeignObject

from .session import Session, sqlstate
from .sql import DDL_LOCK, FUNCTION_FOUND, FUNCTION_SEARCH_PATH, TABLE_FOUND, Statements

__all__ = ["MISSING", "ForeignObject", "Tables"]

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
        self._refused: ForeignObject | None = None

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
        if self._refused is not None:
            # Checked once: the object stays someone else's until an operator removes it,
            # and the next driver (a restart) checks again.
            raise self._refused
        sql = self._sql
        async with session.transaction():
            await session.execute(DDL_LOCK)
            try:
                queue_exists = await _table(session, sql.queue)
                large_exists = await _table(session, sql.large)
                push_current = await _function(session, sql.push_signature, sql.push_body)
            except ForeignObject as exc:
                self._refused = exc
                raise
            for statement in () if queue_exists else sql.create_queue:
                await session.execute(statement)
            for statement in () if push_current else sql.create_push:
                await session.execute(statement)
            for statement in () if large_exists else sql.create_large:
                await session.execute(statement)
        self._ready = True


async def _table(session: Session, name: str) -> bool:
    """Whether table ``name`` exists; ForeignObject if it is not the driver's to use."""
    rows = await session.fetch(TABLE_FOUND, name)
    if not rows:
        return False
    owner, ours, kind = rows[0]
    if not ours or kind != "r":
        what = "table" if kind == "r" else f"relation (kind {kind!r}, not a table)"
        raise ForeignObject(
            f"{name} is a {what} owned by {owner}, which this connection's role is not and "
            "can't act as: the pgsql driver did not create it and won't use it. Drop it (it "
            "may have been planted to run code as this role), or set the driver's 'schema' "
            "option to a schema only the application's role can create objects in"
        )
    return True


async def _function(session: Session, signature: str, body: str) -> bool:
    """Whether ``signature`` exists as the driver made it (False: create or replace
    it); ForeignObject if it belongs to a role this session can't act as."""
    rows = await session.fetch(FUNCTION_FOUND, signature)
    if not rows:
        return False
    owner, ours, source, settings = rows[0]
    if not ours:
        raise ForeignObject(
            f"the function {signature} is owned by {owner}, which this connection's role is "
            "not and can't act as: the pgsql driver did not create it and won't call it. "
            "Drop it (it may have been planted to run code as this role), or set the "
            "driver's 'schema' option to a schema only the application's role can create "
            "objects in"
        )
    return bool(source == body and f"search_path={FUNCTION_SEARCH_PATH}" in settings)


async def fetch(session: Session, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    return await session.fetch(statement, *args)
