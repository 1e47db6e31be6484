"""Seeing into a best-effort relay: heartbeats, sequence gaps and pings.

* Every broadcast an instance relays carries a sequence number. A receiver that sees a
  sender's numbers jump knows how many of its messages it missed, and counts them
  (``stats()``, ``on_error`` with stage ``delivery``) instead of leaving users to guess.
* A periodic heartbeat is relayed to the cluster and must come back to its sender. A
  subscription that stays connected but no longer receives (it happens: a proxy that
  dropped the subscription, a server-side client kill that the client library did not
  notice) is detected this way, reported with stage ``subscribe`` and repaired by
  subscribing again.
* A ping asks every live instance to answer its sender directly, with its counters: the
  ``backplane_check`` and ``backplane_stats`` management commands are built on it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ._registry import Registry
from ._reporting import Stats
from .errors import DeafSubscription

logger = logging.getLogger("crossws_channels")

__all__ = [
    "HEARTBEAT",
    "PING",
    "PONG",
    "Census",
    "GroupSnapshot",
    "Heartbeat",
    "Pinger",
    "SequenceGaps",
    "group_answer",
]

HEARTBEAT = "!hb"
PING = "!ping"
PONG = "!pong"
# Senders remembered for gap counting; older ones are forgotten first.
MAX_SENDERS = 4096
# Channels one instance lists in its answer to group_channels(); past that its answer
# says how many it has and that the list is cut (an answer is one envelope).
GROUP_CHANNELS_LISTED = 1000
# A jump in one sender's numbers beyond this is not a loss but traffic that is not the
# sender's (forged, or corrupt): at 100,000 messages a second it is over a minute and a
# half of silence, which the subscription's outage report covers. Counting it would make
# `lost` meaningless (a forged number near 2**64), and remembering it would hide the
# real sender's next gaps.
MAX_PLAUSIBLE_GAP = 10_000_000


class SequenceGaps:
    """Counts, per sender, the sequence numbers that never arrived.

    A sender numbers its broadcasts in one stream, and (routing "groups") its messages
    on each topic in a stream of that topic: each stream is followed on its own, and
    what is missing is added up per sender.
    """

    def __init__(self) -> None:
        self._last: OrderedDict[str, int] = OrderedDict()
        self.missing: dict[str, int] = {}

    def observe(self, sender: str, seq: int, stream: str | None = None) -> int | None:
        """Record ``seq`` from ``sender`` (in ``stream``, its broadcasts by default);
        return how many messages before it are missing, or None for a number no real
        sender could have reached (then nothing is recorded)."""
        key = sender if stream is None else stream
        last = self._last.get(key)
        if last is not None and seq == last + 1:  # the usual case: the next one
            self._last[key] = seq
            self._last.move_to_end(key)
            return 0
        if last is not None and seq - last > MAX_PLAUSIBLE_GAP:
            return None
        self._last[key] = max(seq, last or 0)
        self._last.move_to_end(key)
        if len(self._last) > MAX_SENDERS:
            forgotten, _ = self._last.popitem(last=False)
            self.missing.pop(forgotten, None)
        if last is None or seq <= last + 1:
            # The first message from a sender starts its count; a late one closes no gap.
            return 0
        gap = seq - last - 1
        missing = self.missing
        if sender not in missing and len(missing) >= MAX_SENDERS:
            missing.pop(next(iter(missing)))
        missing[sender] = missing.get(sender, 0) + gap
        return gap


class Heartbeat:
    """Relays a heartbeat every ``interval`` seconds and expects it back.

    :meth:`run` raises :class:`DeafSubscription` when one does not come back in time;
    whoever runs it renews the subscription and runs it again.
    """

    def __init__(
        self,
        interval: float,
        publish: Callable[[str], Awaitable[None]],
        healthy: Callable[[], bool],
        excused: Callable[[float], bool] | None = None,
    ) -> None:
        self.interval = interval
        # The echo must come back within this; relays answer in milliseconds.
        self.timeout = max(0.5, min(5.0, interval))
        self._publish = publish
        self._healthy = healthy
        # excused(t): whether the subscription was paused (by backpressure) since t, so
        # that a heartbeat it could not read yet proves nothing.
        self._excused = excused
        self._counter = itertools.count(1)
        self._waiting: tuple[str, asyncio.Future[None]] | None = None
        # Seconds the last heartbeat that came back took (stats()["heartbeat_rtt_seconds"]).
        self.last_rtt: float | None = None

    def heard(self, token: str) -> None:
        """Our own heartbeat came back through the backplane."""
        waiting = self._waiting
        if waiting is not None and waiting[0] == token and not waiting[1].done():
            waiting[1].set_result(None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            if not self._healthy():
                continue  # the driver already knows it is disconnected and is reconnecting
            token = f"{next(self._counter)}"
            echo: asyncio.Future[None] = loop.create_future()
            self._waiting = (token, echo)
            started = time.monotonic()
            await self._publish(token)
            try:
                await asyncio.wait_for(echo, self.timeout)
            except asyncio.TimeoutError:
                excused = self._excused is not None and self._excused(started)
                if self._healthy() and not excused:
                    raise DeafSubscription(
                        f"the backplane subscription is connected but deaf: a heartbeat "
                        f"did not come back within {self.timeout:g}s; subscribing again"
                    ) from None
            else:
                self.last_rtt = time.monotonic() - started
                logger.debug("heartbeat came back in %.1f ms", self.last_rtt * 1e3)
            finally:
                self._waiting = None


@dataclass
class Pong:
    """One instance's answer to a ping."""

    instance_id: str
    rtt: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupSnapshot:
    """What the instances that answered said about a group: a best-effort snapshot.

    ``size`` adds up the members each answering instance had when it answered;
    ``instances`` maps each of them to its count. An instance that is down, cut off or
    slower than the timeout is missing from both (compare ``instances`` with what you
    expect). ``channels`` (``group_channels()`` only) lists the members; ``complete``
    is False if an instance had more than it lists in one answer (1000).
    """

    group: str
    size: int
    instances: dict[str, int]
    channels: frozenset[str] = frozenset()
    complete: bool = True

    @classmethod
    def of(cls, group: str, pongs: list[Pong], listed: bool) -> GroupSnapshot:
        instances: dict[str, int] = {}
        channels: set[str] = set()
        complete = True
        for pong in pongs:
            answer = pong.info.get("group")
            if not isinstance(answer, dict) or answer.get("name") != group:
                continue  # an instance of a version that doesn't answer group queries
            size = answer.get("size")
            if type(size) is not int or size < 0:
                continue
            instances[pong.instance_id] = size
            names = answer.get("channels")
            if listed and isinstance(names, list):
                channels.update(name for name in names if isinstance(name, str))
                complete = complete and len(names) >= size
        return cls(
            group,
            sum(instances.values()),
            instances,
            frozenset(channels) if listed else frozenset(),
            complete if listed else True,
        )


