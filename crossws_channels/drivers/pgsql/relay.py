"""The pgsql driver's relay: NOTIFY out, LISTEN in, large messages through a table.

Out: a ``group_send`` is one ``pg_notify`` on the broadcast channel (named ``channel``
itself, shared with crossws's ``pgsql({channel})``), a ``send`` one on the target
instance's direct channel. A batch goes out as few statements as its payloads allow
(one ``unnest()`` of binary arrays, split only where PostgreSQL would fold identical
notifications, or past :data:`CHUNK_ROWS`/:data:`CHUNK_BYTES`). An envelope too large
for a NOTIFY payload (8000 bytes) is written to the large-message table and the NOTIFY
carries a reference to its row.

In: a session LISTENs on the broadcast, direct and queue wake-up channels and hands
every notification over as it is read. A large-message reference is read from its table
first; what arrives after it waits behind it (the *backlog*), so order is kept. While the
layer asks to wait (backpressure), nothing is read: PostgreSQL keeps the notifications.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from crossws_channels.errors import BackplaneError

from ..base import Deliver, Outgoing, Ready
from .link import Link, close_quietly, first_line, within
from .options import NOTIFY_LIMIT, Names, PgsqlOptions, direct_channel
from .queues import Queues
from .session import PING_TIMEOUT, ConnectionLost, Opener, Session, sqlstate
from .sql import LARGE_PREFIX, NOTIFY_ONE, Statements
from .tables import UNDEFINED_TABLE, Tables, fetch
from .watch import QueueWatch

__all__ = ["Relay"]

logger = logging.getLogger("crossws_channels.drivers.pgsql")

# Bounds on one NOTIFY statement: rows and bytes of payload.
CHUNK_ROWS = 1000
CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Notify:
    channels: list[str]
    payloads: list[str]


@dataclass(frozen=True, slots=True)
class _Large:
    channel: str
    payload: str


class Relay:
    """Relaying for one pgsql driver (see the module docstring)."""

    def __init__(
        self,
        options: PgsqlOptions,
        names: Names,
        sql: Statements,
        opener: Opener,
        link: Link,
        tables: Tables,
        queues: Queues,
    ) -> None:
        self._options = options
        self._names = names
        self._sql = sql
        self._opener = opener
        # Publishing and large-message reads; the queues have a link of their own.
        self._link = link
        self._watch = QueueWatch(link, options.ping_interval)
        self._tables = tables
        self._queues = queues
        self._deliver: Deliver | None = None
        self._listening: Session | None = None
        self._user_session_spent = False
        # Notifications waiting behind a large message being read, in arrival order.
        self._backlog: deque[tuple[str, str]] = deque()
        self._backlog_task: asyncio.Task[None] | None = None
        # What the backlog waits for before delivering on (backpressure), if anything.
        self._backlog_wait: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()  # UNLISTENs of broken sessions

    # Out

    async def publish_one(self, target: str | None, envelope: str) -> None:
        if len(envelope) * 4 <= NOTIFY_LIMIT:
            # The common case, without planning: one short statement (no character takes
            # more than 4 bytes in UTF-8, so it fits a NOTIFY).
            channel = self._names.broadcast if target is None else self._direct(target)
            await self._link.run(_notify_one, channel, envelope)
        else:
            await self.publish_batch([(target, envelope)])

    async def publish_batch(self, batch: Sequence[Outgoing]) -> None:
        steps = self._plan(batch)
        if steps:
            await self._link.run(self._send, steps)

    def _plan(self, batch: Sequence[Outgoing]) -> list[_Notify | _Large]:
        steps: list[_Notify | _Large] = []
        broadcast = self._names.broadcast
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
        return direct_channel(self._options.channel, instance_id)

    async def _send(self, session: Session, steps: list[_Notify | _Large]) -> None:
        for step in steps:
            if isinstance(step, _Large):
                await self._tables.run(session, self._put_large, step)
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
            self._options.large_message_ttl,
            step.channel,
            LARGE_PREFIX,
        )

    # In

    async def listen(self, deliver: Deliver, ready: Ready) -> None:
        """LISTEN, call ``ready()``, and hand every notification over until the session
        breaks; then raise (the layer listens again after a backoff)."""
        session = await self._open_listener()
        self._deliver = deliver
        self._queues.report = deliver.report
        self._listening = session
        failed = True
        watch = asyncio.ensure_future(self._watch.run(deliver.report))
        try:
            self._queues.listening = True
            ready()
            # Wake-ups sent while no one listened were missed: look at the queues now.
            self._queues.wake_all()
            await session.receive(self._on_notify, self._options.ping_interval)
            raise ConnectionLost("the listening connection ended")
        except asyncio.CancelledError:
            failed = False
            raise
        except Exception as exc:
            logger.debug(
                "pgsql channel %r: lost the listening connection: %s",
                self._names.broadcast,
                first_line(exc),
            )
            raise
        finally:
            watch.cancel()
            self._queues.listening = False
            self._listening = None
            await self._dispose(session, failed=failed)
            await asyncio.gather(watch, return_exceptions=True)

    async def _open_listener(self) -> Session:
        session = None if self._user_session_spent else self._opener.user_session()
        if session is not None and not session.usable():
            # The user's connection broke or was closed: carry on with the driver's own.
            self._user_session_spent = True
            session = None
        if session is None:
            session = await self._opener.open()
        names = self._names
        try:
            await within(
                session,
                session.listen([names.broadcast, names.direct, names.wakeup]),
                self._options.statement_timeout,
                "LISTEN",
            )
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
                await close_quietly(session)
            return
        self._user_session_spent = True
        if not session.usable():
            return
        unlisten = self._unlisten_quietly(session)
        if failed:
            # The connection may hang; don't hold up reconnecting for it.
            task = asyncio.ensure_future(unlisten)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            await unlisten

    async def _unlisten_quietly(self, session: Session) -> None:
        try:
            await asyncio.wait_for(session.unlisten(), PING_TIMEOUT)
        except Exception as exc:
            logger.debug("UNLISTEN on the client's connection failed: %s", exc)

    def _on_notify(self, name: str, payload: str) -> asyncio.Future[None] | None:
        """Every notification, as it is read (synchronously, in order); a future means
        "read no more until it is done" (backpressure)."""
        names = self._names
        if name == names.wakeup:
            self._queues.wake(payload)
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
            logger.exception("pgsql channel %r: deliver raised", self._names.broadcast)
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
                        payload = await self._get_large(payload, take=name == self._names.direct)
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
            rows = await self._link.run(fetch, statement, int(digits))
        except Exception as exc:
            if sqlstate(exc) != UNDEFINED_TABLE:
                raise
            rows = []
        if not rows:
            raise BackplaneError(
                f"large message {digits} on pgsql channel {self._names.broadcast!r} was gone "
                "before it could be read (it expired, or the cluster was flushed)"
            )
        payload: str = rows[0][0]
        return payload

    async def close(self) -> None:
        """Stop reading the backlog (the listener itself is the layer's to cancel)."""
        if self._backlog_task is not None:
            backlog, self._backlog_task = self._backlog_task, None
            backlog.cancel()
            await asyncio.wait([backlog])
        self._backlog.clear()
        self._deliver = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=PING_TIMEOUT)


async def _notify_one(session: Session, channel: str, payload: str) -> None:
    await session.execute(NOTIFY_ONE, channel, payload)


def _utf8_size(text: str) -> int:
    # Most envelopes are far from the limit; only measure the ones that might be close.
    if len(text) * 4 <= NOTIFY_LIMIT:
        return len(text)
    return len(text.encode("utf-8"))
