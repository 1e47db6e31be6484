"""The ``multiprocessing`` driver: the server processes of one host, relayed, no broker.

Processes can't message each other directly, so each connects to one relay per cluster
(``channel``) on the host, over a Unix domain socket in a directory private to the user.
The relay forwards broadcasts, routes direct messages to the one instance they name, and
holds the worker-channel queues. Start it with :func:`setup_primary` in the process that
forks the servers (gunicorn's ``on_starting`` hook), or run
``python -m crossws_channels.relay --channel NAME`` next to servers started separately.

A process that can't reach a relay fails at ``subscribe`` with
:class:`~crossws_channels.errors.RelayUnavailable`, whose message says how to start one;
once subscribed, the driver rejoins a restarted relay by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, cast

from crossws_channels.envelope import decode_envelope
from crossws_channels.errors import ConfigurationError, RelayUnavailable

from . import _mp_paths as paths
from . import _mp_wire as wire
from ._mp_options import MultiprocessingOptions
from ._mp_primary import setup_primary
from .base import Deliver, Outgoing

__all__ = ["MultiprocessingDriver", "MultiprocessingOptions", "setup_primary"]

logger = logging.getLogger(__name__)

# Reconnection backoff. The cap is low because attempts are one local syscall each, and
# it bounds how long a worker stays deaf after the relay is back.
RECONNECT_INITIAL = 0.05
RECONNECT_MAX = 0.5
HANDSHAKE_TIMEOUT = 5.0
# How long close() waits for the answers to receives it cancelled, so that an item the
# relay had already sent is put back rather than lost.
CLOSE_GRACE = 1.0


class _Request:
    __slots__ = ("abandoned", "channel", "future")

    def __init__(self, future: asyncio.Future[tuple[bool, float, bytes]], channel: str) -> None:
        self.future = future
        self.channel = channel
        self.abandoned = False


class _Connection(asyncio.Protocol):
    """One connection to the relay, from handshake to close."""

    def __init__(self, driver: MultiprocessingDriver, loop: asyncio.AbstractEventLoop) -> None:
        self.driver = driver
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.reader = wire.FrameReader()
        self.welcome: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.requests: dict[int, _Request] = {}
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
                wait = self.driver._on_message(frame[5:])
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
        self.driver._on_connection_lost(self, exc)

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

    def request(self, channel: str = "") -> tuple[int, _Request]:
        self._next_req = (self._next_req + 1) & 0xFFFFFFFF
        request = _Request(self.loop.create_future(), channel)
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


class MultiprocessingDriver:
    """A driver that relays through the host's relay for ``channel``.

    Supports direct sends, batches, worker queues and flush. Like every driver, it is used
    from one event loop: the loop it is first used on.
    """

    OPTIONS: frozenset[str] = frozenset({"socket_dir"})
    """The options it takes besides ``channel``."""

    echoes = False
    """The relay forwards a broadcast to every process but its sender."""

    def __init__(self, instance_id: str, options: Mapping[str, Any]) -> None:
        if not instance_id:
            raise ConfigurationError("the instance id must not be empty")
        self.instance_id = instance_id
        self.options = MultiprocessingOptions.from_mapping(options)
        self.path = self.options.path
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deliver: Deliver | None = None
        self._conn: _Connection | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._subscribed = False
        self._reconnecting: asyncio.Task[None] | None = None
        self._closed = False
        self._rejoined: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<MultiprocessingDriver {self.instance_id!r} channel={self.options.channel!r}>"

    # Connection management.

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._connect_lock = asyncio.Lock()
        elif loop is not self._loop:
            raise RuntimeError(
                "this MultiprocessingDriver is bound to the event loop it was first used on"
            )
        if self._closed:
            raise RuntimeError("this MultiprocessingDriver is closed")
        return loop

    def _unavailable(self, reason: str) -> RelayUnavailable:
        return RelayUnavailable(
            f"no multiprocessing relay for channel {self.options.channel!r} can be reached "
            f"at {self.path} ({reason}). Call crossws_channels.drivers.setup_primary() in "
            "the process that starts the server processes (for gunicorn: in the config's "
            "on_starting hook), or run the relay next to them: "
            f"{self.options.relay_command()}"
        )

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and conn.is_open:
            return conn
        self._bind_loop()
        if self._reconnecting is not None:
            raise RelayUnavailable(
                f"the relay for channel {self.options.channel!r} is unreachable; reconnecting"
            )
        assert self._connect_lock is not None
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and conn.is_open:
                return conn
            return await self._connect()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            paths.check_private_dir(self.path.parent)
        except FileNotFoundError:
            raise self._unavailable("its directory does not exist") from None
        except paths.UnsafeDirectory as exc:
            raise self._unavailable(str(exc)) from exc
        try:
            transport, conn = await loop.create_unix_connection(
                lambda: _Connection(self, loop), str(self.path)
            )
        except FileNotFoundError:
            raise self._unavailable("no socket") from None
        except ConnectionRefusedError:
            raise self._unavailable("the socket is stale: its relay is gone") from None
        except OSError as exc:
            raise self._unavailable(str(exc)) from exc
        try:
            sock = transport.get_extra_info("socket")
            creds = paths.peer_credentials(sock) if sock is not None else None
            if creds is not None and creds[1] != os.geteuid():
                raise self._unavailable(
                    f"the socket is served by pid {creds[0]} of uid {creds[1]}, not by this user"
                )
            conn.write(wire.hello(self.options.channel, self.instance_id, os.getpid()))
            try:
                relay_pid = await asyncio.wait_for(conn.welcome, HANDSHAKE_TIMEOUT)
            except asyncio.TimeoutError:
                raise self._unavailable(
                    f"the relay did not answer within {HANDSHAKE_TIMEOUT} s"
                ) from None
            if not conn.is_open:
                # Closed right after the welcome: don't hand out a dead connection, whose
                # loss would never be reported.
                raise self._unavailable("the relay closed the connection")
        except BaseException:
            transport.abort()
            raise
        logger.debug("connected to the relay (pid %d) at %s", relay_pid, self.path)
        self._conn = conn
        return conn

    def _on_connection_lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        if self._closed or not self._subscribed or self._deliver is None:
            return
        error = RelayUnavailable(
            f"lost the connection to the relay for channel {self.options.channel!r} at "
            f"{self.path}; reconnecting"
        )
        if exc is not None:
            error.__cause__ = exc
        logger.warning("%s", error)
        self._deliver.connection_lost(error)
        assert self._loop is not None
        self._rejoined = self._loop.create_future()
        self._reconnecting = self._loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = RECONNECT_INITIAL
        attempts = 0
        try:
            while True:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                attempts += 1
                try:
                    assert self._connect_lock is not None
                    async with self._connect_lock:
                        await self._connect()
                except Exception as exc:
                    # Whatever the reason, a worker must never stop trying: a deaf worker
                    # is worse than a noisy one.
                    logger.debug("relay still unreachable (attempt %d): %s", attempts, exc)
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
                break
        finally:
            self._reconnecting = None
            rejoined, self._rejoined = self._rejoined, None
            if rejoined is not None and not rejoined.done():
                # Waiters see the outcome through _connection(): a live connection, or
                # (when cancelled by close) a closed driver.
                rejoined.set_result(None)
        logger.info(
            "rejoined the relay for channel %r after %d attempt(s)",
            self.options.channel,
            attempts,
        )
        if self._deliver is not None:
            self._deliver.connection_made()

    def _on_message(self, envelope: bytes) -> asyncio.Future[None] | None:
        deliver = self._deliver
        if deliver is None:
            return None
        try:
            return deliver(envelope)
        except Exception:
            # Deliver promises not to raise; if it does anyway, it must not take the
            # connection down with it.
            logger.exception("deliver raised; message dropped")
            return None

    # The Driver protocol.

    async def subscribe(self, deliver: Deliver, /) -> None:
        """Connect to the relay and start delivering what it relays to this instance."""
        self._bind_loop()
        self._deliver = deliver
        await self._connection()
        self._subscribed = True

    async def publish(self, envelope: str, /) -> None:
        """Relay ``envelope`` to every other instance of the cluster."""
        conn = await self._connection()
        conn.write(wire.message(envelope.encode("utf-8")))
        await conn.drain()

    async def close(self) -> None:
        """Disconnect from the relay; receives cancelled just before are put back."""
        if self._closed:
            return
        self._closed = True
        task = self._reconnecting
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        self._deliver = None

    # Optional capabilities.

    async def publish_to(self, instance_id: str, envelope: str, /) -> None:
        """Relay ``envelope`` to the instance ``instance_id`` only."""
        conn = await self._connection()
        conn.write(wire.publish_to(instance_id, envelope.encode("utf-8")))
        await conn.drain()

    async def publish_batch(self, batch: Sequence[Outgoing], /) -> None:
        """Relay many messages in one write."""
        frames = [
            wire.message(envelope.encode("utf-8"))
            if target is None
            else wire.publish_to(target, envelope.encode("utf-8"))
            for target, envelope in batch
        ]
        if not frames:
            return
        conn = await self._connection()
        conn.writelines(frames)
        await conn.drain()

    async def queue_push(self, channel: str, item: str, capacity: int, expires: float, /) -> bool:
        """Append ``item`` to the cluster's queue ``channel``; False if it is full."""
        conn = await self._connection()
        req, request = conn.request(channel)
        data = item.encode("utf-8", "surrogatepass")
        conn.write(wire.push(req, channel, data, capacity, expires))
        ok, _expires, _data = await request.future
        return ok

    async def queue_pop(self, channel: str, timeout: float, /) -> str | None:
        """Take the oldest item of ``channel``, waiting up to ``timeout`` seconds.

        While the driver is rejoining a restarted relay (an outage the layer has already
        been told about), it waits for the rejoin within ``timeout`` instead of failing,
        so that worker channels resume as soon as the relay is back.
        """
        loop = self._bind_loop()
        deadline = loop.time() + timeout
        while True:
            conn = await self._connection_within(deadline)
            if conn is None:
                return None
            req, request = conn.request(channel)
            conn.write(wire.pop(req, channel, max(deadline - loop.time(), 0.0)))
            try:
                ok, _expires, data = await asyncio.shield(request.future)
            except asyncio.CancelledError:
                # The relay may have sent an item already; abandoning makes sure it is
                # returned to the head of the queue when it arrives.
                with contextlib.suppress(RelayUnavailable):
                    conn.abandon(req)
                raise
            except RelayUnavailable:
                if self._reconnecting is None:
                    raise
                continue
            return data.decode("utf-8", "surrogatepass") if ok else None

    async def _connection_within(self, deadline: float) -> _Connection | None:
        """The connection; during a rejoin, wait for it until ``deadline`` (then None)."""
        rejoined = self._rejoined
        if self._reconnecting is None or rejoined is None:
            return await self._connection()
        assert self._loop is not None
        try:
            await asyncio.wait_for(asyncio.shield(rejoined), max(deadline - self._loop.time(), 0.0))
        except asyncio.TimeoutError:
            return None
        return await self._connection()

    async def queue_return(self, channel: str, item: str, /) -> None:
        """Put ``item`` back at the head of ``channel``."""
        conn = await self._connection()
        # The relay purges by deadline; the layer's items carry theirs in the envelope.
        envelope = decode_envelope(item)
        expires = envelope.expires if envelope is not None and envelope.expires else math.inf
        conn.write(wire.return_(channel, item.encode("utf-8", "surrogatepass"), expires))
        await conn.drain()

    async def flush(self) -> None:
        """Empty every worker-channel queue of the cluster."""
        conn = await self._connection()
        req, request = conn.request()
        conn.write(wire.flush(req))
        await request.future
