"""The ``local`` driver: layer instances of one process form a cluster.

The counterpart of crossws's ``broadcastChannel`` driver: every layer instance in this
process with the same ``channel`` relays to the others, across threads and event loops.
It is the driver for a single-process deployment, for tests, and for several layers in one
process (for example one per thread, each with its own loop). Separate OS processes never
see each other: for those, use ``multiprocessing``, ``redis`` or ``pgsql``.

It behaves as a real pub/sub backplane does: it echoes a publish back to the sender, and
the layer's echo suppression drops it. Each subscriber has an inbox, emptied on its own
loop; while the layer asks it to wait (backpressure), the inbox holds what arrives, and a
publisher whose messages would take an inbox past :data:`INBOX_LIMIT` waits for room (at
most :data:`ROOM_WAIT` seconds), as it would for a socket's buffer.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from ..loops import wake
from .base import Deliver, Outgoing, Ready, Topic

__all__ = ["INBOX_LIMIT", "ROOM_WAIT", "LocalDriver"]

INBOX_LIMIT = 8192
ROOM_WAIT = 5.0


class _SharedQueue:
    __slots__ = ("items", "waiters")

    def __init__(self) -> None:
        self.items: deque[tuple[float, str]] = deque()
        self.waiters: deque[asyncio.Future[None]] = deque()


class _Subscriber:
    """One instance's subscription: an inbox delivered in order on the instance's loop."""

    __slots__ = ("_inbox", "_lock", "_paused", "_room", "deliver", "loop", "queued", "topics")

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Deliver, topics: set[str]) -> None:
        self.loop = loop
        self.deliver = deliver
        # The instance's topics (its driver's set, shared): read by publishers.
        self.topics = topics
        self._inbox: deque[str] = deque()
        self._paused = False
        self._lock = threading.Lock()
        # Messages posted and not delivered yet (read by publishers on other threads).
        self.queued = 0
        self._room: list[asyncio.Future[None]] = []

    def post(self, texts: list[str]) -> None:
        """From any thread. Raises RuntimeError if the subscriber's loop is closed."""
        with self._lock:
            self.queued += len(texts)
        self.loop.call_soon_threadsafe(self._arrive, texts)

    async def room(self) -> None:
        """Wait (boundedly) until the inbox is below its limit."""
        waiter = asyncio.get_running_loop().create_future()
        with self._lock:
            if self.queued < INBOX_LIMIT:
                return
            self._room.append(waiter)
        try:
            await asyncio.wait_for(waiter, ROOM_WAIT)
        except asyncio.TimeoutError:
            pass  # a subscriber that stopped delivering must not stop the publisher

    def _arrive(self, texts: list[str]) -> None:
        self._inbox.extend(texts)
        if not self._paused:
            self._pump()

    def _pump(self, _wait: object = None) -> None:
        self._paused = False
        inbox, deliver = self._inbox, self.deliver
        delivered = 0
        while inbox:
            delivered += 1
            wait = deliver(inbox.popleft())
            if wait is not None:
                self._paused = True
                wait.add_done_callback(self._pump)
                break
        with self._lock:
            self.queued -= delivered
            if self.queued >= INBOX_LIMIT // 2 or not self._room:
                return
            room, self._room = self._room, []
        current = asyncio.get_running_loop()
        for waiter in room:
            wake(waiter, current)


class _Cluster:
    __slots__ = ("queues", "subscribers")

    def __init__(self) -> None:
        self.subscribers: dict[str, _Subscriber] = {}
        self.queues: dict[str, _SharedQueue] = {}


_lock = threading.Lock()
_clusters: dict[str, _Cluster] = {}


def _forget_after_fork() -> None:
    # A forked child holds none of its parent's instances, and the lock may have been
    # held by a thread that does not exist in the child.
    global _lock
    _lock = threading.Lock()
    _clusters.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


