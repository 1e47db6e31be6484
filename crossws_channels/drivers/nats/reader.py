"""The driver's own reading of the NATS protocol, for its own subscriptions.

For every message nats-py matches a regular expression, cuts the message out of its
buffer twice (each cut moves the rest of the buffer), builds a ``Msg``, queues it and
wakes the subscription's task, which awaits a callback: about 3.4 µs of CPU per message
here, a quarter of what the layer spends receiving a relayed message, and as much again
for each echo of a message the instance sent itself.

:class:`Client` is nats-py's client with the protocol reader replaced by :class:`Reader`,
which reads a chunk from the socket in one pass, by offsets, and hands each message of a
subscription made with :func:`subscribe` straight to that subscription's handler,
synchronously; a handler that is a :class:`Runs` (the relay's) gets consecutive
messages as one list, one call per run instead of per message. Everything else (other
subscriptions, PING, INFO, errors) goes to nats-py's own handling, as its parser would
send it; connecting, reconnecting, TLS, credentials and writing stay nats-py's.

A handler runs inside the reader: it must not block or raise (what it raises is logged
and dropped). A client the user passed in is nats-py's own; :func:`subscribe` then makes
an ordinary subscription whose callback calls the handler, so the driver reads the same
way either way.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.errors import ProtocolError
from nats.protocol.parser import MAX_CONTROL_LINE_SIZE, Parser

__all__ = ["Client", "Handler", "Message", "Runs", "subscribe"]

logger = logging.getLogger("crossws_channels.drivers.nats")

# handler(subject, reply, data, headers): headers as nats-py parses them (the status
# line of a server's status message as "Status" and "Description"), None without.
Handler = Callable[[bytes, bytes, bytes, "dict[str, str] | None"], None]

# What a subscription may hold when its handler is a callback on nats-py's own client.
PENDING_MESSAGES = 1_000_000
PENDING_BYTES = 256 * 1024 * 1024


class Message:
    """One message, for the handlers that keep it (pulled worker items)."""

    __slots__ = ("data", "headers", "reply", "subject")

    def __init__(
        self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None
    ) -> None:
        self.subject = subject
        self.reply = reply
        self.data = data
        self.headers = headers


class Client(NatsClient):
    """nats-py's client, reading with :class:`Reader`."""

    def __init__(self) -> None:
        super().__init__()
        self.handlers: dict[int, Handler] = {}
        self._ps = Reader(self)

    def post(self, subject: bytes, payload: bytes) -> bool:
        """What ``publish(subject, payload)`` does while connected, without a coroutine:
        the PUB appended to the write buffer, the flusher woken. ``subject`` is valid
        and encoded (the driver's own). False, with nothing done, when ``publish`` must
        do it: not connected, ``payload`` over ``max_payload``, or the buffer full
        enough that it would write before returning."""
        size = len(payload)
        flusher = self._flusher_task
        if (
            self._status != NatsClient.CONNECTED
            or size > self._max_payload
            or self._pending_data_size + size > self._max_pending_size
            or flusher is None
            or flusher.done()
        ):
            return False
        command = b"PUB %b %d\r\n%b\r\n" % (subject, size, payload)
        self._pending.append(command)
        self._pending_data_size += len(command)
        stats = self.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += size
        queue = self._flush_queue
        if queue is not None and queue.empty():
            queue.put_nowait(asyncio.get_running_loop().create_future())
        return True

    async def _process_pong(self) -> None:
        # nats-py (2.16) completes the oldest PING's future even if its flush() gave up
        # on it (timed out, or cancelled when a layer closes while subscribing): the
        # InvalidStateError ends its read loop, and the connection hears nothing more.
        # Each PONG answers one PING, in order; one that nobody awaits is skipped.
        if self._pongs:
            future = self._pongs.pop(0)
            if not future.done():
                future.set_result(True)
            self._pongs_received += 1
            self._pings_outstanding = 0


