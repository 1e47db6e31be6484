"""BackplaneChannelLayer: the Channels layer API on top of local state and a backplane.

Each layer instance (one per process, normally) owns the channels it created with
``new_channel()`` and the group memberships of those channels. ``group_send`` delivers to
the local members first, synchronously, then relays one envelope over the backplane; the
other instances fan it out to their own members. A ``send`` to a channel another instance
owns is routed to that instance only. Worker channels (names without ``!``) live in the
backplane's shared queue when the driver has one, so each message is received once in the
whole cluster.

This module is the API; ``docs/architecture.md`` shows the parts behind it and the two
paths a message takes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import string
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from time import monotonic
from typing import Any, ClassVar, cast

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

from . import serialize
from ._backplane import Backplane, Job
from ._credits import PROBE, Grants, SendWindows
from ._delivery import Delivery
from ._flow import InboundFlow
from ._frames import GROUPS, GROUPS_PER_ENVELOPE, Frames, pack_groups
from ._health import Health
from ._histograms import Histograms
from ._home import Home
from ._housekeeping import Housekeeping
from ._inbound import (
    GROUP_ADD,
    GROUP_DISCARD,
    INSTANCE_ID_LENGTH,
    Inbound,
    envelope_limit,
    owner,
)
from ._known import KnownNames
from ._monitor import (
    HEARTBEAT,
    PING,
    Census,
    GroupSnapshot,
    Heartbeat,
    Pong,
    SequenceGaps,
)
from ._outbox import Outbox
from ._registry import Item, Payload, Registry
from ._reporting import Reporter, Stats
from ._routing import Routes
from ._sealing import ReplayGuard, Sealer, derive_keys
from ._workers import WorkerChannels
from .config import LayerConfig, build_driver, find_alias, parse_config
from .drivers.base import Driver, SubscribingDriver, SupportsFlush, Topic, capabilities
from .errors import MessageExpired, MessagesDropped, MessageTooLarge

logger = logging.getLogger("crossws_channels")

__all__ = ["BackplaneChannelLayer"]

Message = dict[str, Any]

_ID_ALPHABET = string.ascii_letters + string.digits


def _new_instance_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(INSTANCE_ID_LENGTH))


def _expired(subject: str | None, count: int, names: dict[str, int]) -> Exception:
    return MessageExpired(count, list(names))


def _sealing(config: LayerConfig) -> tuple[Sealer | None, ReplayGuard | None]:
    """The sealer and replay guard for ``signing_keys``/``encryption_keys``, if set."""
    if not config.sealed:
        return None, None
    encrypt = bool(config.encryption_keys)
    keys = derive_keys(config.encryption_keys or config.signing_keys, encrypt=encrypt)
    return Sealer(keys, encrypt=encrypt), ReplayGuard(config.replay_window)


class BackplaneChannelLayer(BaseChannelLayer):
    """A channel layer whose instances relay groups to each other over a backplane.

    Configure it in ``CHANNEL_LAYERS``; every CONFIG key is documented in
    ``docs/configuration.md``.
    """

    extensions: ClassVar[list[str]] = ["groups", "flush"]

    def __init__(self, **config: Any) -> None:
        self._raw_config = dict(config)
        _layers.add(self)
        self.alias = alias = find_alias(config)
        self.config: LayerConfig = parse_config(config, alias)
        super().__init__(capacity=self.config.capacity)
        self.expiry = self.config.expiry  # type: ignore[assignment]  # Channels types it int
        self.group_expiry = self.config.group_expiry
        self.instance_id = _new_instance_id()
        self._build(build_driver(self.config, self.instance_id))

    def _build(self, driver: Driver | SubscribingDriver) -> None:
        """Make the parts, each given what it uses; data flows from the API to the
        outbox and driver, and from the driver through the inbound side to the
        registry and the receivers."""
        config = self.config
        can = capabilities(driver)
        self._stats = stats = Stats()
        histograms = Histograms()
        self._home = home = Home()
        health = Health()
        self._reporter = reporter = Reporter(config.on_error, stats, home)
        routed = config.routing == "groups"
        self._registry = registry = Registry(
            self.get_capacity, can.worker_queue, config.expiry, track_vanished=routed
        )
        self._routes = routes = (
            Routes(config.routing_partitions, registry, reporter) if routed else None
        )
        sealer, guard = _sealing(config)
        self._frames = frames = Frames(self.instance_id, config.namespace, sealer)
        self._outbox = outbox = Outbox(home, stats, reporter, health.publishing)
        flow = InboundFlow(config.backpressure, registry.lock, reporter, stats)
        self._windows = windows = SendWindows(config.backpressure)
        self._grants = grants = Grants(frames, outbox)
        self._workers = workers = WorkerChannels(
            home,
            registry,
            frames,
            stats,
            reporter,
            expiry=config.expiry,
            capacity_for=self.get_capacity,
            guard=guard,
        )
        self._delivery = delivery = Delivery(
            registry,
            workers,
            stats,
            reporter,
            expiry=config.expiry,
            group_expiry=config.group_expiry,
            fanout=histograms.fanout,
        )
        heartbeat = self._make_heartbeat(driver, health, flow)

        def more() -> dict[str, Any]:
            shown: dict[str, Any] = {} if routes is None else dict(routes.sizes())
            shown["histograms"] = histograms.snapshot()
            shown["recent_reports"] = reporter.recent()
            if heartbeat is not None and heartbeat.last_rtt is not None:
                shown["heartbeat_rtt_seconds"] = heartbeat.last_rtt
            return shown

        census = Census(
            {
                "instance_id": self.instance_id,
                "driver": config.driver_name,
                "channel": config.channel,
                "routing": config.routing,
            },
            stats,
            registry,
            SequenceGaps(),
            connected=lambda: home.loop is not None and health.ok(),
            more=more,
        )
        self._census = census
        self._inbound = inbound = Inbound(
            frames,
            registry,
            delivery,
            flow,
            windows,
            grants,
            outbox,
            census,
            health.subscription,
            stats,
            reporter,
            heartbeat=heartbeat,
            resync_type=config.resync_type,
            driver_name=config.driver_name,
            max_envelope=envelope_limit(config.max_message_size),
            guard=guard,
            routes=routes,
            lag=histograms.relay_lag,
            home=home,
        )
        housekeeping = Housekeeping(
            registry,
            grants,
            stats,
            reporter,
            expiry=config.expiry,
            group_expiry=config.group_expiry,
        )
        jobs: list[Job] = [housekeeping.run]
        if heartbeat is not None:
            jobs.append(heartbeat.run)
        if routes is not None:
            jobs.append(routes.run)
        self._backplane = Backplane(
            home=home,
            factory=config.driver,
            instance_id=self.instance_id,
            options=config.options,
            driver=driver,
            deliver=inbound,
            outbox=outbox,
            workers=workers if can.worker_queue else None,
            jobs=jobs,
            stats=stats,
        )
        if routes is not None:
            routes.bind(self._backplane.call)
        self._supports_flush = can.flush
        # Channel names send() and receive() have validated, and group names
        # group_send has. A consumer receives on the same channel over and over, and the
        # regular expression costs about as much as the rest of a receive of a small
        # message (scenario C of the benchmark).
        self._valid_names = KnownNames()
        self._valid_groups = KnownNames()

    def _make_heartbeat(
        self, driver: Driver | SubscribingDriver, health: Health, flow: InboundFlow
    ) -> Heartbeat | None:
        """The heartbeat, travelling back to us as our own broadcast's echo, or as a
        direct send to ourselves when the backplane doesn't echo."""
        if self.config.heartbeat <= 0:
            return None
        can = capabilities(driver)
        frames, outbox = self._frames, self._outbox
        send: Callable[[str], Awaitable[None]]
        if can.echoes:

            async def send(token: str) -> None:
                await outbox.publish(None, frames.broadcast(HEARTBEAT, token))

        elif can.direct:

            async def send(token: str) -> None:
                await outbox.publish(self.instance_id, frames.frame(HEARTBEAT, token))

        else:
            logger.debug("the %s driver can't reach its own instance: no heartbeat", driver)
            return None
        # A paused subscription reads nothing, its own heartbeat included.
        return Heartbeat(self.config.heartbeat, send, health.ok, excused=flow.paused_since)

    def _renew_after_fork(self) -> None:
        """Become a new instance in a forked child (gunicorn --preload forks the layer).

        A child shares nothing with its parent's instance: not its id (two processes
        with one id would receive each other's direct sends), not its channels or
        groups, not its connections, threads or locks. It starts afresh from the same
        CONFIG, keeping only the object that Channels has cached.
        """
        self.__init__(**self._raw_config)  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} driver={self.config.driver_name!r} "
            f"channel={self.config.channel!r} instance={self.instance_id}>"
        )

    # Capacity, payloads

    def get_capacity(self, channel: str) -> int:
        for pattern, capacity in self.config.channel_capacity:
            if pattern.match(channel):
                return capacity
        return self.config.capacity

    def _serialize(self, message: Message) -> Payload:
        payload = serialize.dumps(message)
        size = serialize.payload_size(payload)
        if size > self.config.max_message_size:
            self._stats.incr("refused.too_large")
            raise MessageTooLarge(size, self.config.max_message_size)
        return payload

    # Channel layer API

    async def new_channel(self, prefix: str = "specific.") -> str:
        """A new process-specific channel name owned by this instance."""
        await self._backplane.subscribed()
        return f"{prefix}{self.instance_id}!{secrets.token_urlsafe(9)}"

    async def send(self, channel: str, message: Message) -> None:
        """Send ``message`` to ``channel``, wherever in the cluster it is received.

        Raises ``ChannelFull`` when the channel is at capacity: a channel of this
        instance or a worker channel at once; a channel of another instance once the
        room that instance last granted is used up and no more comes within
        ``backpressure`` seconds (see ``docs/semantics.md``).
        """
        if channel not in self._valid_names:
            self._check_channel_name(channel)
        await self._send(channel, self._serialize(message))

    async def send_many(self, messages: Iterable[tuple[str, Message]]) -> None:
        """Send each ``(channel, message)`` pair, in order, as :meth:`send` would.

        Every name and message is checked before anything is sent, so a bad one (raising
        as ``send`` does) sends nothing. A channel at capacity does not stop the others:
        once they are sent, :class:`~crossws_channels.errors.MessagesDropped` (a
        ``ChannelFull``) names the channels whose message was not taken.
        """
        pairs = []
        for channel, message in messages:
            self.require_valid_channel_name(channel)
            pairs.append((channel, self._serialize(message)))
        full: list[str] = []
        for channel, payload in pairs:
            try:
                await self._send(channel, payload)
            except ChannelFull:
                full.append(channel)
        if full:
            raise MessagesDropped(len(full), full)

    async def _send(self, channel: str, payload: Payload) -> None:
        await self._backplane.ensure()
        target = owner(channel)
        if target is None:
            if self._registry.shared_workers:
                if not await self._workers.push(channel, payload):
                    raise ChannelFull(channel)
                return
        elif target != self.instance_id:
            await self._send_remote(target, channel, payload)
            return
        if not self._registry.put(channel, payload, monotonic() + self.config.expiry):
            self._stats.incr("dropped.full")
            raise ChannelFull(channel)
        self._stats.incr("delivered")

    async def _send_remote(self, target: str, channel: str, payload: Payload) -> None:
        frames, backplane = self._frames, self._backplane
        if self.config.backpressure <= 0:
            await backplane.publish(target, frames.frame(channel, payload, stamp=True))
            return

        async def probe(last: int) -> None:
            await backplane.publish(target, frames.frame(PROBE, json.dumps([channel, last])))

        try:
            number, ask = await self._windows.reserve(channel, self.get_capacity(channel), probe)
        except ChannelFull:
            self._stats.incr("refused.full")
            raise
        frame = frames.frame(channel, payload, seq=number, ask=ask, stamp=True)
        await backplane.publish(target, frame)

    async def receive(self, channel: str) -> Message:
        """Wait for the next message on ``channel``.

        Cancelling the wait loses no message: one that arrived meanwhile stays queued for
        the next ``receive``.
        """
        if channel not in self._valid_names:
            self._check_channel_name(channel)
        registry = self._registry
        queued = registry.take_queued(channel)
        if queued is not None:
            # Already here: nothing to wait for, on any loop (a consumer keeping up
            # with a burst takes nearly every message this way).
            message = self._decoded(channel, queued)
            if message is not None:
                return message
        backplane = self._backplane
        loop = asyncio.get_running_loop()
        if not backplane.settled(loop):
            await backplane.subscribed()
        while True:
            payload, waiter, expired, shared, credits = registry.take(channel, loop)
            if credits:
                self._grants.send(credits)
            if expired:
                self._stats.incr("dropped.expired", expired)
                self._reporter.tally("expired", channel, "delivery", _expired, expired, [channel])
            if payload is None:
                assert waiter is not None
                if shared and not self._workers.take_now(channel):
                    self._workers.want(channel)
                try:
                    payload = await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled():
                        handed = waiter.result()
                        if handed is not None:
                            # Handed over just as we were cancelled: keep it for the next.
                            registry.put_back(channel, handed)
                    leftovers, credits = registry.abandon(channel, waiter)
                    self._grants.send(credits)
                    for item in leftovers:
                        self._workers.give_back(channel, item)
                    raise
                if payload is None:
                    continue  # woken from another thread: the message is in the mailbox
            message = self._decoded(channel, payload)
            if message is not None:
                return message

    def _decoded(self, channel: str, payload: Item) -> Message | None:
        """The message ``payload`` holds, for one receiver; None if it can't be decoded
        (reported: the receiver waits for the next)."""
        if type(payload) is serialize.Template:
            return payload.copy()
        try:
            return serialize.loads(payload)  # type: ignore[arg-type]
        except Exception as exc:
            self._reporter.drop_malformed(f"a message on {channel!r} that can't be decoded: {exc}")
            return None

    def _check_channel_name(self, channel: str) -> None:
        """require_valid_channel_name for a name not in ``_valid_names`` (the caller
        looks, on its hot path), remembering it once it passed."""
        self.require_valid_channel_name(channel)
        self._valid_names.remember(channel)

    async def group_add(self, group: str, channel: str) -> None:
        """Add ``channel`` to ``group``, on the instance that owns the channel."""
        await self._change_membership(GROUP_ADD, group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group``, on the instance that owns the channel."""
        await self._change_membership(GROUP_DISCARD, group, channel)

    async def _change_membership(self, operation: str, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        # A consumer joining a group must not miss what is relayed right after it joined.
        await self._backplane.subscribed()
        target = owner(channel)
        if target is not None and target != self.instance_id:
            frame = self._frames.frame(operation, json.dumps([group, channel]))
            await self._backplane.publish(target, frame)
        elif operation == GROUP_ADD:
            created = self._registry.group_add(group, channel)
            routes = self._routes
            if routes is not None:
                # Subscribed before returning: what is sent to the group from now on
                # reaches this member (docs/semantics.md, "Routing").
                await routes.ensure(routes.joined(group) if created else routes.topic_of(group))
        else:
            self._registry.group_discard(group, channel)

    async def group_send(self, group: str, message: Message) -> None:
        """Deliver to this instance's members of ``group``, then relay one envelope."""
        if type(group) is not str or group not in self._valid_groups:
            self._remember_valid_group(group)
        payload = self._serialize(message)
        backplane = self._backplane
        loop = asyncio.get_running_loop()
        if self._home.loop is not loop:
            await backplane.ensure()
        members = self._registry.member_count(group)
        if members:
            self._delivery.to_group(group, payload, members=members)
        routes = self._routes
        if routes is None:
            topic = None
            frame = self._frames.broadcast(group, payload)
        else:
            topic = routes.topic_of(group)
            frame = self._frames.routed(topic, group, payload)
        if not backplane.publish_now(topic, frame, loop):
            await backplane.publish(topic, frame)

    def _remember_valid_group(self, group: str) -> None:
        """Validate ``group`` (TypeError if it isn't a valid name), and remember it: a
        sender in a loop sends to the same few groups over and over."""
        self.require_valid_group_name(group)
        if type(group) is str:
            self._valid_groups.remember(group)

    async def group_send_many(self, groups: Iterable[str], message: Message) -> None:
        """Send ``message`` to each of ``groups``: what a ``group_send`` to each does,
        with the message serialized once and relayed in one envelope (one per topic
        with ``"routing": "groups"``). A channel in several of the groups gets the
        message once per group, as with a loop of ``group_send``."""
        names = list(dict.fromkeys(groups))
        for group in names:
            self.require_valid_group_name(group)
        payload = self._serialize(message)
        if not names:
            return
        await self._backplane.ensure()
        self._delivery.to_groups(names, payload)
        routes, frames = self._routes, self._frames
        by_topic: dict[Topic | None, list[str]] = {}
        for group in names:
            topic = None if routes is None else routes.topic_of(group)
            by_topic.setdefault(topic, []).append(group)
        for topic, members in by_topic.items():
            for chunk in _chunks(members):
                # One group alone in its envelope travels as a group_send does: the list
                # of groups would only cost both sides a JSON document (one topic per
                # group with "routing": "groups" makes every envelope such a one).
                name, data = (
                    (chunk[0], payload)
                    if len(chunk) == 1
                    else (GROUPS, pack_groups(chunk, payload))
                )
                if topic is None:
                    frame = frames.broadcast(name, data)
                else:
                    frame = frames.routed(topic, name, data)
                await self._backplane.publish(topic, frame)

    async def flush(self) -> None:
        """Forget this instance's messages and groups, and the cluster's worker queues."""
        self._grants.send(self._registry.flush())
        if self._supports_flush:

            async def flush(driver: Driver | SubscribingDriver) -> None:
                await cast(SupportsFlush, driver).flush()

            await self._backplane.call(flush)

    async def close(self) -> None:
        """Relay what is queued (within a bound) and close the backplane connection."""
        await self._backplane.close()
        self._reporter.flush_due(everything=True)

    # Monitoring

    def stats(self) -> dict[str, Any]:
        """Counters and sizes of this instance, for monitoring (see docs/operations.md)."""
        return self._census.snapshot()

    async def ping(self, timeout: float = 2.0, *, stats: bool = False) -> list[Pong]:
        """Ask every live instance of the cluster, this one included, to answer.

        Returns the answers that came within ``timeout`` seconds, fastest first, each
        with its round-trip time and, with ``stats=True``, that instance's ``stats()``.
        This instance's own answer proves the backplane carries its messages both ways.
        """
        return await self._ask_cluster(timeout, {"stats": stats})

    async def cluster_stats(self, timeout: float = 1.0) -> list[Pong]:
        """Every live instance's ``stats()`` (``Pong.info["stats"]``), as :meth:`ping`
        with ``stats=True``, this instance's own included even on a backplane that
        doesn't bring its own answer back (multiprocessing)."""
        return await self._ask_cluster(timeout, {"stats": True}, answer_here=True)

    async def group_size(self, group: str, timeout: float = 1.0) -> GroupSnapshot:
        """How many members ``group`` has in the whole cluster, as the instances that
        answer within ``timeout`` seconds count them: a best-effort snapshot (see
        :class:`~crossws_channels.GroupSnapshot`; ``.size`` is the number)."""
        return await self._group_query(group, timeout, listed=False)

    async def group_channels(self, group: str, timeout: float = 1.0) -> GroupSnapshot:
        """The members of ``group`` in the whole cluster, as the instances that answer
        within ``timeout`` seconds list them (``.channels``): a best-effort snapshot."""
        return await self._group_query(group, timeout, listed=True)

    async def _group_query(self, group: str, timeout: float, listed: bool) -> GroupSnapshot:
        self.require_valid_group_name(group)
        request = {"group": group, "channels": listed}
        pongs = await self._ask_cluster(timeout, request, answer_here=True)
        return GroupSnapshot.of(group, pongs, listed)

    async def _ask_cluster(
        self, timeout: float, request: dict[str, Any], answer_here: bool = False
    ) -> list[Pong]:
        """Broadcast a ping carrying ``request``; the answers within ``timeout``. With
        ``answer_here``, this instance's own answer is made here if the backplane did not
        bring it back (multiprocessing doesn't echo); ``ping()`` leaves it out, since its
        coming back is what proves the backplane works."""
        await self._backplane.subscribed()
        inbound = self._inbound
        token = inbound.pinger.start()
        try:
            text = json.dumps({"token": token, **request})
            await self._backplane.publish(None, self._frames.broadcast(PING, text))
            await asyncio.sleep(timeout)
        finally:
            pongs = inbound.pinger.finish(token)
        if answer_here and all(pong.instance_id != self.instance_id for pong in pongs):
            pongs.append(Pong(self.instance_id, 0.0, inbound.answer(request)))
        return pongs


def _chunks(groups: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(groups), GROUPS_PER_ENVELOPE):
        yield groups[start : start + GROUPS_PER_ENVELOPE]


_layers: weakref.WeakSet[BackplaneChannelLayer] = weakref.WeakSet()


def live_layers() -> list[BackplaneChannelLayer]:
    """Every layer of this process that has not been garbage-collected."""
    return list(_layers)


def layer_named(alias: str) -> BackplaneChannelLayer | None:
    """The ``CHANNEL_LAYERS`` entry ``alias``, if it is one of these layers (the views'
    ``?layer=``); ``None`` if there is no such entry or it is another kind of layer."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer(alias)
    return layer if isinstance(layer, BackplaneChannelLayer) else None


def _after_fork_in_child() -> None:
    for layer in list(_layers):
        layer._renew_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
