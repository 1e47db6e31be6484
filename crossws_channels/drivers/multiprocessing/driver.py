"""The ``multiprocessing`` driver: the server processes of one host, relayed, no broker.

Processes can't message each other directly, so each connects to one relay per cluster
(``channel``) on the host, over a Unix domain socket in a directory private to the user.
The relay forwards broadcasts, routes direct messages to the one instance they name, and
holds the worker-channel queues. Start it with :func:`setup_primary` in the process that
forks the servers (gunicorn's ``on_starting`` hook), or run
``python -m crossws_channels.relay --channel NAME`` next to servers started separately.

A process that can't reach a relay fails at ``listen`` with
:class:`~crossws_channels.errors.RelayUnavailable`, whose message says how to start one
(the layer reports it, and tries again with backoff, so the process joins a relay that
starts later, or one restarted, by itself).

One connection carries everything: relayed messages, publishes and worker-queue requests
(:mod:`.connection`). ``listen`` lasts as long as it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from crossws_channels.envelope import decode_envelope
from crossws_channels.errors import ConfigurationError, RelayUnavailable

from ..base import Deliver, Outgoing, Ready
from . import paths, wire
from .connection import Connection
from .options import MultiprocessingOptions

__all__ = ["MultiprocessingDriver"]

logger = logging.getLogger("crossws_channels.drivers.multiprocessing")

HANDSHAKE_TIMEOUT = 5.0


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
        self._conn: Connection | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._closed = False
        # Set while connected; cleared when the listening connection was lost, until
        # ``listen`` (the layer's supervisor) connects again: worker-channel receives
        # wait for that instead of failing (the outage is reported once, by the layer).
        self._rejoined: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<MultiprocessingDriver {self.instance_id!r} channel={self.options.channel!r}>"

    # Connection management.

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._connect_lock = asyncio.Lock()
            self._rejoined = asyncio.Event()
            self._rejoined.set()
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

    async def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and conn.is_open:
            return conn
        self._bind_loop()
        assert self._connect_lock is not None
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and conn.is_open:
                return conn
            return await self._connect()

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            paths.check_private_dir(self.path.parent)
        except FileNotFoundError:
            raise self._unavailable("its directory does not exist") from None
        except paths.UnsafeDirectory as exc:
            raise self._unavailable(str(exc)) from exc
        try:
            transport, conn = await loop.create_unix_connection(
                lambda: Connection(self, loop), str(self.path)
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
        if self._rejoined is not None:
            self._rejoined.set()
        return conn

    # What the connection reports.

    def on_connection_lost(self, conn: Connection, exc: Exception | None) -> None:
        if conn is self._conn:
            self._conn = None
            if self._rejoined is not None and not self._closed:
                self._rejoined.clear()

    def on_message(self, envelope: bytes) -> asyncio.Future[None] | None:
        """A broadcast or direct message, for the layer (a future: wait, backpressure)."""
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

    async def listen(self, deliver: Deliver, ready: Ready, /) -> None:
        """Connect to the relay and deliver what it relays to this instance, until the
        connection is lost (then raise; the layer connects again, with backoff)."""
        self._bind_loop()
        self._deliver = deliver
        conn = await self._connection()
        ready()
        await asyncio.shield(conn.closed)
        raise RelayUnavailable(
            f"lost the connection to the relay for channel {self.options.channel!r} at {self.path}"
        )

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
        if self._rejoined is not None:
            self._rejoined.set()  # receives waiting for a rejoin find the driver closed
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
                if self._rejoined is None or self._rejoined.is_set():
                    raise
                continue  # the connection was lost: wait for the rejoin
            return data.decode("utf-8", "surrogatepass") if ok else None

    async def _connection_within(self, deadline: float) -> Connection | None:
        """The connection; after it was lost, wait for the rejoin until ``deadline``
        (then None)."""
        rejoined = self._rejoined
        if rejoined is not None and not rejoined.is_set():
            assert self._loop is not None
            try:
                await asyncio.wait_for(rejoined.wait(), max(deadline - self._loop.time(), 0.0))
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
