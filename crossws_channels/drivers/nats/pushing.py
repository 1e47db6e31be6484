"""Pushing to a worker channel's stream without a round trip per message.

Waiting for JetStream's acknowledgement of every push costs a round trip each (and on a
busy machine the round trip costs more than everything else the push does), yet it is
what tells ``send`` that the channel is full. So a sender waits only when it must:

* While the channel is known to have room, pushes are *pipelined*: ``send`` returns once
  the message is written, and the acknowledgement is checked when it comes. "Known room"
  is the channel's capacity less what the stream held at the last look (the answer when
  the stream was made, or a ``STREAM.INFO`` when the room is used up) less what this
  sender pushed since. Receivers only ever take messages out, so for a channel with one
  sender that room is never more than the real one. At most ``WINDOW`` pushes are
  unacknowledged at once.
* When a look finds the channel full, and for small capacities (under ``PIPELINE_FROM``,
  where one push more is a fraction that matters), every push waits for its
  acknowledgement: the server's "maximum messages exceeded" makes ``send`` raise
  ``ChannelFull`` exactly at capacity.
* If a pipelined push is refused all the same (several senders each counted the same
  room), the message is kept, in order, and pushed again as room frees up, until its
  expiry; meanwhile this sender's pushes to the channel return False (``ChannelFull``),
  as the channel is full. Nothing ``send`` accepted is dropped for want of room.

Why not stop at half the capacity, so that several senders rarely overrun it: the
receivers' pull requests keep messages coming ahead of ``receive``, and those count in the
stream until they are acknowledged, so a busy channel is more than half full most of the
time, and every push would wait for a round trip.

A push that gets no acknowledgement within ``ACK_TIMEOUT`` (the connection broke) may or
may not be stored; it is reported, as a failed awaited push is.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .inbox import Answer, Inbox

__all__ = ["ACK_TIMEOUT", "MAX_MESSAGES", "UNKNOWN", "PushLost", "Pushes", "Refused", "StreamGone"]

logger = logging.getLogger("crossws_channels.drivers.nats")

MAX_MESSAGES = 10077  # JetStream's "maximum messages exceeded" (discard new)
NO_RESPONDERS = "503"
ACK_TIMEOUT = 2.0
UNKNOWN = 1 << 62  # a stream's fill not known: as if full
WINDOW = 32
PIPELINE_FROM = 16
LOOK_EVERY = 16
RETRY_FIRST, RETRY_MAX = 0.005, 0.2


class StreamGone(Exception):
    """No stream takes the channel's subject (another instance flushed it)."""


class PushLost(ConnectionError):
    """Pipelined pushes that NATS never acknowledged: they may be lost."""


class Refused(Exception):
    """JetStream refused a push for another reason than a full channel."""


Report = Callable[[Exception], None]


class _Unacked:
    """A pipelined push, until its acknowledgement is settled."""

    __slots__ = ("answer", "data", "expires", "reply", "sent")

    def __init__(self, reply: str, data: bytes, expires: float, sent: float) -> None:
        self.reply = reply
        self.data = data
        self.expires = expires
        self.sent = sent
        self.answer: Answer | None = None


