"""BackplaneChannelLayer: the Channels layer API on top of local state and a backplane.

Each layer instance (one per process, normally) owns the channels it created with
``new_channel()`` and the group memberships of those channels. ``group_send`` delivers to
the local members first, synchronously, then relays one envelope over the backplane; the
other instances fan it out to their own members. A ``send`` to a channel another instance
owns is routed to that instance only. Worker channels (names without ``!``) live in the
backplane's shared queue when the driver has one, so each message is received once in the
whole cluster.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import string
import time
import weakref
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import Any, ClassVar, cast

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

from . import serialize
from ._backplane import Backplane
from ._credits import CREDIT, PROBE, SendWindows
from ._flow import InboundFlow
from ._monitor import HEARTBEAT, PING, PONG, Heartbeat, Pinger, Pong, SequenceGaps, identity
from ._registry import Credit, Item, Payload, Registry
from ._reporting import Reporter, Stats
from .config import LayerConfig, build_driver, find_alias, parse_config
from .drivers.base import Driver, SupportsDirect, SupportsFlush, SupportsWorkerQueue
from .envelope import SyncMessage, decode_envelope, encode_frame, json_string
from .errors import (
    DeafSubscription,
    MalformedMessage,
    MessageExpired,
    MessagesDropped,
    MessagesLost,
    MessageTooLarge,
    Stage,
)

logger = logging.getLogger("crossws_channels")

__all__ = ["BackplaneChannelLayer"]

Message = dict[str, Any]

INSTANCE_ID_LENGTH = 12
_ID_ALPHABET = string.ascii_letters + string.digits
# Topics of control messages start with "!", which no group or channel name can.
_GROUP_ADD = "!add"
_GROUP_DISCARD = "!discard"
# How many validated channel names receive() remembers.
_VALID_NAMES_KEPT = 10_000
# How often memberships are checked against group_expiry.
_GROUP_SWEEP_EVERY = 30.0


def _new_instance_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(INSTANCE_ID_LENGTH))


# How the tallied reports (see _reporting) read: make(subject, count, names).


def _dropped(subject: str | None, count: int, names: dict[str, int]) -> Exception:
    return MessagesDropped(count, list(names))


def _dropped_in_group(group: str | None, count: int, names: dict[str, int]) -> Exception:
    return MessagesDropped(count, list(names), group)


def _expired(subject: str | None, count: int, names: dict[str, int]) -> Exception:
    return MessageExpired(count, list(names))


def _malformed(subject: str | None, count: int, names: dict[str, int]) -> Exception:
    return MalformedMessage(f"{count} malformed message(s) dropped; " + "; ".join(names))


def _lost(subject: str | None, count: int, names: dict[str, int]) -> Exception:
    top = max(names, key=names.__getitem__) if names else "?"
    return MessagesLost(top, count, names)


class _Inbox:
    """The layer's side of a driver subscription (the ``Deliver`` protocol)."""

    __slots__ = ("_layer",)

    def __init__(self, layer: BackplaneChannelLayer) -> None:
        self._layer = layer

    def __call__(self, raw: str | bytes, /) -> asyncio.Future[None] | None:
        try:
            return self._layer._on_raw(raw)
        except Exception as exc:
            self._layer._reporter.report(exc, "delivery")
            return None

    def report(self, error: Exception, stage: Stage, /) -> None:
        self._layer._reporter.report(error, stage)

    def connection_lost(self, error: Exception, /) -> None:
        layer = self._layer
        if layer._reporter.outage_started("subscription", error, "subscribe"):
            layer._stats.incr("disconnects")

    def connection_made(self) -> None:
        if self._layer._reporter.outage_ended("subscription") is not None:
            self._layer._restored()


