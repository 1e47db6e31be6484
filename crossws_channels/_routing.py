"""Selective delivery (``"routing": "groups"``): which topics this instance listens to.

With broadcast routing every instance hears every ``group_send`` of the cluster. With
groups routing a ``group_send`` is published on its group's *topic*, and an instance
listens only to the topics of the groups it has members of, so a message reaches the
instances that deliver it and no others. A topic is one group (``g.<group>``) or, with
``routing_partitions``, one of that many hashed partitions of the groups
(``p.<number>``): fewer subscriptions for an instance with very many groups, at the cost
of hearing the other groups of its partitions.

:class:`Routes` counts, per topic, the groups that need it here. ``group_add`` for a group
that is new here waits until the backplane confirmed the topic's subscription, so that
what any instance sends to the group after ``group_add`` returned is delivered. A topic no
group needs any more is let go after :data:`LINGER` seconds, so that a consumer that
reconnects right away (a page reload) costs no subscription churn.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from time import monotonic
from typing import Any, TypeVar, cast

from ._registry import Registry
from ._reporting import Reporter
from .drivers.base import Driver, SubscribingDriver, SupportsTopics, Topic

logger = logging.getLogger("crossws_channels")

__all__ = ["LINGER", "Routes", "topic_namer"]

T = TypeVar("T")
Call = Callable[[Callable[[Driver | SubscribingDriver], Awaitable[Any]]], Awaitable[Any]]

# Topics (and gap keys) remembered per group, past which they are made afresh.
TOPICS_KEPT = 65536
# How long a topic no group here needs stays subscribed.
LINGER = 5.0
# How often lingering topics are looked at.
SWEEP_EVERY = 1.0
# group_add waits this long for a subscription to be confirmed, at most; past it the
# topic is still wanted, and subscribed with the next subscription.
CONFIRM_TIMEOUT = 5.0


def topic_namer(partitions: int) -> Callable[[str], Topic]:
    """The topic of a group: the group itself, or its partition (CRC-32 of the name,
    which any client of the backplane can compute too)."""
    if partitions <= 0:
        # Asked for every message sent and received: each group's topic made once (a
        # str subclass costs a call to build), forgotten all at once past TOPICS_KEPT.
        topics: dict[str, Topic] = {}

        def per_group(group: str) -> Topic:
            topic = topics.get(group)
            if topic is None:
                if len(topics) >= TOPICS_KEPT:
                    topics.clear()
                topic = topics[group] = Topic("g." + group)
            return topic

        return per_group

    names = [Topic(f"p.{index}") for index in range(partitions)]

    def partitioned(group: str) -> Topic:
        return names[zlib.crc32(group.encode("utf-8")) % partitions]

    return partitioned


class Routes:
    """The topics this instance listens to (see the module docstring)."""

    def __init__(self, partitions: int, registry: Registry, reporter: Reporter) -> None:
        self.topic_of = topic_namer(partitions)
        self._registry = registry
        self._reporter = reporter
        self._lock = threading.Lock()
        self._needed: Counter[str] = Counter()  # topic -> groups here on it
        self._idle: dict[str, float] = {}  # topic -> since when no group needs it
        # Topics whose subscription the driver confirmed (or took while it was down).
        # Read without the lock on group_add's fast path.
        self._listening: set[str] = set()
        # Topics that lost and regained their subscription: a sender's numbering on
        # them starts afresh for gap counting (``gap_key``).
        self._epochs: dict[str, int] = {}
        # gap_key's answers, until an epoch changes (read on the home loop).
        self._gap_keys: dict[tuple[str, str], str] = {}
        self._pending: dict[str, asyncio.Task[None]] = {}  # on the home loop
        self._call: Call | None = None

    def bind(self, call: Call) -> None:
        """How to run a driver call on the home loop (the backplane's ``call``)."""
        self._call = call

    # Memberships

    def joined(self, group: str) -> Topic:
        """``group`` got its first member here; return its topic."""
        topic = self.topic_of(group)
        with self._lock:
            self._needed[topic] += 1
            self._idle.pop(topic, None)
        return topic

    def _left(self, groups: Iterable[str], now: float) -> None:
        for group in groups:
            topic = self.topic_of(group)
            count = self._needed[topic] - 1
            if count > 0:
                self._needed[topic] = count
            else:
                del self._needed[topic]
                self._idle[topic] = now

    async def ensure(self, topic: Topic) -> None:
        """Return once this instance listens to ``topic`` (bounded; see the module)."""
        if topic in self._listening:
            return
        call = self._call
        if call is None:
            return
        try:
            await call(lambda driver: self._listen(driver, topic))
        except RuntimeError:
            pass  # the backplane is not running: its next listen subscribes

    def want(self, topic: Topic) -> None:
        """Listen to ``topic`` without waiting (on the home loop: a remote group_add)."""
        if topic in self._listening or self._call is None:
            return
        task = asyncio.get_running_loop().create_task(self.ensure(topic))
        task.add_done_callback(_retrieve)

    async def _listen(self, driver: Driver | SubscribingDriver, topic: Topic) -> None:
        # On the home loop. Concurrent group_adds of one topic share one subscription.
        task = self._pending.get(topic)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._subscribe(driver, topic))
            self._pending[topic] = task
            task.add_done_callback(lambda _: self._pending.pop(topic, None))
        await asyncio.shield(task)

    async def _subscribe(self, driver: Driver | SubscribingDriver, topic: Topic) -> None:
        try:
            await asyncio.wait_for(cast(SupportsTopics, driver).listen_to([topic]), CONFIRM_TIMEOUT)
        except Exception as exc:
            # Still in the driver's set: the next subscription has it.
            self._reporter.report(exc, "subscribe")
            return
        with self._lock:
            if topic in self._needed:
                self._listening.add(topic)

    # The job, on the home loop

    async def run(self) -> None:
        """Keep the driver's topics in line with the groups here, for as long as the
        backplane runs (a backplane job). A new driver (after a restart) is told every
        topic first."""
        with self._lock:
            topics = list(self._needed)
            self._listening.clear()
        if topics:
            await self._on_driver(lambda driver: self._relisten(driver, topics))
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            await self.sweep()

    async def _relisten(self, driver: Driver | SubscribingDriver, topics: list[str]) -> None:
        await cast(SupportsTopics, driver).listen_to(topics)
        with self._lock:
            self._listening.update(topic for topic in topics if topic in self._needed)

    async def sweep(self, now: float | None = None) -> None:
        """Let go of the topics no group here has needed for :data:`LINGER` seconds."""
        now = monotonic() if now is None else now
        vanished = self._registry.take_vanished()
        with self._lock:
            if vanished:
                self._left(vanished, now)
            done = [topic for topic, since in self._idle.items() if now - since >= LINGER]
            for topic in done:
                del self._idle[topic]
                self._listening.discard(topic)
                self._epochs[topic] = self._epochs.get(topic, 0) + 1
            if done:
                self._gap_keys.clear()
        if done:
            await self._on_driver(lambda driver: cast(SupportsTopics, driver).stop_listening(done))

    async def _on_driver(
        self, operation: Callable[[Driver | SubscribingDriver], Awaitable[Any]]
    ) -> None:
        call = self._call
        if call is None:
            return
        try:
            await call(operation)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._reporter.report(exc, "subscribe")

    # Gap counting

    def gap_key(self, sender: str, group: str) -> str:
        """Whose numbering a routed message from ``sender`` for ``group`` continues:
        the sender's on the group's topic, since this instance last subscribed to it."""
        keys = self._gap_keys
        key = keys.get((sender, group))
        if key is None:
            if len(keys) >= TOPICS_KEPT:
                keys.clear()
            topic = self.topic_of(group)
            key = keys[sender, group] = f"{sender} {topic} {self._epochs.get(topic, 0)}"
        return key

    def sizes(self) -> dict[str, int]:
        """For ``stats()``."""
        with self._lock:
            return {"topics": len(self._needed) + len(self._idle), "lingering": len(self._idle)}


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("listening to a topic failed", exc_info=task.exception())