class Reader(Parser):
    """Reads what the server sends: messages of :attr:`Client.handlers`' subscriptions
    go to their handler, everything else to nats-py (see the module docstring)."""

    def __init__(self, nc: Client) -> None:
        super().__init__(nc)
        self._handlers = nc.handlers
        self._stats = nc.stats

    def reset(self) -> None:
        super().reset()
        # Bytes the frame at the start of buf needs before it is worth looking again.
        self._wanted = 0

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        if buf:
            buf += data
            if len(buf) < self._wanted:
                return  # the middle of a large message: nothing to look at yet
            data = bytes(buf)
            buf.clear()
        self._wanted = 0
        end = len(data)
        pos = 0
        handlers = self._handlers
        nc = self.nc
        taken = taken_bytes = 0  # added to the client's stats once, after the loop
        # Consecutive messages for one handler that takes runs (Runs), handed over
        # together: when another handler's message, a control line or the end comes.
        run: list[bytes] = []
        run_handler: Runs | None = None
        while pos < end:
            headed = data.startswith(b"HMSG ", pos)
            if headed or data.startswith(b"MSG ", pos):
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    break
                # MSG <subject> <sid> [reply] <size>; HMSG with <header size> before size
                args = data[pos + 4 + headed : eol].split()
                fields = len(args) - headed
                try:
                    if fields == 3:
                        reply = b""
                    elif fields == 4:
                        reply = args[2]
                    else:
                        raise ValueError(fields)
                    subject, sid = args[0], int(args[1])
                    start = eol + 2
                    stop = start + int(args[-1])
                    split = start + int(args[-2]) if headed else start
                except ValueError:
                    raise ProtocolError("nats: malformed MSG") from None
                if stop + 2 > end:
                    self._wanted = stop + 2 - pos
                    break
                headers = data[start:split] if headed else None
                payload = data[split:stop]
                pos = stop + 2
            else:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > MAX_CONTROL_LINE_SIZE:
                        raise ProtocolError("nats: unknown protocol")
                    break
                line = data[pos:eol]
                pos = eol + 2
                if run:
                    _hand_over(run_handler, run)
                    run = []
                await self._control(line)
                if self.buf is not buf:
                    return  # the connection was reset: the rest belongs to the old one
                continue
            handler = handlers.get(sid)
            if (
                headers is None
                and handler is not None
                and (handler is run_handler or isinstance(handler, Runs))
            ):
                if handler is not run_handler:
                    if run:
                        _hand_over(run_handler, run)
                        run = []
                    run_handler = handler
                run.append(payload)
                taken += 1
                taken_bytes += len(payload)
                continue
            if run:
                _hand_over(run_handler, run)
                run = []
            if handler is None:
                await nc._process_msg(sid, subject, reply, payload, headers)
                continue
            taken += 1
            taken_bytes += len(payload)
            parsed = None if headers is None else await nc._process_headers(headers)
            try:
                handler(subject, reply, payload, parsed)
            except Exception:
                logger.exception("a nats message handler failed")
        if run:
            _hand_over(run_handler, run)
        if taken:
            stats = self._stats
            stats["in_msgs"] += taken
            stats["in_bytes"] += taken_bytes
        if pos < end:
            # An incomplete frame: kept for the next read (the buffer is empty here).
            buf += data[pos:] if pos else data

    async def _control(self, line: bytes) -> None:
        """One protocol line that is not a message, as nats-py's parser handles it."""
        op, _, rest = line.partition(b" ")
        op = op.upper()
        if op == b"PING":
            await self.nc._process_ping()
        elif op == b"PONG":
            await self.nc._process_pong()
        elif op == b"+OK":
            pass
        elif op == b"-ERR":
            await self.nc._process_err(rest.strip().decode(errors="replace").lower())
        elif op == b"INFO":
            await self.nc._process_info(json.loads(rest))
        else:
            raise ProtocolError("nats: unknown protocol")


class Runs:
    """A handler that also takes consecutive messages as one list (:meth:`run`): what
    the relay's subscriptions use, so that a read of hundreds of messages costs one call
    per run rather than per message."""

    def __call__(
        self, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> None:
        raise NotImplementedError

    def run(self, payloads: list[bytes]) -> None:
        """Consecutive messages without headers, in order (the list is the handler's)."""
        raise NotImplementedError


def _hand_over(handler: Runs | None, run: list[bytes]) -> None:
    assert handler is not None
    try:
        handler.run(run)
    except Exception:
        logger.exception("a nats message handler failed")


async def subscribe(client: Any, subject: str, handler: Handler) -> Any:
    """Subscribe ``client`` to ``subject`` with ``handler``; the nats-py subscription,
    to unsubscribe."""
    if isinstance(client, Client):
        subscription = await client.subscribe(subject)
        sid = subscription._id
        client.handlers[sid] = handler
        # Registered before the reader could run (subscribing does not yield when
        # nats-py's write queue has room); should it have run, what came went to
        # nats-py's queue for the subscription: hand that over first.
        queue = subscription._pending_queue
        while not queue.empty():
            message = queue.get_nowait()
            handler(message.subject.encode(), message.reply.encode(), message.data, message.headers)
        return _Unregistering(subscription, client.handlers, sid)

    async def on_message(message: Any) -> None:
        handler(message.subject.encode(), message.reply.encode(), message.data, message.headers)

    return await client.subscribe(
        subject,
        cb=on_message,
        pending_msgs_limit=PENDING_MESSAGES,
        pending_bytes_limit=PENDING_BYTES,
    )


class _Unregistering:
    """A subscription of :class:`Client` whose handler goes when it is unsubscribed."""

    __slots__ = ("_handlers", "_sid", "subscription")

    def __init__(self, subscription: Any, handlers: dict[int, Handler], sid: int) -> None:
        self.subscription = subscription
        self._handlers = handlers
        self._sid = sid

    async def unsubscribe(self) -> None:
        self._handlers.pop(self._sid, None)
        await self.subscription.unsubscribe()