class BackplaneChannelLayer(BaseChannelLayer):
    """A channel layer whose instances relay groups to each other over a backplane.

    Configure it in ``CHANNEL_LAYERS``; every CONFIG key is documented in
    ``docs/configuration.md``.
    """

    extensions: ClassVar[list[str]] = ["groups", "flush"]

    def __init__(self, **config: Any) -> None:
        self._raw_config = dict(config)
        _layers.add(self)
        alias = find_alias(config)
        self.config: LayerConfig = parse_config(config, alias)
        super().__init__(capacity=self.config.capacity)
        self.expiry = self.config.expiry  # type: ignore[assignment]  # Channels types it int
        self.group_expiry = self.config.group_expiry
        self.instance_id = _new_instance_id()
        self._stats = Stats()
        self._reporter = Reporter(self.config.on_error, self._stats, lambda: self._backplane.home)
        driver = build_driver(self.config, self.instance_id)
        self._backplane = Backplane(
            instance_id=self.instance_id,
            factory=self.config.driver,
            options=self.config.options,
            driver=driver,
            inbox=_Inbox(self),
            reporter=self._reporter,
            stats=self._stats,
            sweep=self._sweep,
            sweep_interval=max(0.05, min(1.0, self.config.expiry / 4)),
            worker_wanted=self._worker_wanted,
            worker_item=self._worker_item,
            on_restored=self._restored,
        )
        self._registry = Registry(
            self.get_capacity, lambda: self._backplane.shared_queues, self.config.expiry
        )
        self._flow = InboundFlow(
            self.config.backpressure, self._registry.lock, self._reporter, self._stats
        )
        self._windows = SendWindows(self.config.backpressure)
        self._supports_flush = isinstance(driver, SupportsFlush)
        self._valid_names: set[str] = set()
        # Our own envelopes start with this; the backplane echoes them back to us.
        self._echo_text = '{"id":' + json_string(self.instance_id) + ","
        self._echo_bytes = self._echo_text.encode()
        self._control_text = ',"topic":"!'
        self._control_bytes = self._control_text.encode()
        self._echo_scan = len(self._frame("!", "")) + 8
        # Broadcasts are numbered so that receivers can count what they missed.
        self._broadcast_seq = itertools.count(1)
        self._gaps = SequenceGaps()
        self._pinger = Pinger()
        self._heartbeat: Heartbeat | None = None
        send_heartbeat = self._heartbeat_route(driver)
        if self.config.heartbeat > 0 and send_heartbeat is not None:
            self._heartbeat = Heartbeat(
                self.config.heartbeat,
                send_heartbeat,
                self._relay_healthy,
                self._deaf,
                # A paused subscription reads nothing, its own heartbeat included.
                excused=self._flow.paused_since,
            )
            self._backplane.periodic.append(self._heartbeat.run)
        self._next_group_sweep = monotonic() + min(_GROUP_SWEEP_EVERY, self.config.group_expiry / 4)

    def _heartbeat_route(self, driver: Driver) -> Callable[[str], Awaitable[None]] | None:
        """How a heartbeat comes back to us: our own broadcast's echo, or a direct send."""
        if getattr(driver, "echoes", True):
            return lambda token: self._broadcast(HEARTBEAT, token)
        if isinstance(driver, SupportsDirect):
            return lambda token: self._backplane.publish(
                self.instance_id, self._frame(HEARTBEAT, token)
            )
        logger.debug("the %s driver can't reach its own instance: no heartbeat", driver)
        return None

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

    # Capacity, names, payloads

    def get_capacity(self, channel: str) -> int:
        for pattern, capacity in self.config.channel_capacity:
            if pattern.match(channel):
                return capacity
        return self.config.capacity

    def _owner(self, channel: str) -> str | None:
        """The instance that owns a process-specific channel; None for worker channels."""
        bang = channel.find("!")
        if bang < 0:
            return None
        return channel[max(0, bang - INSTANCE_ID_LENGTH) : bang]

    def _serialize(self, message: Message) -> Payload:
        payload = serialize.dumps(message)
        size = serialize.payload_size(payload)
        if size > self.config.max_message_size:
            self._stats.incr("refused.too_large")
            raise MessageTooLarge(size, self.config.max_message_size)
        return payload

    def _frame(
        self,
        topic: str,
        data: str | bytes,
        expires: float | None = None,
        seq: int | None = None,
        ask: bool = False,
    ) -> str:
        return encode_frame(
            self.instance_id,
            SyncMessage(self.config.namespace, topic, data),
            seq=seq,
            expires=expires,
            ask=ask,
        )

    async def _broadcast(self, topic: str, data: str | bytes) -> None:
        """Relay to every instance, numbered."""
        frame = self._frame(topic, data, seq=next(self._broadcast_seq))
        await self._backplane.publish(None, frame)

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
        self.require_valid_channel_name(channel)
        payload = self._serialize(message)
        await self._backplane.ensure()
        owner = self._owner(channel)
        if owner is None:
            if self._backplane.shared_queues:
                if not await self._push_worker(channel, payload):
                    raise ChannelFull(channel)
                return
        elif owner != self.instance_id:
            await self._send_remote(owner, channel, payload)
            return
        if not self._registry.put(channel, payload, monotonic() + self.config.expiry):
            self._stats.incr("dropped.full")
            raise ChannelFull(channel)
        self._stats.incr("delivered")

    async def _send_remote(self, owner: str, channel: str, payload: Payload) -> None:
        if self.config.backpressure <= 0:
            await self._backplane.publish(owner, self._frame(channel, payload))
            return

        async def probe(last: int) -> None:
            await self._backplane.publish(owner, self._frame(PROBE, json.dumps([channel, last])))

        try:
            number, ask = await self._windows.reserve(channel, self.get_capacity(channel), probe)
        except ChannelFull:
            self._stats.incr("refused.full")
            raise
        await self._backplane.publish(owner, self._frame(channel, payload, seq=number, ask=ask))

    def _send_credits(self, credits: list[Credit]) -> None:
        """Tell remote senders how much room they have (from any thread)."""
        for sender, channel, seen, room in credits:
            frame = self._frame(CREDIT, json.dumps([sender, channel, seen, room]))
            self._backplane.post(sender, frame)

    async def _push_worker(self, channel: str, payload: Payload) -> bool:
        """Queue on a shared worker channel; False if it is full. Never raises otherwise."""
        expires = time.time() + self.config.expiry
        text = self._frame(channel, payload, expires)
        capacity = self.get_capacity(channel)

        async def push(driver: Driver) -> bool:
            return await cast(SupportsWorkerQueue, driver).queue_push(
                channel, text, capacity, expires
            )

        try:
            pushed = await self._backplane.call(push)
        except Exception as exc:
            self._stats.incr("dropped.publish")
            self._reporter.report(exc, "publish")
            return True
        if pushed:
            self._stats.incr("published")
        else:
            self._stats.incr("dropped.full")
        return pushed

    async def receive(self, channel: str) -> Message:
        """Wait for the next message on ``channel``.

        Cancelling the wait loses no message: one that arrived meanwhile stays queued for
        the next ``receive``.
        """
        if channel not in self._valid_names:
            self._check_channel_name(channel)
        backplane = self._backplane
        loop = asyncio.get_running_loop()
        if not backplane.settled(loop):
            await backplane.subscribed()
        registry = self._registry
        while True:
            payload, waiter, expired, shared, credits = registry.take(channel, loop)
            if credits:
                self._send_credits(credits)
            if expired:
                self._stats.incr("dropped.expired", expired)
                self._reporter.tally("expired", channel, "delivery", _expired, expired, [channel])
            if payload is None:
                assert waiter is not None
                if shared:
                    backplane.want(channel)
                try:
                    payload = await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled():
                        handed = waiter.result()
                        if handed is not None:
                            # Handed over just as we were cancelled: keep it for the next.
                            registry.put_back(channel, handed)
                    leftovers, credits = registry.abandon(channel, waiter)
                    if credits:
                        self._send_credits(credits)
                    for item in leftovers:
                        self._return_worker_item(channel, item)
                    raise
                if payload is None:
                    continue  # woken from another thread: the message is in the mailbox
            if type(payload) is serialize.Template:
                return payload.copy()
            try:
                return serialize.loads(payload)  # type: ignore[arg-type]
            except Exception as exc:
                self._drop_malformed(f"a message on {channel!r} could not be decoded: {exc}")

    def _check_channel_name(self, channel: str) -> None:
        """require_valid_channel_name for a name not in ``_valid_names`` (the caller
        looks, on its hot path), remembering it once it passed: a consumer receives on
        the same channel over and over."""
        self.require_valid_channel_name(channel)
        if len(self._valid_names) >= _VALID_NAMES_KEPT:
            self._valid_names.clear()
        self._valid_names.add(channel)

    async def group_add(self, group: str, channel: str) -> None:
        """Add ``channel`` to ``group``, on the instance that owns the channel."""
        await self._change_membership(_GROUP_ADD, group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group``, on the instance that owns the channel."""
        await self._change_membership(_GROUP_DISCARD, group, channel)

    async def _change_membership(self, operation: str, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        # A consumer joining a group must not miss what is relayed right after it joined.
        await self._backplane.subscribed()
        owner = self._owner(channel)
        if owner is not None and owner != self.instance_id:
            await self._backplane.publish(
                owner, self._frame(operation, json.dumps([group, channel]))
            )
        else:
            self._apply_membership(operation, group, channel)

    def _apply_membership(self, operation: str, group: str, channel: str) -> None:
        if operation == _GROUP_ADD:
            self._registry.group_add(group, channel)
        else:
            self._registry.group_discard(group, channel)

    async def group_send(self, group: str, message: Message) -> None:
        """Deliver to this instance's members of ``group``, then relay one envelope."""
        self.require_valid_group_name(group)
        payload = self._serialize(message)
        await self._backplane.ensure()
        self._fan_out(group, payload)
        await self._broadcast(group, payload)

    def _fan_out(self, group: str, payload: Payload, flow: InboundFlow | None = None) -> None:
        """Deliver to the members of ``group`` here; ``flow`` for a relayed message."""
        now = monotonic()
        item: Item = payload
        if self._registry.member_count(group) > 1:
            # Decode once for every local member; each receives its own copy of that.
            try:
                item = serialize.Template(serialize.loads(payload))
            except Exception as exc:
                self._drop_malformed(f"a message for group {group!r}: {exc}")
                return
        result = self._registry.group_put(
            group, item, now + self.config.expiry, now - self.config.group_expiry, flow, now
        )
        if result.delivered:
            self._stats.incr("delivered", result.delivered)
        if result.full:
            self._stats.incr("dropped.full", len(result.full))
            self._reporter.tally(
                "group full", group, "delivery", _dropped_in_group, len(result.full), result.full
            )
        for channel in result.shared:
            self._backplane.spawn(self._worker_pusher(channel, payload), f"push to {channel!r}")

    def _worker_pusher(self, channel: str, payload: Payload) -> Any:
        async def push(driver: Driver) -> None:
            expires = time.time() + self.config.expiry
            text = self._frame(channel, payload, expires)
            queue = cast(SupportsWorkerQueue, driver)
            if await queue.queue_push(channel, text, self.get_capacity(channel), expires):
                self._stats.incr("published")
            else:
                self._stats.incr("dropped.full")
                self._reporter.tally("full", channel, "delivery", _dropped, 1, [channel])

        return push

    async def flush(self) -> None:
        """Forget this instance's messages and groups, and the cluster's worker queues."""
        credits = self._registry.flush()
        if credits:
            self._send_credits(credits)
        if self._supports_flush:

            async def flush(driver: Driver) -> None:
                assert isinstance(driver, SupportsFlush)
                await driver.flush()

            await self._backplane.call(flush)

    async def close(self) -> None:
        """Relay what is queued (within a bound) and close the backplane connection."""
        await self._backplane.close()
        self._reporter.flush_due(everything=True)

    def stats(self) -> dict[str, Any]:
        """Counters and sizes of this instance, for monitoring (see docs/operations.md)."""
        return {
            "instance_id": self.instance_id,
            "driver": self.config.driver_name,
            "channel": self.config.channel,
            "connected": self._backplane.home is not None and self._relay_healthy(),
            **self._stats.snapshot(),
            "lost_by_sender": dict(self._gaps.missing),
            **self._registry.sizes(),
        }

    # Inbound, on the home loop

    def _own_echo(self, raw: str | bytes) -> bool:
        """Our own envelope, not a control message: nothing to do, not even decode it."""
        if isinstance(raw, str):
            return raw.startswith(self._echo_text) and (
                self._control_text not in raw[: self._echo_scan]
            )
        return raw.startswith(self._echo_bytes) and (
            self._control_bytes not in raw[: self._echo_scan]
        )

    def _on_raw(self, raw: str | bytes) -> asyncio.Future[None] | None:
        """One message from the driver; a future when the driver must pause (_flow)."""
        if self._own_echo(raw):
            return None
        envelope = decode_envelope(raw)
        if envelope is None:
            self._drop_malformed(f"{len(raw)} bytes of backplane traffic that are not an envelope")
            return None
        msg = envelope.msg
        topic = msg.topic
        sender = envelope.id
        if sender == self.instance_id:
            # Our own echo: only the control messages we address to ourselves matter.
            if topic[:1] == "!":
                self._on_control(sender, topic, msg.data)
            return None
        self._stats.incr("relayed_in")
        if topic[:1] == "!":
            if envelope.seq is not None:  # a broadcast: numbered per sender
                self._count_gap(sender, envelope.seq)
            self._on_control(sender, topic, msg.data)
            return None
        if "!" in topic:
            self._on_direct(envelope.id, topic, msg.data, envelope.seq, envelope.ask)
            return None
        if envelope.seq is not None:
            self._count_gap(sender, envelope.seq)
        if not self.group_name_regex.match(topic) or len(topic) >= self.MAX_NAME_LENGTH:
            logger.debug("ignoring a relayed message for topic %r: not a valid group name", topic)
            return None
        # A numbered envelope comes from a layer instance, whose data is a serialized
        # message (the fan-out or the receiver decodes it); crossws peers' data is
        # checked and wrapped here.
        payload = msg.data if envelope.seq is not None else self._inbound(msg)
        if payload is None:
            return None
        flow = self._flow
        self._fan_out(topic, payload, flow)
        return flow.finish()

    def _on_direct(
        self, sender: str, channel: str, data: str | bytes, number: int | None, ask: bool
    ) -> None:
        """A message another instance sent to ``channel`` (numbered under flow control)."""
        if self._owner(channel) != self.instance_id:
            return  # a direct send for another instance, relayed to everyone
        # Only layer instances send to a channel: its data is a serialized message
        # (checked when it is received).
        if not isinstance(data, str) and data[:4] != serialize.BINARY_MARKER:
            self._drop_malformed(f"a direct message for {channel!r} that is not a message")
            return
        deadline = monotonic() + self.config.expiry
        credit = None
        if number is None:
            taken = self._registry.put(channel, data, deadline)
        else:
            taken, credit = self._registry.put_direct(channel, data, deadline, sender, number, ask)
        if taken:
            self._stats.incr("delivered")
        else:
            self._stats.incr("dropped.full")
            self._reporter.tally("full", channel, "delivery", _dropped, 1, [channel])
        if credit is not None:
            self._send_credits([credit])

    def _drop_malformed(self, what: str) -> None:
        """Count and report (aggregated) a malformed message that is dropped."""
        self._stats.incr("dropped.malformed")
        self._reporter.tally("malformed", None, "delivery", _malformed, 1, [what])

    def _count_gap(self, sender: str, seq: int) -> None:
        missing = self._gaps.observe(sender, seq)
        if missing:
            self._stats.incr("lost", missing)
            self._reporter.tally("lost", None, "delivery", _lost, missing, [sender])

    def _inbound(self, msg: SyncMessage) -> Payload | None:
        """Check relayed data is a message; wrap data from crossws peers as one."""
        data = msg.data
        try:
            if isinstance(data, str):
                try:
                    decoded = json.loads(data)
                except ValueError:
                    decoded = None
                if type(decoded) is dict and isinstance(decoded.get("type"), str):
                    return data
                return serialize.dumps(
                    {"type": "crossws.message", "text": data, "namespace": msg.namespace}
                )
            if data[:4] == serialize.BINARY_MARKER:
                message = serialize.loads(data)
                if not isinstance(message.get("type"), str):
                    raise ValueError("the message has no 'type'")
                return data
            return serialize.dumps(
                {"type": "crossws.message", "bytes": data, "namespace": msg.namespace}
            )
        except Exception as exc:
            self._drop_malformed(f"dropped a relayed message for {msg.topic!r}: {exc}")
            return None

    def _on_control(self, sender: str, topic: str, data: str | bytes) -> None:
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        if topic == HEARTBEAT:
            if sender == self.instance_id and self._heartbeat is not None:
                self._heartbeat.heard(data)
            return
        if topic == PING:
            self._answer_ping(sender, data)
            return
        if topic == PONG:
            self._pinger.answered(sender, data)
            return
        if topic == CREDIT:
            self._on_credit(data)
            return
        if topic == PROBE:
            self._on_probe(sender, data)
            return
        if topic not in (_GROUP_ADD, _GROUP_DISCARD):
            logger.debug("ignoring an unknown control message %r", topic)
            return
        try:
            group, channel = json.loads(data)
            self.require_valid_group_name(group)
            self.require_valid_channel_name(channel)
        except Exception as exc:
            self._drop_malformed(f"dropped a malformed {topic} message: {exc}")
            return
        if self._owner(channel) == self.instance_id:
            self._apply_membership(topic, group, channel)

    def _on_credit(self, data: str) -> None:
        try:
            target, channel, seen, room = json.loads(data)
            if not (isinstance(channel, str) and type(seen) is int and type(room) is int):
                raise ValueError("not a channel, a number and a room")
        except (ValueError, TypeError) as exc:
            self._drop_malformed(f"a malformed {CREDIT} message: {exc}")
            return
        if target == self.instance_id:
            self._windows.credit(channel, seen, room)

    def _on_probe(self, sender: str, data: str) -> None:
        try:
            channel, number = json.loads(data)
            self.require_valid_channel_name(channel)
            if type(number) is not int:
                raise ValueError("not a number")
        except (ValueError, TypeError) as exc:
            self._drop_malformed(f"a malformed {PROBE} message: {exc}")
            return
        if self._owner(channel) == self.instance_id:
            credit = self._registry.probe(channel, sender, number)
            if credit is not None:
                self._send_credits([credit])

    # Monitoring

    def _relay_healthy(self) -> bool:
        reporter = self._reporter
        return not (reporter.in_outage("subscription") or reporter.in_outage("publishing"))

    def _deaf(self, error: DeafSubscription) -> None:
        self._stats.incr("deaf")
        self._reporter.outage_started("subscription", error, "subscribe")
        self._backplane.restart()

    def _restored(self) -> None:
        """The subscription is back after an outage."""
        self._stats.incr("reconnects")
        resync_type = self.config.resync_type
        if resync_type is not None:
            payload = serialize.dumps({"type": resync_type})
            deadline = monotonic() + self.config.expiry
            for channel in self._registry.owned_channels(self.instance_id):
                self._registry.put(channel, payload, deadline)

    def _answer_ping(self, sender: str, data: str) -> None:
        try:
            request = json.loads(data)
            token = request["token"]
            want_stats = bool(request.get("stats"))
        except (ValueError, KeyError, TypeError):
            return
        info: dict[str, Any] = {**identity(), "driver": self.config.driver_name}
        if want_stats:
            info["stats"] = self.stats()
        answer = json.dumps({"token": token, "info": info})
        self._backplane.spawn(
            lambda driver: self._backplane.publish(sender, self._frame(PONG, answer)),
            "answer a ping",
        )

    async def ping(self, timeout: float = 2.0, *, stats: bool = False) -> list[Pong]:
        """Ask every live instance of the cluster, this one included, to answer.

        Returns the answers that came within ``timeout`` seconds, fastest first, each
        with its round-trip time and, with ``stats=True``, that instance's ``stats()``.
        This instance's own answer proves the backplane carries its messages both ways.
        """
        await self._backplane.subscribed()
        token = self._pinger.start()
        try:
            await self._broadcast(PING, json.dumps({"token": token, "stats": stats}))
            await asyncio.sleep(timeout)
        finally:
            pongs = self._pinger.finish(token)
        return pongs

    # Worker channels fed from the shared queue

    def _worker_wanted(self, channel: str) -> bool:
        return self._registry.has_waiters(channel)

    def _worker_item(self, channel: str, item: str) -> bool:
        """Take an item popped from the shared queue; False to put it back."""
        envelope = decode_envelope(item)
        if envelope is None:
            self._drop_malformed(f"dropped a malformed item of {channel!r}")
            return True
        if envelope.expires is not None and envelope.expires < time.time():
            self._stats.incr("dropped.expired")
            self._reporter.tally("expired", channel, "delivery", _expired, 1, [channel])
            return True
        payload = self._inbound(envelope.msg)
        if payload is None:
            return True
        if self._registry.put_if_wanted(channel, payload):
            self._stats.incr("delivered")
            return True
        return False

    def _return_worker_item(self, channel: str, item: Item) -> None:
        payload = serialize.dumps(item.message) if isinstance(item, serialize.Template) else item
        text = self._frame(channel, payload, time.time() + self.config.expiry)

        async def give_back(driver: Driver) -> None:
            await cast(SupportsWorkerQueue, driver).queue_return(channel, text)

        self._backplane.spawn(give_back, f"return an item to {channel!r}")

    # Housekeeping, on the home loop

    def _sweep(self) -> None:
        now = monotonic()
        group_expiry: float | None = None
        if now >= self._next_group_sweep:
            group_expiry = self.config.group_expiry
            self._next_group_sweep = now + min(_GROUP_SWEEP_EVERY, self.config.group_expiry / 4)
        expired, credits = self._registry.sweep(group_expiry)
        if credits:
            self._send_credits(credits)
        if expired:
            total = sum(expired.values())
            self._stats.incr("dropped.expired", total)
            self._reporter.tally("expired", None, "delivery", _expired, total, expired)
        self._reporter.flush_due()


_layers: weakref.WeakSet[BackplaneChannelLayer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for layer in list(_layers):
        layer._renew_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
