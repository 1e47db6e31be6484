"""What arrives from the backplane, and the subscription's ups and downs.

:class:`Inbound` is the :class:`~crossws_channels.drivers.base.Deliver` the driver
calls, on the home loop, with every message exactly as it came off the wire. It drops
this instance's own echo without decoding it, decodes the rest (dropping and reporting
what is malformed), counts gaps in each sender's numbering, and routes:

* ``!``-topics are control messages between layer instances: memberships added or
  discarded for a channel of ours, heartbeats, pings and their answers, credit for our
  sends and requests for it (``_credits``);
* a channel name is a ``send`` to a channel of ours (or, through a driver that can't send
  to one instance, of another instance: ignored);
* anything else is a group message, fanned out to our members (and possibly holding the
  backplane back: ``_flow``).

It also keeps the subscription's outage: one report when it breaks, the counters, and,
with ``resync_type``, a message to every channel here once it is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from channels.layers import BaseChannelLayer

from . import serialize
from ._credits import CREDIT, PROBE, Grants, SendWindows
from ._delivery import Delivery
from ._flow import InboundFlow
from ._frames import GROUPS, Frames, unpack_groups
from ._health import Outage
from ._histograms import Histogram
from ._known import KnownNames
from ._monitor import (
    HEARTBEAT,
    PING,
    PONG,
    Census,
    Heartbeat,
    Pinger,
    SequenceGaps,
    group_answer,
    identity,
)
from ._outbox import Outbox
from ._registry import Registry
from ._reporting import HasLoop, Reporter, Stats
from ._routing import Routes
from ._sealing import ReplayGuard, Sealer, Unauthenticated
from .envelope import Fields, SyncMessage, decode_fields
from .errors import MalformedMessage, MessagesLost, Stage

logger = logging.getLogger("crossws_channels")

__all__ = ["GROUP_ADD", "GROUP_DISCARD", "Inbound"]

# Topics of control messages start with "!", which no group or channel name can.
GROUP_ADD = "!add"
GROUP_DISCARD = "!discard"
INSTANCE_ID_LENGTH = 12
# Pings answered: far more than operators' tools send (a check or a status page asks
# every few seconds), far fewer than a flood.
PING_ANSWERS_PER_SECOND = 10.0
PING_ANSWER_BURST = 20


class TokenBucket:
    """At most ``rate`` events a second on average, ``burst`` at once (home loop only)."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


# Channels' name rules, for names that arrive from the backplane.
_names = BaseChannelLayer()


def owner(channel: str) -> str | None:
    """The instance that owns a process-specific channel; None for worker channels."""
    bang = channel.find("!")
    if bang < 0:
        return None
    return channel[max(0, bang - INSTANCE_ID_LENGTH) : bang]


def envelope_limit(max_message_size: int) -> int:
    """The longest backplane message decoded at all, for a cluster's ``max_message_size``.

    An envelope carries the serialized message as a JSON string: escaping at most doubles
    it (every quote and backslash), base64 adds a third to binary data, and the envelope's
    own fields are small. Twice that again leaves room for the largest real envelope; an
    envelope past it is not from a layer of this cluster, and decoding it would cost
    memory for nothing.
    """
    return 4 * max_message_size + 64 * 1024


def _implausible(subject: str | None, count: int, names: dict[str, int]) -> Exception:
    return MalformedMessage(
        f"{count} relayed message(s) numbered far past their sender's last one, not "
        "counted as lost (forged or corrupt traffic?): " + ", ".join(names)
    )


def _lost(subject: str | None, count: int, names: dict[str, int]) -> Exception:
    top = max(names, key=names.__getitem__) if names else "?"
    return MessagesLost(top, count, names)


