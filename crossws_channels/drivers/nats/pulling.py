"""Receiving from a worker channel's stream in batches, each message still once.

Every instance pulls from the same durable consumer, so JetStream hands each message to
one of them. Asking for one message per ``receive`` (and confirming its acknowledgement)
costs two round trips a message; instead a receiving instance keeps pull requests for up
to ``BATCH`` messages open while a receiver waits, and acknowledges what arrived together
(``ACK_BATCH`` at most) with one confirmation, in one round trip:

* a message is handed to the layer only once the server confirmed its acknowledgement,
  so one whose acknowledgement did not go through is redelivered, not received twice;
* what arrived but is not acknowledged yet is still JetStream's: if this instance stops
  receiving for ``IDLE`` seconds (its consumers are busy) it is handed back at once
  (``-NAK``) for another instance to take, and if the process dies it is redelivered
  after the consumer's acknowledgement wait;
* what is acknowledged but not received yet (at most ``ACK_BATCH``) waits for this
  instance's next ``receive``, and is pushed again when the driver closes. Only a
  receiver that keeps up (back within ``FAST``) gets more than one at a time: a worker
  busy with long jobs takes them one by one, and leaves the rest to the others.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from typing import Any

from .inbox import Inbox, status_of
from .pushing import ACK_TIMEOUT

__all__ = ["Pulls"]

BATCH = 64
ACK_BATCH = 16
PULL_AHEAD = 4  # messages asked for, per message acknowledged at once
FAST = 0.005
PULL_EXPIRES = 1.0  # seconds a pull request stays open on the server
LATE = 0.5  # after its expiry, how long a pull request's messages may still come
IDLE = 0.2
ACK_ATTEMPTS = 3
# Status codes ending a pull request: timed out, no messages (no wait), conflicts
# (the consumer was deleted, too many requests waiting...), no responders.
ENDS = frozenset({"408", "404", "409", "503"})


class Pulls:
    """One worker channel's receiving side in this driver (see the module docstring)."""

    def __init__(self, inbox: Inbox, client: Any, stream: str, consumer: str) -> None:
        self._inbox = inbox
        self.client = client
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._stream = stream
        inbox.on_stream(stream, self._on_message)
        self._arrived: collections.deque[Any] = collections.deque()  # not acknowledged
        self._taken: collections.deque[str] = collections.deque()  # acknowledged
        # Open pull requests: reply subject -> [messages still to come, deadline].
        self._requests: dict[str, list[float]] = {}
        self._wake: asyncio.Event = asyncio.Event()
        self._popping = False
        self._idle: asyncio.TimerHandle | None = None
        self.gone = False  # the consumer or its stream was deleted
        self._batch = 1  # how many to acknowledge at once (up to ACK_BATCH)
        self._handed = 0.0  # when the last message was handed to the layer

    def take(self) -> str | None:
        """An acknowledged message not handed over yet, or None (no waiting)."""
        if self._taken:
            self._handed = time.monotonic()
            return self._taken.popleft()
        return None

    async def pop(self, timeout: float) -> str | None:
        item = self.take()
        if item is not None:
            return item
        # Take more at once only from a receiver that keeps up: one that is back within
        # FAST of the last message. A worker busy with long jobs takes one at a time,
        # and leaves the rest to the others.
        if time.monotonic() - self._handed < FAST:
            self._batch = min(self._batch * 2, ACK_BATCH)
        else:
            self._batch = 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._popping = True
        try:
            while not self.gone:
                if not self._arrived:
                    await self._ask()
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        return None
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), remaining)
                    except asyncio.TimeoutError:
                        return None
                    continue
                await self._acknowledge()
                if self._taken:
                    self._handed = time.monotonic()
                    return self._taken.popleft()
            return None
        finally:
            self._popping = False
            if self._arrived:
                self._arm_idle()

    async def _ask(self) -> None:
        """Keep pull requests open for ``BATCH`` messages in all."""
        now = time.monotonic()
        wanted = size = min(BATCH, PULL_AHEAD * self._batch)
        for subject, (left, ends) in list(self._requests.items()):
            if ends + LATE < now:
                del self._requests[subject]  # its answer was lost (a reconnection)
                self._inbox.drop(subject)
            elif ends > now:
                wanted -= int(left)
        if wanted < (size + 1) // 2:
            return
        reply = self._inbox.route(self._on_message)
        self._requests[reply] = [float(wanted), now + PULL_EXPIRES]
        request = {"batch": wanted, "expires": int(PULL_EXPIRES * 1e9)}
        await self.client.publish(self._next, json.dumps(request).encode(), reply=reply)

    def _on_message(self, message: Any) -> None:
        subject = message.subject
        status = status_of(message)
        if status is not None:
            if status in ENDS:
                self._end(subject)
                if status == "503" or b"Deleted" in _description(message):
                    self.gone = True
                self._wake.set()
            return
        self._arrived.append(message)
        # A message names its stream, not the request it answers: count it off the
        # oldest open request.
        for subject, request in self._requests.items():
            request[0] -= 1
            if request[0] <= 0:
                self._end(subject)
            break
        if self._popping:
            self._wake.set()
        else:
            self._arm_idle()

    def _end(self, subject: str) -> None:
        self._requests.pop(subject, None)
        self._inbox.drop(subject)

    async def _acknowledge(self) -> None:
        """Acknowledge what arrived (``ACK_BATCH`` at most); keep it once confirmed.

        Only the last acknowledgement asks for a confirmation: the server handles a
        consumer's acknowledgements in the order they come, so its answer to the last
        one means the earlier ones were applied too.
        """
        count = min(self._batch, len(self._arrived))
        batch = [self._arrived.popleft() for _ in range(count)]
        publish = self.client.publish
        for _ in range(ACK_ATTEMPTS):
            for message in batch[:-1]:
                await publish(message.reply, b"+ACK")
            reply, future = self._inbox.expect()
            await publish(batch[-1].reply, b"+ACK", reply=reply)
            try:
                await asyncio.wait_for(future, ACK_TIMEOUT)
            except (asyncio.TimeoutError, ConnectionError):
                # The connection broke: the acknowledgements may have been applied, or
                # not. Sending them again (nats-py holds them until it is reconnected)
                # settles it, long before JetStream would redeliver the messages.
                continue
            self._taken.extend(bytes(message.data).decode("utf-8") for message in batch)
            return
        # Never confirmed: those not applied are redelivered after the ack wait.

    def _arm_idle(self) -> None:
        if self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(IDLE, self._release)

    def _release(self) -> None:
        """Nobody received for a while: hand back what arrived, for others to take."""
        self._idle = None
        if self._popping or not self._arrived:
            return
        arrived, self._arrived = self._arrived, collections.deque()
        asyncio.get_running_loop().create_task(self._nak(arrived))

    async def _nak(self, messages: collections.deque[Any]) -> None:
        try:
            for message in messages:
                await self.client.publish(message.reply, b"-NAK")
        except Exception:
            pass  # redelivered after the acknowledgement wait instead

    def leftovers(self) -> list[str]:
        """What was acknowledged but never received (to push again), and release the
        rest."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        taken, self._taken = list(self._taken), collections.deque()
        for subject in list(self._requests):
            self._end(subject)
        self._inbox.on_stream(self._stream, None)
        return taken

    async def release(self) -> None:
        arrived, self._arrived = self._arrived, collections.deque()
        await self._nak(arrived)


def _description(message: Any) -> bytes:
    headers = message.headers or {}
    return str(headers.get("Description", "")).encode()
