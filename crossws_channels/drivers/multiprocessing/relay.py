"""The relay of the multiprocessing driver: one per ``channel`` per user per host.

It accepts the server processes' connections on a Unix socket and

* forwards each broadcast to every other connected instance,
* routes a direct message to the one instance it names,
* holds the worker-channel queues, handing each item to exactly one receiver.

It keeps no state for an instance beyond its connection: when a process dies, the kernel
closes its socket and the relay forgets its pending receives. Messages are never stored
for an instance that is not connected (at most once, as on the other backplanes).

Run it with :func:`serve` (``python -m crossws_channels.relay`` and ``setup_primary()``
both do). A file lock held for the relay's lifetime decides who serves a channel, so a
second relay refuses to start and a socket left by a dead one is known to be stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import math
import os
import signal
import stat
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import cast

from . import paths, wire

__all__ = ["Relay", "RelayAlreadyRunning", "acquire_lock", "serve"]

logger = logging.getLogger(__name__)

# A client that stops reading is cut off once this much is waiting for it, so that one
# stuck process can't make the relay (and so every other process) run out of memory.
MAX_BUFFERED = 64 * 1024 * 1024
HELLO_TIMEOUT = 5.0
# Connections open at once, said hello or not: far more processes than one host runs,
# few enough that a runaway client can't exhaust the relay's file descriptors.
MAX_CONNECTIONS = 1024
SWEEP_INTERVAL = 1.0
PARENT_POLL_INTERVAL = 0.25


class RelayAlreadyRunning(Exception):
    """A live relay already serves this channel (it holds the lock)."""

    def __init__(self, channel: str, pid: int | None) -> None:
        owner = f" (pid {pid})" if pid else ""
        super().__init__(f"a relay for channel {channel!r} is already running{owner}")
        self.pid = pid


class _Waiter:
    """A receiver blocked in ``POP`` until an item arrives or its timeout passes."""

    __slots__ = ("channel", "peer", "req", "timer")

    def __init__(self, peer: _Peer, req: int, channel: str) -> None:
        self.peer = peer
        self.req = req
        self.channel = channel
        self.timer: asyncio.TimerHandle | None = None


class _Peer(asyncio.Protocol):
    """One connected instance."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.reader = wire.FrameReader(wire.MAX_HELLO_FRAME)
        self.instance_id: str | None = None
        self.pid = 0
        self.outbox: list[bytes] = []
        self.waiters: dict[int, _Waiter] = {}
        self.hello_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"instance {self.instance_id!r} (pid {self.pid})"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if len(self.relay.connections) >= MAX_CONNECTIONS:
            self.relay.refused_connections += 1
            if self.relay.refused_connections == 1:
                logger.warning(
                    "refusing connections: %d are open already (the relay's limit); "
                    "counted in the relay's stopping line",
                    MAX_CONNECTIONS,
                )
            self.transport.abort()
            return
        self.relay.connections.add(self)
        sock = transport.get_extra_info("socket")
        creds = paths.peer_credentials(sock) if sock is not None else None
        if creds is not None:
            self.pid = creds[0]
            if creds[1] != os.geteuid():
                logger.warning(
                    "refused a connection from pid %d of uid %d: only processes of uid %d "
                    "may use this relay",
                    creds[0],
                    creds[1],
                    os.geteuid(),
                )
                self.transport.abort()
                return
        self.hello_timer = self.relay.loop.call_later(HELLO_TIMEOUT, self._hello_timeout)

    def _hello_timeout(self) -> None:
        logger.warning("dropped a connection (pid %d) that sent no hello", self.pid)
        self.abort()

    def data_received(self, data: bytes) -> None:
        try:
            if self.instance_id is None:
                # Before the hello only the hello, under its small limit; what came with
                # it is read on under the limit that the hello raised.
                for frame in self.reader.feed(data, most=1):
                    self.relay.dispatch(self, frame)
                if self.instance_id is None:
                    return
                data = b""
            for frame in self.reader.feed(data):
                if self.transport is None or self.transport.is_closing():
                    return
                self.relay.dispatch(self, frame)
        except (wire.ProtocolError, ValueError, UnicodeDecodeError) as exc:
            logger.warning("dropped %r: protocol error: %s", self, exc)
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.hello_timer is not None:
            self.hello_timer.cancel()
        self.relay.connections.discard(self)
        self.relay.forget(self)

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class Relay:
    """The relay's state: connected instances and worker-channel queues."""

    def __init__(self, channel: str, loop: asyncio.AbstractEventLoop) -> None:
        self.channel = channel
        self.loop = loop
        self.connections: set[_Peer] = set()
        self.peers: set[_Peer] = set()  # connections that said hello
        self.instances: dict[str, _Peer] = {}
        self.queues: dict[str, deque[tuple[bytes, float]]] = {}
        self.waiters: dict[str, deque[_Waiter]] = {}
        self.relayed = 0
        self.dropped = 0
        self.refused_connections = 0
        self._dirty: set[_Peer] = set()
        self._flush_scheduled = False

    # Output: frames collect per peer and go out in one write per peer per loop turn.

    def send(self, peer: _Peer, frame: bytes) -> None:
        peer.outbox.append(frame)
        self._dirty.add(peer)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for peer in dirty:
            frames, peer.outbox = peer.outbox, []
            transport = peer.transport
            if transport is None or transport.is_closing():
                continue
            transport.writelines(frames)
            if transport.get_write_buffer_size() > MAX_BUFFERED:
                logger.warning(
                    "dropped %r: it stopped reading and over %d bytes are waiting for it",
                    peer,
                    MAX_BUFFERED,
                )
                transport.abort()

    # Input.

    def dispatch(self, peer: _Peer, frame: bytes) -> None:
        op = frame[4]
        body = memoryview(frame)[5:]
        if peer.instance_id is None:
            if op != wire.HELLO:
                raise wire.ProtocolError(f"expected hello, got operation {op:#04x}")
            self._hello(peer, body)
        elif op == wire.MESSAGE:
            # Forward the frame exactly as it came: the same bytes object for everyone.
            self.relayed += 1
            for other in self.peers:
                if other is not peer:
                    self.send(other, frame)
        elif op == wire.PUBLISH_TO:
            target_id, envelope = wire.parse_publish_to(body)
            target = self.instances.get(target_id)
            if target is None:
                self.dropped += 1
                logger.debug("no instance %r connected; direct message dropped", target_id)
            else:
                self.relayed += 1
                self.send(target, wire.message(envelope.tobytes()))
        elif op == wire.PUSH:
            req, capacity, expires, channel, item = wire.parse_push(body)
            self.send(peer, wire.reply(req, self._push(channel, item, capacity, expires)))
        elif op == wire.POP:
            self._pop(peer, *wire.parse_pop(body))
        elif op == wire.RETURN:
            expires, channel, item = wire.parse_return(body)
            self._return(channel, item, expires)
        elif op == wire.CANCEL:
            self._cancel(peer, wire.parse_req(body))
        elif op == wire.FLUSH:
            self.queues.clear()
            self.send(peer, wire.reply(wire.parse_req(body), True))
        else:
            raise wire.ProtocolError(f"unknown operation {op:#04x}")

    def _hello(self, peer: _Peer, body: memoryview) -> None:
        version, pid, channel, instance_id = wire.parse_hello(body)
        if peer.hello_timer is not None:
            peer.hello_timer.cancel()
            peer.hello_timer = None
        peer.pid = peer.pid or pid
        reason = None
        if version != wire.PROTOCOL_VERSION:
            reason = (
                f"protocol version {version} is not supported (this relay speaks "
                f"{wire.PROTOCOL_VERSION}); run the same crossws_channels version everywhere"
            )
        elif channel != self.channel:
            reason = f"this relay serves channel {self.channel!r}, not {channel!r}"
        elif not instance_id:
            reason = "empty instance id"
        elif instance_id in self.instances and self.instances[instance_id].pid != peer.pid:
            # Two live processes with one identity would keep disconnecting each other and
            # receive each other's direct messages: refuse the newcomer, loudly.
            reason = (
                f"instance id {instance_id!r} is already connected from pid "
                f"{self.instances[instance_id].pid}; "
                "two processes share one layer instance (was the channel layer created "
                "before the server processes forked?)"
            )
        if reason is not None:
            logger.warning("refused pid %d: %s", peer.pid, reason)
            if peer.transport is not None:
                peer.transport.write(wire.refused(reason))
                peer.transport.close()
            return
        previous = self.instances.get(instance_id)
        if previous is not None:
            # The same process reconnected before its old connection was seen to close.
            logger.info("%r reconnected; closing its previous connection", previous)
            self.forget(previous)
            previous.abort()
        peer.instance_id = instance_id
        peer.reader.limit = wire.MAX_FRAME
        self.instances[instance_id] = peer
        self.peers.add(peer)
        self.send(peer, wire.welcome(os.getpid()))
        logger.info("%r joined (%d connected)", peer, len(self.peers))

    def forget(self, peer: _Peer) -> None:
        """Drop everything the relay holds for ``peer``; its pending receives end."""
        for waiter in peer.waiters.values():
            self._unlink_waiter(waiter)
        peer.waiters.clear()
        peer.outbox.clear()
        self._dirty.discard(peer)
        if peer in self.peers:
            self.peers.discard(peer)
            if peer.instance_id is not None and self.instances.get(peer.instance_id) is peer:
                del self.instances[peer.instance_id]
            logger.info("%r left (%d connected)", peer, len(self.peers))

    # Worker-channel queues.

    def _push(self, channel: str, item: bytes, capacity: int, expires: float) -> bool:
        now = time.time()
        if expires <= now:
            # Already too old to be received: accepted, and dropped as expiry says.
            return True
        if self._hand_over(channel, item, expires):
            return True
        queue = self.queues.get(channel)
        if queue is None:
            queue = self.queues[channel] = deque()
        if len(queue) >= capacity:
            self._purge(channel, queue, now)
            if len(queue) >= capacity:
                return False
        queue.append((item, expires))
        return True

    def _hand_over(self, channel: str, item: bytes, expires: float) -> bool:
        waiters = self.waiters.get(channel)
        if not waiters:
            return False
        waiter = waiters.popleft()
        if not waiters:
            del self.waiters[channel]
        del waiter.peer.waiters[waiter.req]
        if waiter.timer is not None:
            waiter.timer.cancel()
        self.send(waiter.peer, wire.reply(waiter.req, True, item, expires))
        return True

    def _pop(self, peer: _Peer, req: int, timeout: float, channel: str) -> None:
        queue = self.queues.get(channel)
        if queue:
            now = time.time()
            while queue:
                item, expires = queue.popleft()
                if expires > now:
                    if not queue:
                        del self.queues[channel]
                    self.send(peer, wire.reply(req, True, item, expires))
                    return
            del self.queues[channel]
        if not timeout > 0:  # also catches NaN
            self.send(peer, wire.reply(req, False))
            return
        waiter = _Waiter(peer, req, channel)
        if math.isfinite(timeout):
            waiter.timer = self.loop.call_later(timeout, self._timeout, waiter)
        peer.waiters[req] = waiter
        self.waiters.setdefault(channel, deque()).append(waiter)

    def _timeout(self, waiter: _Waiter) -> None:
        waiter.timer = None
        if waiter.peer.waiters.pop(waiter.req, None) is not None:
            self._unlink_waiter(waiter)
            self.send(waiter.peer, wire.reply(waiter.req, False))

    def _cancel(self, peer: _Peer, req: int) -> None:
        # Unknown req: its reply is already on the way, and answers the cancel too.
        waiter = peer.waiters.pop(req, None)
        if waiter is not None:
            self._unlink_waiter(waiter)
            self.send(peer, wire.reply(req, False))

    def _unlink_waiter(self, waiter: _Waiter) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
        waiters = self.waiters.get(waiter.channel)
        if waiters is not None:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
            if not waiters:
                del self.waiters[waiter.channel]

    def _return(self, channel: str, item: bytes, expires: float) -> None:
        if expires <= time.time() or self._hand_over(channel, item, expires):
            return
        queue = self.queues.get(channel)
        if queue is None:
            queue = self.queues[channel] = deque()
        # Capacity is not checked: the item was accepted once, and returning it must not
        # lose it.
        queue.appendleft((item, expires))

    def _purge(self, channel: str, queue: deque[tuple[bytes, float]], now: float) -> None:
        kept = [entry for entry in queue if entry[1] > now]
        if len(kept) != len(queue):
            queue.clear()
            queue.extend(kept)

    def sweep(self) -> None:
        """Drop expired items from every queue, so unread channels don't hold memory."""
        now = time.time()
        for channel, queue in list(self.queues.items()):
            self._purge(channel, queue, now)
            if not queue:
                del self.queues[channel]

    def close_all(self) -> None:
        for peer in list(self.connections):
            self.forget(peer)
            if peer.transport is not None:
                peer.transport.close()