class LocalDriver:
    """Relays between the layer instances of one process that share a ``channel``."""

    OPTIONS: frozenset[str] = frozenset()

    def __init__(self, instance_id: str, options: Mapping[str, Any]) -> None:
        self._instance_id = instance_id
        self._channel = str(options["channel"])
        self._topics: set[str] = set()

    def _cluster(self) -> _Cluster:
        cluster = _clusters.get(self._channel)
        if cluster is None:
            cluster = _clusters[self._channel] = _Cluster()
        return cluster

    async def _post(self, batch: Sequence[Outgoing]) -> None:
        with _lock:
            subscribers = list(self._cluster().subscribers.items())
        for instance_id, subscriber in subscribers:
            topics = subscriber.topics
            texts = [
                text
                for target, text in batch
                if target is None
                or (target in topics if type(target) is Topic else target == instance_id)
            ]
            if not texts:
                continue
            if subscriber.queued >= INBOX_LIMIT:
                await subscriber.room()
            try:
                subscriber.post(texts)
            except RuntimeError:
                # That instance's loop is closed without it having unsubscribed.
                with _lock:
                    current = self._cluster().subscribers
                    if current.get(instance_id) is subscriber:
                        del current[instance_id]

    # Relay

    async def publish(self, envelope: str, /) -> None:
        await self._post([(None, envelope)])

    async def publish_to(self, instance_id: str, envelope: str, /) -> None:
        await self._post([(instance_id, envelope)])

    async def publish_batch(self, batch: Sequence[Outgoing], /) -> None:
        await self._post(batch)

    async def publish_topic(self, topic: str, envelope: str, /) -> None:
        await self._post([(Topic(topic), envelope)])

    async def listen_to(self, topics: Sequence[str], /) -> None:
        # Publishers read the set as it is: in place at once.
        self._topics.update(topics)

    async def stop_listening(self, topics: Sequence[str], /) -> None:
        self._topics.difference_update(topics)

    async def listen(self, deliver: Deliver, ready: Ready, /) -> None:
        """Receive what the cluster's instances publish, until cancelled: nothing can
        break a subscription in memory."""
        subscriber = _Subscriber(asyncio.get_running_loop(), deliver, self._topics)
        with _lock:
            self._cluster().subscribers[self._instance_id] = subscriber
        try:
            ready()
            await asyncio.Event().wait()
        finally:
            self._unsubscribe(subscriber)

    def _unsubscribe(self, subscriber: _Subscriber | None = None) -> None:
        with _lock:
            cluster = _clusters.get(self._channel)
            if cluster is None:
                return
            if subscriber is None or cluster.subscribers.get(self._instance_id) is subscriber:
                cluster.subscribers.pop(self._instance_id, None)
            if not cluster.subscribers and not any(
                q.items or q.waiters for q in cluster.queues.values()
            ):
                del _clusters[self._channel]

    async def close(self) -> None:
        self._unsubscribe()

    # Worker queues

    async def queue_push(self, channel: str, item: str, capacity: int, expires: float, /) -> bool:
        current = asyncio.get_running_loop()
        now = time.time()
        with _lock:
            queue = self._cluster().queues.setdefault(channel, _SharedQueue())
            items = queue.items
            while items and items[0][0] < now and len(items) >= capacity:
                items.popleft()  # no one read it in time; make room
            if len(items) >= capacity:
                return False
            items.append((expires, item))
            while queue.waiters and not wake(queue.waiters.popleft(), current):
                pass
            return True

    async def queue_pop(self, channel: str, timeout: float, /) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with _lock:
                queue = self._cluster().queues.setdefault(channel, _SharedQueue())
                if queue.items:
                    return queue.items.popleft()[1]
                waiter: asyncio.Future[None] = loop.create_future()
                queue.waiters.append(waiter)
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(waiter, remaining)
            except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
                with _lock:
                    try:
                        queue.waiters.remove(waiter)
                    except ValueError:
                        pass  # woken meanwhile: pass the wake-up on
                    while queue.items and queue.waiters and not wake(queue.waiters.popleft(), loop):
                        pass
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return None

    async def queue_return(self, channel: str, item: str, /) -> None:
        current = asyncio.get_running_loop()
        with _lock:
            queue = self._cluster().queues.setdefault(channel, _SharedQueue())
            queue.items.appendleft((float("inf"), item))
            while queue.waiters and not wake(queue.waiters.popleft(), current):
                pass

    async def flush(self) -> None:
        with _lock:
            cluster = _clusters.get(self._channel)
            if cluster is not None:
                for queue in cluster.queues.values():
                    queue.items.clear()
