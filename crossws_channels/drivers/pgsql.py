"""The ``pgsql`` driver: a cluster relayed over PostgreSQL LISTEN/NOTIFY.

Group broadcasts are NOTIFYed on the channel named ``channel`` itself, so a crossws server
using ``pgsql({channel})`` on the same database shares the cluster. Messages for one
instance go to a channel derived from ``channel`` and that instance's id. Envelopes too
large for a NOTIFY payload (8000 bytes) are written to a table and the NOTIFY carries a
reference to the row. Worker channels are a table read with ``FOR UPDATE SKIP LOCKED``,
with a NOTIFY to wake waiting receivers.

Every statement runs on the driver's own autocommit connections, never on Django's: inside
an application transaction a NOTIFY is held back until the transaction commits (and is
discarded on rollback), and at commit it takes a cluster-wide lock on the notification
queue that would be held for the rest of that transaction's commit. The relay is best
effort and must not wait for, or roll back with, a request's transaction.

See ``docs/drivers/pgsql.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from crossws_channels.errors import BackplaneError, ConfigurationError, MessageExpired

from ._pgsql_options import (
    NOTIFY_LIMIT,
    Names,
    PgsqlOptions,
    direct_channel,
    table_names,
)
from ._pgsql_session import PING_TIMEOUT, ConnectionLost, Opener, Session, sqlstate
from ._pgsql_sql import DDL_LOCK, LARGE_PREFIX, NOTIFY_ONE, OBJECTS_EXIST, Statements
from .base import Deliver, Outgoing

__all__ = ["PgsqlDriver", "table_names"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Reconnecting: the first attempt after a short pause, then doubling up to one second, each
# pause shortened by up to half at random so instances that lost the server together don't
# come back in lockstep. The cap keeps the gap after the server answers under a second.
BACKOFF_INITIAL = 0.05
BACKOFF_MAX = 1.0

# A waiting queue_pop() looks again this often even without a wake-up NOTIFY, which could
# have been missed while the listening connection was down.
POLL_INTERVAL = 1.0
POLL_INTERVAL_UNSUBSCRIBED = 0.2

# A push sends a wake-up only when the queue was empty or nearly so (see _pgsql_sql.py).
# One that found more rows relies on the receivers taking them to go on popping until the
# queue is empty: a receiver that looked while they were being taken, and waits, was not
# woken by that push. So if the caller of a queue_pop() that returned an item has not
# popped that channel again this many seconds later (it stopped receiving, or is slow), the
# driver sends the wake-up on its behalf.
HANDOFF_DELAY = 0.05

# How long an item put back with queue_return() may wait when the driver doesn't know its
# deadline (it was not popped by this driver).
RETURN_TTL = 60.0

# Bounds on one NOTIFY statement: rows and bytes of payload.
CHUNK_ROWS = 1000
CHUNK_BYTES = 4 * 1024 * 1024

# Expired worker messages no receiver reached are purged every PURGE_INTERVAL seconds (by
# the next push), at most PURGE_ROWS at a time. A receiver drops expired messages it meets
# at the head of a queue, and a push that finds its queue full purges that queue first.
PURGE_INTERVAL = 30.0
PURGE_ROWS = 1000

UNDEFINED_TABLE = "42P01"
UNDEFINED_FUNCTION = "42883"
# A table or the push function is missing (never created, or dropped by hand).
MISSING = frozenset({UNDEFINED_TABLE, UNDEFINED_FUNCTION})


@dataclass(frozen=True, slots=True)
class _Notify:
    channels: list[str]
    payloads: list[str]


@dataclass(frozen=True, slots=True)
class _Large:
    channel: str
    payload: str


class _Link:
    """A driver-owned session opened on first use and reopened after it breaks.

    One statement (or transaction) runs on it at a time; the lock keeps asyncpg, which
    refuses concurrent use, and psycopg transactions from interleaving.
    """

    def __init__(self, opener: Opener) -> None:
        self._opener = opener
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
                return await op(session, *args)
            except asyncio.CancelledError:
                # The statement may be half-way through the protocol: never reuse it.
                # (It has returned: the session only frees the connection when idle.)
                self._session = None
                session.abort()
                raise
            except Exception:
                if not session.usable():
                    self._session = None
                    await _close_quietly(session)
                raise

    async def _get(self) -> Session:
        session = self._session
        if session is not None and (self._stale or not session.usable()):
            self._session = None
            await _close_quietly(session)
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
            await _close_quietly(session)


async def _close_quietly(session: Session) -> None:
    try:
        await session.close()
    except Exception as exc:
        logger.debug("closing a pgsql session failed: %s", exc)
        session.abort()


class PgsqlDriver:
    """Relays a cluster's envelopes over PostgreSQL LISTEN/NOTIFY.

    ``options`` (from CONFIG): ``channel``; ``dsn``, or ``client`` (a
    ``psycopg.AsyncConnection``, an asyncpg connection, or the dotted path of a function,
    sync or async, returning one); optionally ``connector`` (``"psycopg"`` or
    ``"asyncpg"``), ``application_name``, ``large_message_ttl`` and ``ping_interval``.
    """

    def __init__(self, instance_id: str, options: Mapping[str, Any]) -> None:
        self.options = PgsqlOptions.from_mapping(options)
        if not isinstance(instance_id, str) or not instance_id:
            raise ConfigurationError("the instance id must be a non-empty string")
        self.instance_id = instance_id
        self.names = Names.for_instance(self.options.channel, instance_id)
        self._sql = Statements.for_names(self.names)
        self._opener = Opener(self.options)
        # Publishing and large-message reads on one connection, worker queues on another,
        # so a burst of queue traffic never delays the relay.
        self._out = _Link(self._opener)
        self._work = _Link(self._opener)
        self._deliver: Deliver | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listen_session: Session | None = None
        self._listening = False
        self._user_session_spent = False
        self._tables_ready = False
        # Notifications waiting behind a large message being read, in arrival order.
        self._backlog: deque[tuple[str, str]] = deque()
        self._backlog_task: asyncio.Task[None] | None = None
        # What the backlog waits for before delivering on (backpressure), if anything.
        self._backlog_wait: asyncio.Future[None] | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._popped: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._handoffs: dict[str, asyncio.TimerHandle] = {}
        # Worker channels whose last pop here found nothing after the row it took (or no
        # row), with no wake-up since: as far as this driver knows, they are empty.
        self._drained: set[str] = set()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._direct_names: dict[str, str] = {}
        self._purge_due = 0.0
        self._closed = False

    def __repr__(self) -> str:
        return f"<PgsqlDriver channel={self.options.channel!r} instance={self.instance_id!r}>"

    # Relay out ---------------------------------------------------------------------------

    async def publish(self, envelope: str, /) -> None:
        """NOTIFY ``envelope`` to every instance of the cluster."""
        await self._publish_one(None, envelope)

    async def publish_to(self, instance_id: str, envelope: str, /) -> None:
        """NOTIFY ``envelope`` to the instance ``instance_id`` only."""
        await self._publish_one(instance_id, envelope)

    async def _publish_one(self, target: str | None, envelope: str) -> None:
        self._check_open()
        if len(envelope) * 4 <= NOTIFY_LIMIT:
            # The common case, without planning: one short statement (no character takes
            # more than 4 bytes in UTF-8, so it fits a NOTIFY).
            channel = self.names.broadcast if target is None else self._direct(target)
            await self._out.run(_notify_one, channel, envelope)
        else:
            await self.publish_batch([(target, envelope)])

    async def publish_batch(self, batch: Sequence[Outgoing], /) -> None:
        """Relay ``batch`` in order, as few statements as the payloads allow."""
        self._check_open()
        steps = self._plan(batch)
        if steps:
            await self._out.run(self._send, steps)

    def _plan(self, batch: Sequence[Outgoing]) -> list[_Notify | _Large]:
        steps: list[_Notify | _Large] = []
        broadcast = self.names.broadcast
        chunk = _Notify([], [])
        seen: set[tuple[str, str]] = set()
        size = 0
        for target, envelope in batch:
            channel = broadcast if target is None else self._direct(target)
            nbytes = _utf8_size(envelope)
            if nbytes > NOTIFY_LIMIT:
                if chunk.payloads:
                    steps.append(chunk)
                    chunk, seen, size = _Notify([], []), set(), 0
                steps.append(_Large(channel, envelope))
                continue
            # PostgreSQL folds identical notifications of one transaction into one, so a
            # repeated message starts a new statement instead of vanishing.
            key = (channel, envelope)
            if key in seen or len(chunk.payloads) >= CHUNK_ROWS or size + nbytes > CHUNK_BYTES:
                steps.append(chunk)
                chunk, seen, size = _Notify([], []), set(), 0
            chunk.channels.append(channel)
            chunk.payloads.append(envelope)
            seen.add(key)
            size += nbytes
        if chunk.payloads:
            steps.append(chunk)
        return steps

    def _direct(self, instance_id: str) -> str:
        name = self._direct_names.get(instance_id)
        if name is None:
            if len(self._direct_names) >= 1024:
                self._direct_names.clear()
            name = self._direct_names[instance_id] = direct_channel(
                self.options.channel, instance_id
            )
        return name

    async def _send(self, session: Session, steps: list[_Notify | _Large]) -> None:
        for step in steps:
            if isinstance(step, _Large):
                await self._with_tables(session, self._put_large, step)
                continue
            channels, payloads = step.channels, step.payloads
            if len(payloads) == 1:
                await _notify_one(session, channels[0], payloads[0])
            elif channels.count(channels[0]) == len(channels):
                # One channel (a run of broadcasts, usually): pass it once.
                await session.notify_many(channels[0], payloads)
            else:
                await session.notify_many(channels, payloads)

    async def _put_large(self, session: Session, step: _Large) -> None:
        await session.execute(
            self._sql.large_put,
            step.payload,
            self.options.large_message_ttl,
            step.channel,
            LARGE_PREFIX,
        )

    # Relay in ----------------------------------------------------------------------------

    async def subscribe(self, deliver: Deliver, /) -> None:
        """LISTEN for the cluster's broadcasts, this instance's direct messages and the
        queue wake-ups; return once listening, then keep listening until :meth:`close`."""
        self._check_open()
        if self._listener is not None:
            raise RuntimeError("subscribe() was already called on this pgsql driver")
        session = await self._open_listener()
        if self._closed or self._listener is not None:
            # close() (or another subscribe) ran while this one was connecting.
            await self._dispose(session)
            self._check_open()
            raise RuntimeError("subscribe() was already called on this pgsql driver")
        self._deliver = deliver
        self._listening = True
        # Kept here too: if close() cancels the task before it first runs, its finally
        # clause never does, and close() disposes of the session itself.
        self._listen_session = session
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(session, deliver),
            name=f"crossws_channels pgsql listener {self.names.broadcast!r}",
        )

    async def _open_listener(self) -> Session:
        session = None if self._user_session_spent else self._opener.user_session()
        if session is not None and not session.usable():
            # The user's connection broke or was closed: carry on with the driver's own.
            self._user_session_spent = True
            session = None
        if session is None:
            session = await self._opener.open()
        try:
            await session.listen([self.names.broadcast, self.names.direct, self.names.wakeup])
        except BaseException:
            await self._dispose(session, failed=True)
            raise
        return session

    async def _dispose(self, session: Session, *, failed: bool = False) -> None:
        """Let go of a listening session: close it if it is the driver's own, UNLISTEN if
        it is the user's (which stays open, and is not used again by this driver)."""
        if session.owned:
            if failed:
                # Closing politely could wait on a connection that no longer answers.
                session.abort()
            else:
                await _close_quietly(session)
            return
        self._user_session_spent = True
        if not session.usable():
            return
        unlisten = self._unlisten_quietly(session)
        if failed:
            # The connection may hang; don't hold up reconnecting for it.
            self._track(asyncio.ensure_future(unlisten))
        else:
            await unlisten

    async def _unlisten_quietly(self, session: Session) -> None:
        try:
            await asyncio.wait_for(session.unlisten(), PING_TIMEOUT)
        except Exception as exc:
            logger.debug("UNLISTEN on the client's connection failed: %s", exc)

    async def _listen(self, session: Session | None, deliver: Deliver) -> None:
        channel = self.names.broadcast
        delay = BACKOFF_INITIAL
        lost_at = 0.0
        try:
            while True:
                if session is None:
                    try:
                        session = self._listen_session = await self._open_listener()
                    except Exception as exc:
                        logger.debug("pgsql channel %r: reconnecting failed: %s", channel, exc)
                        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                        delay = min(delay * 2, BACKOFF_MAX)
                        continue
                    delay = BACKOFF_INITIAL
                    self._listening = True
                    logger.info(
                        "pgsql channel %r: listening again after %.1f s",
                        channel,
                        time.monotonic() - lost_at,
                    )
                    deliver.connection_made()
                    # Wake-ups sent during the outage were missed: look at the queues now.
                    self._wake_all()
                error: Exception
                try:
                    await session.receive(self._on_notify, self.options.ping_interval)
                    error = ConnectionLost("the listening connection ended")
                except Exception as exc:
                    error = exc
                self._listening = False
                lost_at = time.monotonic()
                self._listen_session = None
                await self._dispose(session, failed=True)
                session = None
                # The server may be gone for every connection, not just this one.
                self._out.invalidate()
                self._work.invalidate()
                logger.warning(
                    "pgsql channel %r: lost the listening connection, reconnecting: %s",
                    channel,
                    _first_line(error),
                )
                deliver.connection_lost(error)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        finally:
            self._listening = False
            if session is not None:
                self._listen_session = None
                await self._dispose(session)

    def _on_notify(self, name: str, payload: str) -> asyncio.Future[None] | None:
        """Every notification, as it is read (synchronously, in order); a future means
        "read no more until it is done" (backpressure)."""
        names = self.names
        if name == names.wakeup:
            self._wake(payload)
            return None
        if name != names.broadcast and name != names.direct:
            return None
        if self._backlog or payload.startswith(LARGE_PREFIX):
            # A large message is read from its table first; what comes after it waits.
            self._backlog.append((name, payload))
            if self._backlog_task is None:
                self._backlog_task = asyncio.get_running_loop().create_task(self._drain_backlog())
            # While the backlog waits for the layer, the session must not read on.
            return self._backlog_wait
        deliver = self._deliver
        if deliver is not None:
            return self._hand_to(deliver, payload)
        return None

    def _hand_to(self, deliver: Deliver, payload: str) -> asyncio.Future[None] | None:
        try:
            return deliver(payload)
        except Exception:
            # The layer promises deliver never raises; keep listening if it does anyway.
            logger.exception("pgsql channel %r: deliver raised", self.names.broadcast)
            return None

    async def _drain_backlog(self) -> None:
        backlog = self._backlog
        try:
            while backlog:
                name, payload = backlog[0]
                deliver = self._deliver
                if deliver is None:
                    backlog.clear()
                    break
                if payload.startswith(LARGE_PREFIX):
                    try:
                        payload = await self._get_large(payload, take=name == self.names.direct)
                    except Exception as exc:
                        backlog.popleft()
                        deliver.report(exc, "delivery")
                        continue
                # Removed only now: while it is read, new arrivals queue up behind it.
                backlog.popleft()
                wait = self._hand_to(deliver, payload)
                if wait is not None:
                    self._backlog_wait = wait
                    try:
                        await wait
                    finally:
                        self._backlog_wait = None
        finally:
            self._backlog_task = None

    async def _get_large(self, reference: str, *, take: bool) -> str:
        """The envelope a large-message reference points at (deleting the row if it was
        for this instance alone), or the reference itself when it is malformed, for the
        layer to drop and report. Raises BackplaneError if the row is gone."""
        digits = reference[len(LARGE_PREFIX) :]
        if not digits.isascii() or not digits.isdigit() or len(digits) > 18:
            return reference
        statement = self._sql.large_take if take else self._sql.large_get
        try:
            rows = await self._out.run(_fetch, statement, int(digits))
        except Exception as exc:
            if sqlstate(exc) != UNDEFINED_TABLE:
                raise
            rows = []
        if not rows:
            raise BackplaneError(
                f"large message {digits} on pgsql channel {self.names.broadcast!r} was gone "
                "before it could be read (it expired, or the cluster was flushed)"
            )
        payload: str = rows[0][0]
        return payload

    # Worker queues -----------------------------------------------------------------------

    async def queue_push(self, channel: str, item: str, capacity: int, expires: float, /) -> bool:
        """Append ``item`` unless ``capacity`` unexpired items already wait on ``channel``."""
        self._check_open()
        rows = await self._work.run(
            self._with_tables,
            _fetch,
            self._sql.push,
            channel,
            capacity,
            item,
            expires - time.time(),
            self.names.wakeup,
        )
        added, purged = rows[0][0]
        if purged:
            self._report_expired(purged, [channel])
        if time.monotonic() >= self._purge_due:
            await self._purge()
        return bool(added)

    async def _purge(self) -> None:
        """Delete expired messages of worker channels no receiver reached, now and then."""
        self._purge_due = time.monotonic() + PURGE_INTERVAL
        try:
            rows = await self._work.run(
                self._with_tables, _fetch, self._sql.purge, PURGE_ROWS, self.names.wakeup
            )
        except Exception as exc:
            logger.debug("pgsql channel %r: purging expired messages failed: %s", self, exc)
            return
        if rows:
            self._report_expired(sum(int(n) for _, n, _ in rows), [str(c) for c, _, _ in rows])

    async def queue_pop(self, channel: str, timeout: float, /) -> str | None:
        """Take the oldest item of ``channel``, waiting up to ``timeout`` seconds for one."""
        self._check_open()
        loop = asyncio.get_running_loop()
        self._cancel_handoff(channel)  # popping again: the hand-over is not needed
        deadline = loop.time() + max(timeout, 0.0)
        event = asyncio.Event()
        waiters = self._waiters.setdefault(channel, set())
        waiters.add(event)
        # A channel this driver found empty, with no wake-up since (one arriving from now
        # on sets the event): wait for one instead of asking the server again. A push to
        # an empty queue always sends one; the periodic look below stays the safety net.
        drained = timeout > 0 and self._listening and channel in self._drained
        try:
            while True:
                if drained:
                    drained = False
                else:
                    # Cleared before the query: a wake-up arriving while it runs is kept.
                    event.clear()
                    item, more = await self._pop_once(channel)
                    if item is not None:
                        if more:
                            self._arm_handoff(loop, channel)
                        return item
                remaining = deadline - loop.time()
                if remaining <= 0 or self._closed:
                    return None
                interval = POLL_INTERVAL if self._listening else POLL_INTERVAL_UNSUBSCRIBED
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, interval))
                if self._closed:
                    return None
        finally:
            waiters.discard(event)
            if not waiters and self._waiters.get(channel) is waiters:
                del self._waiters[channel]

    async def _pop_once(self, channel: str) -> tuple[str | None, bool]:
        """Take the head of ``channel``: the item (or None), and whether rows followed it."""
        self._drained.discard(channel)
        task = asyncio.ensure_future(self._work.run(self._pop, channel))
        self._track(task)
        try:
            # Shielded: once the DELETE is sent its item is gone from the table, so a
            # cancelled receiver must still get the result, to put the item back.
            expired, item, expires, more = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(functools.partial(self._give_back_orphan, channel))
            raise
        if expired:
            self._report_expired(expired, [channel])
        if not more:
            if len(self._drained) >= 1024:
                self._drained.clear()  # forgetting only costs a look at the server
            self._drained.add(channel)
        if item is not None:
            self._popped[(channel, item)] = expires
            while len(self._popped) > 1024:
                self._popped.popitem(last=False)
        return item, more

    async def _pop(self, session: Session, channel: str) -> tuple[int, str | None, float, bool]:
        """Take the head of ``channel``; drop the expired ones found first (counted)."""
        expired = 0
        while True:
            rows = await self._with_tables(session, _fetch, self._sql.pop, channel)
            if not rows:
                return expired, None, 0.0, False
            item, expires, is_expired, more = rows[0]
            if not is_expired:
                return expired, item, float(expires), bool(more)
            expired += 1

    def _arm_handoff(self, loop: asyncio.AbstractEventLoop, channel: str) -> None:
        """Wake the other receivers of ``channel`` if this driver's caller doesn't pop it
        again soon: they may have looked while this receiver was taking its item, and the
        pushes since then, finding the queue not empty, sent no wake-up."""
        self._cancel_handoff(channel)
        self._handoffs[channel] = loop.call_later(HANDOFF_DELAY, self._hand_off, channel)

    def _cancel_handoff(self, channel: str) -> None:
        handoff = self._handoffs.pop(channel, None)
        if handoff is not None:
            handoff.cancel()

    def _hand_off(self, channel: str) -> None:
        self._handoffs.pop(channel, None)
        if self._closed:
            return
        self._wake(channel)
        self._track(asyncio.ensure_future(self._send_handoff(channel)))

    async def _send_handoff(self, channel: str) -> None:
        try:
            await self._work.run(_notify_one, self.names.wakeup, channel)
        except Exception as exc:
            # The receivers' periodic look at the queue still finds the rows.
            logger.debug("pgsql channel %r: a queue wake-up failed: %s", self, exc)

    def _give_back_orphan(
        self, channel: str, task: asyncio.Future[tuple[int, str | None, float, bool]]
    ) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        _expired, item, expires, _more = task.result()
        if item is not None:
            # Also while closing: close() waits for this before closing the connections.
            self._track(asyncio.ensure_future(self._give_back_orphaned(channel, item, expires)))

    async def queue_return(self, channel: str, item: str, /) -> None:
        """Put ``item`` back at the head of ``channel``."""
        self._check_open()
        # The deadline it had when this driver popped it, if it did.
        await self._give_back(channel, item, self._popped.pop((channel, item), None))

    async def _give_back(self, channel: str, item: str, expires: float | None) -> None:
        args = (channel, item, expires, self.names.wakeup, RETURN_TTL)
        while True:
            rows = await self._work.run(self._with_tables, _fetch, self._sql.give_back, *args)
            if rows[0][0]:
                return
            # Another give-back took the position before the head at the same moment.

    async def flush(self) -> None:
        """Delete this cluster's waiting worker messages and large messages."""
        self._check_open()

        async def flush(session: Session) -> None:
            for statement in (self._sql.flush_queue, self._sql.flush_large):
                try:
                    await session.execute(statement)
                except Exception as exc:
                    if sqlstate(exc) not in MISSING:
                        raise

        await self._work.run(flush)

    async def _with_tables(
        self, session: Session, op: Callable[..., Awaitable[T]], *args: Any
    ) -> T:
        """Run ``op`` after creating the cluster's tables and function if needed (also
        when someone dropped them since)."""
        if not self._tables_ready:
            await self._create_tables(session)
        try:
            return await op(session, *args)
        except Exception as exc:
            if sqlstate(exc) not in MISSING:
                raise
        # The statement failed as a whole, so running it again can't duplicate anything.
        await self._create_tables(session)
        return await op(session, *args)

    async def _create_tables(self, session: Session) -> None:
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
        self._tables_ready = True

    def _wake(self, channel: str) -> None:
        self._drained.discard(channel)
        for event in self._waiters.get(channel, ()):
            event.set()

    def _wake_all(self) -> None:
        self._drained.clear()
        for events in self._waiters.values():
            for event in events:
                event.set()

    def _report_expired(self, count: int, channels: list[str]) -> None:
        error = MessageExpired(count, channels)
        if self._deliver is not None:
            self._deliver.report(error, "delivery")
        else:
            logger.warning("%s", error)

    def _track(self, task: asyncio.Future[Any]) -> None:
        """Keep a background task referenced until it is done, and close() waiting for it."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_back_orphaned(self, channel: str, item: str, expires: float) -> None:
        try:
            await self._give_back(channel, item, expires)
        except Exception as exc:
            # Nobody waits for this: the receiver that took the item was cancelled.
            logger.warning(
                "pgsql channel %r: a worker message on %r could not be put back and is lost: %s",
                self.names.broadcast,
                channel,
                _first_line(exc),
            )

    # Lifecycle ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this pgsql driver is closed")

    async def close(self) -> None:
        """Stop listening, UNLISTEN on a client the user passed in (which stays open), and
        close every connection the driver opened."""
        if self._closed:
            return
        self._closed = True
        for handoff in self._handoffs.values():
            handoff.cancel()
        self._handoffs.clear()
        self._wake_all()
        if self._listener is not None:
            listener, self._listener = self._listener, None
            listener.cancel()
            await asyncio.wait([listener])
            if not listener.cancelled() and listener.exception() is not None:
                logger.error("pgsql listener failed", exc_info=listener.exception())
        if self._listen_session is not None:
            session, self._listen_session = self._listen_session, None
            await self._dispose(session)
        if self._backlog_task is not None:
            backlog, self._backlog_task = self._backlog_task, None
            backlog.cancel()
            await asyncio.wait([backlog])
        self._backlog.clear()
        # In-flight pops, and the give-backs they may start, finish before the connections
        # they use are closed.
        deadline = time.monotonic() + PING_TIMEOUT
        while self._tasks and (remaining := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._tasks), timeout=remaining)
        await self._out.close()
        await self._work.close()


async def _notify_one(session: Session, channel: str, payload: str) -> None:
    await session.execute(NOTIFY_ONE, channel, payload)


async def _fetch(session: Session, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    return await session.fetch(statement, *args)


def _first_line(error: BaseException) -> str:
    # libpq's messages run over several lines; a log line should not.
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _utf8_size(text: str) -> int:
    # Most envelopes are far from the limit; only measure the ones that might be close.
    if len(text) * 4 <= NOTIFY_LIMIT:
        return len(text)
    return len(text.encode("utf-8"))
