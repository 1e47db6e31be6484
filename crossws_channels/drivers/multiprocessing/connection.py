"""The multiprocessing driver's connection to its relay: frames in, frames out.

One :class:`Connection` per connection, an ``asyncio.Protocol``. Frames the relay sends
are handled in order: broadcasts and direct messages go to the owner's
``on_message``, answers to requests (``PUSH``, ``POP``, ``FLUSH``) resolve the request's
future. When the owner asks it to wait (backpressure), it stops reading the socket and
keeps the frames already read for when it resumes; the relay buffers the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Protocol, cast

from crossws_channels.errors import RelayUnavailable

from . import wire

__all__ = ["CLOSE_GRACE", "Connection", "ConnectionOwner", "Request"]

logger = logging.getLogger("crossws_channels.drivers.multiprocessing")

# How long close() waits for the answers to receives it cancelled, so that an item the
# relay had already sent is put back rather than lost.
CLOSE_GRACE = 1.0


class ConnectionOwner(Protocol):
    """Who a :class:`Connection` reports to: the driver."""

    def on_message(self, envelope: bytes) -> asyncio.Future[None] | None: ...

    def on_connection_lost(self, conn: Connection, exc: Exception | None) -> None: ...


class Request:
    __slots__ = ("abandoned", "channel", "future")

    def __init__(self, future: asyncio.Future[tuple[bool, float, bytes]], channel: str) -> None:
        self.future = future
        self.channel = channel
        self.abandoned = False


class Connection(asyncio.Protocol):
    """One connection to the relay, from handshake to close."""

    def __init__(self, owner: ConnectionOwner, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.reader = wire.FrameReader()
        self.welcome: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.requests: dict[int, Request] = {}
        self.abandoned = 0
        self.abandoned_done: asyncio.Event = asyncio.Event()
        self._next_req = 0
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        # Frames read while the layer asked to wait (backpressure): reading is paused,
        # and these go first when it resumes.
        self._held: deque[bytes] | None = None

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except wire.ProtocolError as exc:
            logger.warning("dropping the relay connection: %s", exc)
            self.abort()
            return
        if self._held is not None:
            self._held.extend(frames)
            return
        self._dispatch(deque(frames))

    def _dispatch(self, frames: deque[bytes]) -> None:
        """Handle ``frames`` in order, until the layer asks to wait; then stop reading
        (the relay buffers for us) and go on once it says so."""
        while frames:
            frame = frames.popleft()
            op = frame[4]
            if op == wire.MESSAGE:
                wait = self.owner.on_message(frame[5:])
                if wait is not None:
                    self._held = frames
                    if self.transport is not None and not self.transport.is_closing():
                        self.transport.pause_reading()
                    wait.add_done_callback(self._resume)
                    return
            elif op == wire.REPLY:
                self._on_reply(memoryview(frame)[5:])
            elif op == wire.WELCOME:
                if not self.welcome.done():
                    self.welcome.set_result(wire.parse_req(memoryview(frame)[5:]))
            elif op == wire.REFUSED:
                reason = frame[5:].decode("utf-8", "replace")
                if not self.welcome.done():
                    self.welcome.set_exception(
                        RelayUnavailable(f"the relay refused this process: {reason}")
                    )
            else:
                logger.warning("ignoring an unknown operation %#04x from the relay", op)

    def _resume(self, _wait: asyncio.Future[None]) -> None:
        frames, self._held = self._held, None
        if frames is None or self.transport is None:
            return  # the connection is gone
        self._dispatch(frames)
        if self._held is None and not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._held = None
        error = RelayUnavailable("the connection to the relay was lost")
        if exc is not None:
            error.__cause__ = exc
        if not self.welcome.done():
            self.welcome.set_exception(error)
            # Retrieved or not, it must not be logged as "never retrieved".
            self.welcome.exception()
        for request in self.requests.values():
            if request.abandoned:
                request.future.cancel()
            elif not request.future.done():
                request.future.set_exception(error)
        self.requests.clear()
        self.abandoned_done.set()
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(error)
            self._drained.exception()
        if not self.closed.done():
            self.closed.set_result(None)
        self.owner.on_connection_lost(self, exc)

    # Used by the driver.

    def write(self, frame: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise RelayUnavailable("the connection to the relay is closed")
        self.transport.write(frame)

    def writelines(self, frames: list[bytes]) -> None:
        if self.transport is None or self.transport.is_closing():
            raise RelayUnavailable("the connection to the relay is closed")
        self.transport.writelines(frames)

    async def drain(self) -> None:
        if self._paused:
            if self._drained is None:
                self._drained = self.loop.create_future()
            await asyncio.shield(self._drained)

    def request(self, channel: str = "") -> tuple[int, Request]:
        self._next_req = (self._next_req + 1) & 0xFFFFFFFF
        request = Request(self.loop.create_future(), channel)
        self.requests[self._next_req] = request
        return self._next_req, request

    def abandon(self, req: int) -> None:
        """Give up on a pending ``POP``: an item that still arrives goes back to the queue."""
        request = self.requests.get(req)
        if request is None or request.abandoned or not self.is_open:
            return
        request.abandoned = True
        self.abandoned += 1
        self.abandoned_done.clear()
        self.write(wire.cancel(req))

    def _on_reply(self, body: memoryview) -> None:
        req, ok, expires, data = wire.parse_reply(body)
        request = self.requests.pop(req, None)
        if request is None:
            return
        if request.abandoned:
            request.future.cancel()
            if ok:
                with contextlib.suppress(RelayUnavailable):
                    self.write(wire.return_(request.channel, data, expires))
            self.abandoned -= 1
            if not self.abandoned:
                self.abandoned_done.set()
        elif not request.future.done():
            request.future.set_result((ok, expires, data))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def close(self) -> None:
        if self.abandoned and self.is_open:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.abandoned_done.wait(), CLOSE_GRACE)
        if self.transport is not None:
            self.transport.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), CLOSE_GRACE)
        if not self.closed.done():
            self.abort()
            await self.closed
