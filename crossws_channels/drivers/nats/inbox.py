"""One private inbox for every answer the worker channels wait for.

JetStream answers a publish with an acknowledgement, a confirmed ack with an empty
message, a pull request with the messages it asked for: all on the reply subject the
request named. Rather than a subscription per request (what nats-py's JetStream helpers
do, at a round trip and a few hundred microseconds of CPU each), the driver subscribes
once to ``<inbox>.>`` and routes each answer by its subject: to a future (one answer
expected) or to a handler (a pull request's status). The messages a pull request brings
keep their own subject; they go to their stream's handler, named in their reply subject
(``$JS.ACK.<stream>.<consumer>...``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any

from .reader import Message, subscribe

__all__ = ["Answer", "Inbox", "status_of"]

ACK_PREFIX = b"$JS.ACK."

Handler = Callable[[Message], None]


def status_of(message: Message) -> str | None:
    """The status code of a server's status message (``"503"``, ``"408"``...), if it is
    one: a header ``Status`` on a message with no reply subject."""
    return _status(message.reply, message.headers)


def _status(reply: str | bytes, headers: dict[str, str] | None) -> str | None:
    if headers and not reply:
        status = headers.get("Status")
        if status:
            return str(status)
    return None


class Answer:
    """What came back for a request: the message's data, or the status that came."""

    __slots__ = ("data", "status")

    def __init__(self, data: bytes, status: str | None) -> None:
        self.data = data
        self.status = status

    def error_code(self) -> int | None:
        """JetStream's ``err_code`` if the answer is an API error, else None."""
        if b'"error"' not in self.data:
            return None
        try:
            error = json.loads(self.data)["error"]
            return int(error.get("err_code") or error.get("code") or 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            return 0

    def json(self) -> Any:
        return json.loads(self.data)


class Inbox:
    """The driver's reply subjects on one client (see the module docstring)."""

    def __init__(self) -> None:
        self._client: Any = None
        self._subscription: Any = None
        self._prefix = ""
        self._tokens = itertools.count()
        self._futures: dict[str, asyncio.Future[Answer]] = {}
        self._handlers: dict[str, Handler] = {}
        self._streams: dict[str, Handler] = {}
        self._calls: dict[str, Callable[[str, Answer], None]] = {}

    async def ready(self, client: Any) -> None:
        """Subscribe on ``client``, unless that is done already."""
        if client is self._client and self._subscription is not None:
            return
        self.forget()
        prefix = client.new_inbox()
        self._subscription = await subscribe(client, prefix + ".>", self._on_message)
        self._client, self._prefix = client, prefix

    def expect(self) -> tuple[str, asyncio.Future[Answer]]:
        """A reply subject, and the future its one answer will complete."""
        subject = f"{self._prefix}.{next(self._tokens)}"
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._futures[subject] = future
        future.add_done_callback(lambda _: self._futures.pop(subject, None))
        return subject, future

    def call(self, callback: Callable[[str, Answer], None]) -> str:
        """A reply subject whose one answer goes to ``callback(subject, answer)``: no
        future to make and complete, for answers nobody awaits."""
        subject = f"{self._prefix}.{next(self._tokens)}"
        self._calls[subject] = callback
        return subject

    def route(self, handler: Handler) -> str:
        """A reply subject whose messages all go to ``handler``, until :meth:`drop`."""
        subject = f"{self._prefix}.{next(self._tokens)}"
        self._handlers[subject] = handler
        return subject

    def drop(self, subject: str) -> None:
        self._handlers.pop(subject, None)
        self._calls.pop(subject, None)

    def on_stream(self, stream: str, handler: Handler | None) -> None:
        """Hand the messages pulled from ``stream`` to ``handler`` (None: stop)."""
        if handler is None:
            self._streams.pop(stream, None)
        else:
            self._streams[stream] = handler

    async def request(self, subject: str, data: bytes, timeout: float) -> Answer:
        """Publish ``data`` on ``subject`` and wait for the one answer."""
        reply, future = self.expect()
        await self._client.publish(subject, data, reply=reply)
        return await asyncio.wait_for(future, timeout)

    def _on_message(
        self, subject_bytes: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> None:
        subject = subject_bytes.decode()
        call = self._calls.pop(subject, None)
        if call is not None:
            call(subject, Answer(data, _status(reply, headers)))
            return
        future = self._futures.pop(subject, None)
        if future is not None:
            if not future.done():
                future.set_result(Answer(data, _status(reply, headers)))
            return
        handler = self._handlers.get(subject)
        if handler is None:
            if not reply.startswith(ACK_PREFIX):
                return
            handler = self._streams.get(reply[len(ACK_PREFIX) :].split(b".", 1)[0].decode())
            if handler is None:
                return
        handler(Message(subject, reply.decode(), data, headers))

    def forget(self) -> None:
        """Fail what waits on the old client's subscription (the client is gone)."""
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(ConnectionError("the NATS client was replaced"))
        self._handlers.clear()
        self._streams.clear()
        self._calls.clear()
        self._client = self._subscription = None

    async def close(self) -> None:
        subscription = self._subscription
        self.forget()
        if subscription is not None:
            try:
                await subscription.unsubscribe()
            except Exception:
                pass