class Inbound:
    """This instance's side of the subscription (see the module docstring)."""

    def __init__(
        self,
        frames: Frames,
        registry: Registry,
        delivery: Delivery,
        flow: InboundFlow,
        windows: SendWindows,
        grants: Grants,
        outbox: Outbox,
        census: Census,
        subscription: Outage,
        stats: Stats,
        reporter: Reporter,
        *,
        heartbeat: Heartbeat | None,
        resync_type: str | None,
        driver_name: str,
        max_envelope: int,
        guard: ReplayGuard | None = None,
        routes: Routes | None = None,
        lag: Histogram | None = None,
        home: HasLoop,
    ) -> None:
        self._frames = frames
        # With signing_keys or encryption_keys: what is not sealed by the cluster, or
        # seen before, is refused before anything acts on it.
        self._sealer: Sealer | None = frames.sealer
        self._guard = guard
        # Routing "groups": group messages are numbered per topic, and a remote
        # group_add may need a topic subscribed.
        self._routes = routes
        # Send to arrival of the messages for channels that say when they were sent.
        self._lag = lag
        self._max_envelope = max_envelope
        self._instance_id = frames.instance_id
        self._registry = registry
        self._delivery = delivery
        self._flow = flow
        self._windows = windows
        self._grants = grants
        self._outbox = outbox
        self._census = census
        self._subscription = subscription
        self._stats = stats
        self._counts = stats.home
        # The loop the driver delivers on (see Deliver): the fan-out's hand-over to a
        # waiting receiver needs it, and asking asyncio costs a system call (getpid).
        self._home = home
        self._reporter = reporter
        self._heartbeat = heartbeat
        self._resync_type = resync_type
        self._driver_name = driver_name
        self.pinger = Pinger()
        self._ping_budget = TokenBucket(PING_ANSWERS_PER_SECOND, PING_ANSWER_BURST)
        self._gaps: SequenceGaps = census.gaps
        self._up = False
        # Our own envelopes start with this (a pub/sub backplane echoes them back to us):
        # dropped by prefix without being decoded, unless they are control messages we
        # sent ourselves (scenario A of the benchmark: decoding every echo cost the
        # sender a quarter of its time).
        prefix = frames.frame("!", "")
        self._echo_text = prefix[: prefix.index('"msg"')]
        self._echo_bytes = self._echo_text.encode()
        self._control_text = ',"topic":"!'
        self._control_bytes = self._control_text.encode()
        # How far into an envelope of ours the control marker can be: right after our
        # id and namespace, which are fixed.
        self._echo_scan = prefix.index(self._control_text) + len(self._control_text)
        self._valid_groups = KnownNames()  # of relayed messages

    # The Deliver protocol

    def __call__(self, raw: str | bytes, /) -> asyncio.Future[None] | None:
        """One message from the driver; a future when the driver must pause (``_flow``).

        Every relayed message comes through here: the usual one (a numbered group
        message from another layer instance) is handled in this one function, the
        rest by the methods it calls."""
        try:
            if type(raw) is bytes:
                if raw.startswith(self._echo_bytes) and (
                    self._control_bytes not in raw[: self._echo_scan]
                ):
                    return None  # _own_echo, for what a driver usually delivers
            elif self._own_echo(raw):
                return None
            if len(raw) > self._max_envelope or self._sealer is not None:
                return self._on_raw(raw)
            fields = decode_fields(raw)
            if fields is None:
                return self._on_raw(raw)  # reports it
            sender, _, topic, data, seq, _, _, sent = fields
            if (
                seq is None
                or sender == self._instance_id
                or "!" in topic  # a control message or a direct send
                or topic == GROUPS
                or topic not in self._valid_groups
            ):
                return self._on_fields(fields)
            self._counts["relayed_in"] += 1
            lag = self._lag
            if sent is not None and lag is not None:
                late = time.time() - sent
                # Clocks of different hosts differ: a message can't arrive before it was sent.
                lag.observe(late if late > 0.0 else 0.0)
            routes = self._routes
            missing = self._gaps.observe(
                sender, seq, None if routes is None else routes.gap_key(sender, topic)
            )
            if missing != 0:
                self._gap(sender, missing)
            members = self._registry.member_count(topic)
            if not members:
                return None  # none of the group's members are here
            flow = self._flow
            self._delivery.to_group(topic, data, flow, members, self._home.loop)
            return None if flow.forming is None else flow.finish()
        except Exception as exc:
            self._reporter.report(exc, "delivery")
            return None

    def report(self, error: Exception, stage: Stage, /) -> None:
        self._reporter.report(error, stage)

    def connection_lost(self, error: Exception, /) -> None:
        """The subscription broke, or an attempt to set it up failed."""
        if self._up:
            self._up = False
            self._stats.incr("disconnects")
        self._reporter.failed(self._subscription, error, "subscribe")

    def connection_made(self) -> None:
        """The subscription is in place: for the first time, or again."""
        self._up = True
        self._stats.incr("subscribed")
        if self._subscription.end() is None:
            return
        self._stats.incr("reconnects")
        if self._resync_type is not None:
            payload = serialize.dumps({"type": self._resync_type})
            for channel in self._registry.owned_channels(self._instance_id):
                self._delivery.to_channel("", channel, payload, None, False)

    # Routing

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
        """A message :meth:`__call__` leaves to the general path: oversized, sealed,
        malformed."""
        if len(raw) > self._max_envelope:
            # Larger than any envelope a layer of the cluster sends: not decoded at all.
            self._reporter.drop_malformed(
                f"{len(raw)} bytes of backplane traffic, over the {self._max_envelope} an "
                "envelope may have (see max_message_size)",
                "oversized",
            )
            return None
        sealer = self._sealer
        if sealer is not None:
            try:
                opened = sealer.open(raw)
            except Unauthenticated as exc:
                self._reporter.drop_unauthenticated(str(exc))
                return None
        fields = decode_fields(raw)
        if fields is None:
            self._reporter.drop_malformed(
                f"{len(raw)} bytes of backplane traffic that are not an envelope"
            )
            return None
        if sealer is None:
            return self._on_fields(fields)
        sender, namespace, topic, data, seq, _, ask, sent = fields
        assert self._guard is not None
        refusal = self._guard.admit(sender, opened)
        if refusal is not None:
            self._reporter.drop_unauthenticated(refusal, "replayed")
            return None
        try:
            data = sealer.data_of(opened, sender, topic, data)
        except Unauthenticated as exc:
            self._reporter.drop_unauthenticated(str(exc))
            return None
        return self._on_fields((sender, namespace, topic, data, seq, None, ask, sent))

    def _on_fields(self, fields: Fields) -> asyncio.Future[None] | None:
        """A decoded (and, when the cluster seals, opened) envelope."""
        sender, namespace, topic, data, seq, _, ask, sent = fields
        if sender == self._instance_id:
            # Our own echo: only the control messages we address to ourselves matter.
            if topic[:1] == "!":
                self._on_control(sender, topic, data)
            return None
        self._stats.incr_home("relayed_in")
        if sent is not None and self._lag is not None:
            # Clocks of different hosts differ: a message can't arrive before it was sent.
            self._lag.observe(max(0.0, time.time() - sent))
        if topic[:1] == "!":
            if seq is not None:  # a broadcast: numbered per sender
                self._count_gap(sender, seq)
            self._on_control(sender, topic, data)
            return None
        if "!" in topic:
            self._on_direct(sender, topic, data, seq, ask)
            return None
        if topic == GROUPS:
            return self._on_groups(sender, seq, data)
        if topic not in self._valid_groups and not self._valid_group(topic):
            logger.debug("ignoring a relayed message for topic %r: not a valid group name", topic)
            return None
        if seq is not None:
            routes = self._routes
            self._count_gap(sender, seq, None if routes is None else routes.gap_key(sender, topic))
            # A numbered envelope comes from a layer instance, whose data is a
            # serialized message (the fan-out or the receiver decodes it).
            payload = data
        else:
            # crossws peers' data is checked and wrapped here.
            try:
                payload = serialize.relayed_payload(SyncMessage(namespace, topic, data))
            except Exception as exc:
                self._reporter.drop_malformed(f"a relayed message for {topic!r}: {exc}")
                return None
        members = self._registry.member_count(topic)
        if not members:
            return None  # none of the group's members are here
        flow = self._flow
        self._delivery.to_group(topic, payload, flow, members)
        return flow.finish()

    def _valid_group(self, topic: str) -> bool:
        """Whether ``topic`` is a valid group name, remembering those that are."""
        if not _names.group_name_regex.match(topic) or len(topic) >= _names.MAX_NAME_LENGTH:
            return False
        self._valid_groups.remember(topic)
        return True

    def _on_groups(
        self, sender: str, number: int | None, data: str | bytes
    ) -> asyncio.Future[None] | None:
        """One message to several groups (``group_send_many``), from a layer instance."""
        try:
            if number is None:
                raise ValueError("not numbered")
            groups, payload = unpack_groups(data)
            if not groups:
                raise ValueError("no groups")
            for group in groups:
                _names.require_valid_group_name(group)
        except Exception as exc:
            self._reporter.drop_malformed(f"a malformed message to several groups: {exc}")
            return None
        routes = self._routes
        # The groups of one envelope share a topic (routing "groups"): one stream.
        self._count_gap(
            sender, number, None if routes is None else routes.gap_key(sender, groups[0])
        )
        flow = self._flow
        self._delivery.to_groups(groups, payload, flow)
        return flow.finish()

    def _on_direct(
        self, sender: str, channel: str, data: str | bytes, number: int | None, ask: bool
    ) -> None:
        """A message another instance sent to ``channel``."""
        if owner(channel) != self._instance_id:
            return  # a direct send for another instance, relayed to everyone
        # Only layer instances send to a channel: its data is a serialized message
        # (checked when it is received).
        if not isinstance(data, str) and data[:4] != serialize.BINARY_MARKER:
            self._reporter.drop_malformed(f"a direct message for {channel!r} that is not a message")
            return
        credit = self._delivery.to_channel(sender, channel, data, number, ask)
        if credit is not None:
            self._grants.send([credit])

    def _count_gap(self, sender: str, seq: int, stream: str | None = None) -> None:
        missing = self._gaps.observe(sender, seq, stream)
        if missing != 0:
            self._gap(sender, missing)

    def _gap(self, sender: str, missing: int | None) -> None:
        """What :meth:`SequenceGaps.observe` found that was not the next number."""
        if missing is None:
            self._stats.incr("implausible_seq")
            self._reporter.tally("implausible", None, "delivery", _implausible, 1, [sender])
            return
        if missing:
            self._stats.incr("lost", missing)
            self._reporter.tally("lost", None, "delivery", _lost, missing, [sender])

    # Control messages

    def _on_control(self, sender: str, topic: str, data: str | bytes) -> None:
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        if topic == HEARTBEAT:
            if sender == self._instance_id and self._heartbeat is not None:
                self._heartbeat.heard(data)
        elif topic == PING:
            self._answer_ping(sender, data)
        elif topic == PONG:
            self.pinger.answered(sender, data)
        elif topic == CREDIT:
            self._on_credit(data)
        elif topic == PROBE:
            self._on_probe(sender, data)
        elif topic in (GROUP_ADD, GROUP_DISCARD):
            self._on_membership(topic, data)
        else:
            logger.debug("ignoring an unknown control message %r", topic)

    def _on_membership(self, topic: str, data: str) -> None:
        try:
            group, channel = json.loads(data)
            _names.require_valid_group_name(group)
            _names.require_valid_channel_name(channel)
        except Exception as exc:
            self._reporter.drop_malformed(f"a malformed {topic} message: {exc}")
            return
        if owner(channel) != self._instance_id:
            return
        if topic == GROUP_ADD:
            created = self._registry.group_add(group, channel)
            routes = self._routes
            if routes is not None:
                routes.want(routes.joined(group) if created else routes.topic_of(group))
        else:
            self._registry.group_discard(group, channel)

    def _on_credit(self, data: str) -> None:
        try:
            target, channel, seen, room = json.loads(data)
            if not (isinstance(channel, str) and type(seen) is int and type(room) is int):
                raise ValueError("not a channel, a number and a room")
        except (ValueError, TypeError) as exc:
            self._reporter.drop_malformed(f"a malformed {CREDIT} message: {exc}")
            return
        if target == self._instance_id:
            self._windows.credit(channel, seen, room)

    def _on_probe(self, sender: str, data: str) -> None:
        try:
            channel, number = json.loads(data)
            _names.require_valid_channel_name(channel)
            if type(number) is not int:
                raise ValueError("not a number")
        except (ValueError, TypeError) as exc:
            self._reporter.drop_malformed(f"a malformed {PROBE} message: {exc}")
            return
        if owner(channel) == self._instance_id:
            credit = self._registry.probe(channel, sender, number)
            if credit is not None:
                self._grants.send([credit])

    def _answer_ping(self, sender: str, data: str) -> None:
        if not self._ping_budget.take():
            # One ping makes every instance answer: bounded, so that a flood of pings (on
            # a cluster without signing_keys, anyone's) can't make the cluster flood back.
            self._stats.incr("dropped.pings")
            return
        try:
            request = json.loads(data)
            token = request["token"]
            info = self.answer(request)
        except (ValueError, KeyError, TypeError):
            return
        answer = json.dumps({"token": token, "info": info})
        self._outbox.post(sender, self._frames.frame(PONG, answer))

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """This instance's answer to a ping's ``request`` (who it is; with ``stats``, its
        stats(); with ``group``, its part of a group query). ``TypeError`` for a group
        that is not a valid name."""
        group = request.get("group")
        if group is not None:
            _names.require_valid_group_name(group)
        info: dict[str, Any] = {**identity(), "driver": self._driver_name}
        if request.get("stats"):
            info["stats"] = self._census.snapshot()
        if group is not None:
            info["group"] = group_answer(self._registry, group, bool(request.get("channels")))
        return info