def acquire_lock(path: Path, channel: str) -> int:
    """Take the relay lock for ``channel``; return its file descriptor.

    The kernel releases the lock when the process dies, however it dies, so holding it is
    proof of a live relay.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            os.close(fd)
            raise
        try:
            pid: int | None = int(os.pread(fd, 32, 0).decode("ascii").strip() or "0") or None
        except (OSError, ValueError):
            pid = None
        os.close(fd)
        raise RelayAlreadyRunning(channel, pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def _remove_stale_socket(path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; not removing it")
    logger.info("removing the stale socket %s left by a relay that died", path)
    path.unlink()


async def serve(
    channel: str,
    socket_dir: Path,
    *,
    stop: asyncio.Event | None = None,
    parent_pid: int | None = None,
    on_ready: Callable[[Path], None] | None = None,
) -> Relay:
    """Run a relay until ``stop`` is set, SIGTERM/SIGINT arrive or ``parent_pid`` dies.

    Raises :class:`RelayAlreadyRunning` if another relay serves ``channel``, and
    :class:`~crossws_channels.drivers.multiprocessing.paths.UnsafeDirectory` if the directory is not
    private. Returns the relay's final state.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    paths.ensure_private_dir(socket_dir)
    path = paths.socket_path(channel, socket_dir)
    lock_fd = acquire_lock(paths.lock_path(channel, socket_dir), channel)
    relay = Relay(channel, loop)
    handled: list[signal.Signals] = []
    tasks: list[asyncio.Task[None]] = []
    server: asyncio.AbstractServer | None = None
    bound: os.stat_result | None = None
    try:
        _remove_stale_socket(path)
        server = await loop.create_unix_server(lambda: _Peer(relay), str(path), backlog=1024)
        bound = os.lstat(path)
        os.chmod(path, 0o600)
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stop.set)
                handled.append(signum)
        tasks.append(loop.create_task(_sweep(relay)))
        if parent_pid is not None:
            tasks.append(loop.create_task(_watch_parent(parent_pid, stop)))
        logger.info("relay for channel %r listening on %s (pid %d)", channel, path, os.getpid())
        if on_ready is not None:
            on_ready(path)
        await stop.wait()
        logger.info(
            "relay for channel %r stopping: %d message(s) relayed, %d direct message(s) "
            "to absent instances dropped, %d connection(s) refused over the limit",
            channel,
            relay.relayed,
            relay.dropped,
            relay.refused_connections,
        )
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for signum in handled:
            loop.remove_signal_handler(signum)
        if server is not None:
            server.close()
            relay.close_all()
            await server.wait_closed()
            # Remove the socket only if it is still ours: an operator may already have
            # started a replacement that bound a new one at the same path.
            with contextlib.suppress(FileNotFoundError):
                current = os.lstat(path)
                if bound is not None and (current.st_ino, current.st_dev) == (
                    bound.st_ino,
                    bound.st_dev,
                ):
                    path.unlink()
        os.close(lock_fd)
    return relay


async def _sweep(relay: Relay) -> None:
    while True:
        await asyncio.sleep(SWEEP_INTERVAL)
        relay.sweep()


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    # Polling getppid works everywhere and survives the parent being SIGKILLed; once the
    # parent is gone the relay is re-parented and getppid changes.
    while True:
        if os.getppid() != parent_pid:
            break
        await asyncio.sleep(PARENT_POLL_INTERVAL)
    logger.info("the process that started this relay (pid %d) exited; stopping", parent_pid)
    stop.set()