class Pushes:
    """One worker channel's pushes from this driver (see the module docstring)."""

    def __init__(
        self,
        inbox: Inbox,
        subject: str,
        stream: str,
        client: Any,
        stored: int,
        report: Report,
        remake: Callable[[], Awaitable[None]],
    ) -> None:
        self._inbox = inbox
        self._subject = subject
        self._stream = stream
        self.client = client
        self._stored = stored  # what the stream held at the last look
        self._since = 0  # pushed since that look
        self._report = report
        self._remake = remake
        # Pipelined pushes in order, and by reply subject those not acknowledged yet.
        self._unacked: collections.deque[_Unacked] = collections.deque()
        self._entries: dict[str, _Unacked] = {}
        self._waiter: asyncio.Future[None] | None = None
        self._held: collections.deque[tuple[bytes, float]] = collections.deque()
        self._retrying: asyncio.Task[None] | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._awaited_until_look = 0

    async def push(self, data: bytes, capacity: int, expires: float) -> bool:
        if self._held:
            return False
        if capacity >= PIPELINE_FROM:
            if self._stored + self._since >= capacity and self._awaited_until_look <= 0:
                await self._look()
                if self._stored + self._since >= capacity:
                    # Full: the pushes that follow wait for their answers (which say
                    # whether there is room) rather than each pay for a look.
                    self._awaited_until_look = LOOK_EVERY
            if self._stored + self._since < capacity:
                while len(self._unacked) >= WINDOW:
                    await self._settle_oldest()
                await self._pipeline(data, expires)
                return True
            self._awaited_until_look -= 1
        answer = await self._push_once(data)
        return self._stored_or_full(answer)

    def seen(self, stored: int) -> None:
        """The stream held ``stored`` messages just now (it was made or updated)."""
        self._stored, self._since = stored, 0

    async def push_now(self, data: bytes) -> bool:
        """Push and wait for the acknowledgement; False if the channel is full."""
        return self._stored_or_full(await self._push_once(data))

    # Pipelined

    async def _pipeline(self, data: bytes, expires: float) -> None:
        reply = self._inbox.call(self._answered)
        # nats-py's publish appends to its write buffer; its flusher writes it soon.
        await self.client.publish(self._subject, data, reply=reply)
        self._since += 1
        entry = _Unacked(reply, data, expires, time.monotonic())
        self._unacked.append(entry)
        self._entries[reply] = entry
        if self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(ACK_TIMEOUT, self._overdue)

    def _answered(self, reply: str, answer: Answer) -> None:
        entry = self._entries.pop(reply, None)
        if entry is None:
            return  # given up on already
        entry.answer = answer
        # Acknowledgements come in the order of the pushes, on one connection.
        unacked = self._unacked
        while unacked and unacked[0].answer is not None:
            self._settle(unacked.popleft())
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _settle(self, entry: _Unacked) -> None:
        answer = entry.answer
        assert answer is not None
        if answer.status == NO_RESPONDERS:
            self._hold(entry.data, entry.expires)  # pushed again once the stream is back
            return
        code = answer.error_code()
        if code is None:
            return
        if code == MAX_MESSAGES:
            self._hold(entry.data, entry.expires)
        else:
            self._report(self._refused(answer))

    async def _settle_oldest(self) -> None:
        """Wait until the oldest pipelined push is acknowledged (or given up on)."""
        oldest = self._unacked[0]
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(waiter, oldest.sent + ACK_TIMEOUT - time.monotonic())
        except asyncio.TimeoutError:
            self._overdue()
        finally:
            self._waiter = None

    def _overdue(self) -> None:
        """Give up on pushes unacknowledged for ``ACK_TIMEOUT``: report them."""
        self._watch = None
        deadline = time.monotonic() - ACK_TIMEOUT
        lost = 0
        unacked = self._unacked
        while unacked and unacked[0].sent <= deadline:
            entry = unacked.popleft()
            if entry.answer is not None:
                self._settle(entry)
                continue
            self._entries.pop(entry.reply, None)
            self._inbox.drop(entry.reply)
            lost += 1
        if lost:
            self._report(PushLost(f"{lost} pushes to {self._stream} got no acknowledgement"))
        if unacked:
            wait = unacked[0].sent + ACK_TIMEOUT - time.monotonic()
            self._watch = asyncio.get_running_loop().call_later(max(wait, 0.01), self._overdue)

    async def _look(self) -> None:
        """Learn how much the stream holds now."""
        self._since = 0
        try:
            answer = await self._inbox.request(
                f"$JS.API.STREAM.INFO.{self._stream}", b"", ACK_TIMEOUT
            )
            self._stored = int(answer.json()["state"]["messages"])
        except Exception:
            # Can't tell: push as if the channel were full (waiting for each ack).
            self._stored = UNKNOWN

    # Held back

    def _hold(self, data: bytes, expires: float) -> None:
        self._held.append((data, expires))
        if self._retrying is None:
            self._retrying = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        wait = RETRY_FIRST
        try:
            while self._held:
                data, expires = self._held[0]
                if time.time() >= expires:
                    self._held.popleft()
                    continue  # expired unread, as it would have in the stream
                try:
                    stored = await self.push_now(data)
                except StreamGone:
                    await self._remake()
                    continue
                except Exception as exc:
                    self._report(exc)
                    stored = False
                if stored:
                    self._held.popleft()
                    wait = RETRY_FIRST
                else:
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, RETRY_MAX)
        finally:
            self._retrying = None

    # Awaited

    async def _push_once(self, data: bytes) -> Answer:
        self._since += 1
        answer = await self._inbox.request(self._subject, data, ACK_TIMEOUT)
        if answer.status == NO_RESPONDERS:
            raise StreamGone(self._stream)
        return answer

    def _stored_or_full(self, answer: Answer) -> bool:
        code = answer.error_code()
        if code is None:
            return True
        if code == MAX_MESSAGES:
            self._stored = UNKNOWN  # full: look again before pipelining anything
            return False
        raise self._refused(answer)

    def _refused(self, answer: Answer) -> Refused:
        return Refused(f"JetStream refused a push to {self._stream}: {answer.data!r}")

    # The end

    async def drain(self, timeout: float) -> None:
        """Wait for what is on its way (acknowledged, or given up on, or held)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._unacked and loop.time() < deadline:
            await self._settle_oldest()
        retrying = self._retrying
        if retrying is not None:
            await asyncio.wait([retrying], timeout=max(deadline - loop.time(), 0))

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        lost = sum(1 for entry in self._unacked if entry.answer is None) + len(self._held)
        for reply in self._entries:
            self._inbox.drop(reply)
        self._unacked.clear()
        self._entries.clear()
        self._held.clear()
        if self._retrying is not None:
            self._retrying.cancel()
        if lost:
            self._report(PushLost(f"{lost} pushes to {self._stream} were not stored at close"))

    def discard(self) -> None:
        """Forget everything without reporting (the stream was deleted on purpose)."""
        self._unacked.clear()
        self._entries.clear()
        self._held.clear()
        self.close()