def group_answer(registry: Registry, group: str, listed: bool) -> dict[str, Any]:
    """This instance's part of a group query."""
    members = registry.members(group)
    answer: dict[str, Any] = {"name": group, "size": len(members)}
    if listed:
        answer["channels"] = members[:GROUP_CHANNELS_LISTED]
    return answer


class Census:
    """What ``layer.stats()`` returns, and what a ping answer carries."""

    def __init__(
        self,
        header: dict[str, str],
        stats: Stats,
        registry: Registry,
        gaps: SequenceGaps,
        connected: Callable[[], bool],
        more: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._header = header  # instance id, driver, channel, routing
        self._stats = stats
        self._registry = registry
        self.gaps = gaps
        self._connected = connected
        # More to show: the routes' topics, the histograms, the heartbeat's last round
        # trip, recent reports (the layer assembles it).
        self._more = more

    def snapshot(self) -> dict[str, Any]:
        return {
            **self._header,
            "connected": self._connected(),
            **self._stats.snapshot(),
            "lost_by_sender": dict(self.gaps.missing),
            **self._registry.sizes(),
            **(self._more() if self._more is not None else {}),
        }


def identity() -> dict[str, Any]:
    """Who answers a ping: enough for an operator to find the process."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


class Pinger:
    """Collects the answers to this instance's pings."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self._pending: dict[str, tuple[float, list[Pong]]] = {}

    def start(self) -> str:
        token = f"{os.getpid()}-{next(self._counter)}-{time.monotonic_ns()}"
        self._pending[token] = (time.monotonic(), [])
        return token

    def answered(self, sender: str, data: str) -> None:
        try:
            answer = json.loads(data)
            token = answer["token"]
            info = answer.get("info") or {}
        except (ValueError, KeyError, TypeError):
            return
        pending = self._pending.get(token) if isinstance(token, str) else None
        if pending is None or not isinstance(info, dict):
            return
        started, pongs = pending
        if all(pong.instance_id != sender for pong in pongs):
            pongs.append(Pong(sender, time.monotonic() - started, info))

    def finish(self, token: str) -> list[Pong]:
        _, pongs = self._pending.pop(token, (0.0, []))
        return sorted(pongs, key=lambda pong: pong.rtt)
