"""Exceptions raised or reported by crossws_channels, and the ``on_error`` hook type.

The tree::

    CrosswsChannelsError
    ├── ConfigurationError      (also django's ImproperlyConfigured)
    ├── MessageTooLarge         (also ValueError)
    ├── MessageExpired          reported: a message waited longer than ``expiry``
    ├── MessagesDropped         reported: messages dropped for channels at capacity
    │                           (also Channels' ChannelFull)
    ├── ChannelStalled          reported: a full channel's consumer stopped reading
    └── BackplaneError
        ├── MalformedMessage    reported: backplane traffic that could not be decoded
        ├── UnauthenticatedMessage  reported: traffic not sealed by the cluster's keys
        ├── MessagesLost        reported: a sender's sequence numbers skipped some
        ├── DeafSubscription    reported: the subscription stopped receiving
        ├── RelayUnavailable    the multiprocessing relay cannot be reached
        ├── BackplaneOverloaded reported: the outbox was full, messages were dropped
        ├── ForeignObject       reported: pgsql found a table or function it did not create
        └── NotificationQueueFilling  reported: PostgreSQL's NOTIFY queue is over half full

``MessageTooLarge`` and ``ConfigurationError`` are raised to the caller. The others are
never raised into ``send``/``group_send``: the layer hands them to the ``on_error`` hook
(or to ``logging``) with the stage they happened in. A full channel is reported with
Channels' own :class:`channels.exceptions.ChannelFull` when ``send`` raises it, and with
its subclass :class:`MessagesDropped` when the layer reports drops.

Reports of things that can happen once per message (drops, expiries, malformed traffic,
lost messages) are aggregated: at most one per key (a group, a channel) per second, each
carrying the count since the previous one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Literal, Protocol, TypeAlias

from channels.exceptions import ChannelFull
from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "STAGES",
    "BackplaneError",
    "BackplaneOverloaded",
    "ChannelStalled",
    "ConfigurationError",
    "CrosswsChannelsError",
    "DeafSubscription",
    "ErrorHandler",
    "ForeignObject",
    "MalformedMessage",
    "MessageExpired",
    "MessageTooLarge",
    "MessagesDropped",
    "MessagesLost",
    "NotificationQueueFilling",
    "RelayUnavailable",
    "Stage",
    "UnauthenticatedMessage",
]

Stage: TypeAlias = Literal["subscribe", "publish", "delivery"]
"""Where a backplane failure happened.

``subscribe``: connecting to the backplane or listening on it; ``publish``: relaying a
message out to other instances; ``delivery``: handing an inbound or local message to this
process's channels.
"""

STAGES: tuple[Stage, ...] = ("subscribe", "publish", "delivery")


class ErrorHandler(Protocol):
    """The ``on_error`` hook: a plain function or a coroutine function."""

    def __call__(self, error: Exception, stage: Stage, /) -> Awaitable[None] | None: ...


class CrosswsChannelsError(Exception):
    """Base class of every exception this package defines."""


class ConfigurationError(CrosswsChannelsError, ImproperlyConfigured):
    """The layer's CONFIG is invalid; the message names the setting.

    A driver raises it from its factory as ``ConfigurationError("must be ...", key="url")``;
    the layer re-raises it with the full setting path in front,
    ``CHANNEL_LAYERS['default']['CONFIG']['url'] must be ...``.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key


class MessageTooLarge(CrosswsChannelsError, ValueError):
    """A message serializes to more than ``max_message_size`` bytes; it was not sent."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"message is {size} bytes once serialized, over the max_message_size of "
            f"{limit} bytes; it was not sent"
        )
        self.size = size
        self.limit = limit


def _names(channels: Sequence[str]) -> str:
    names = ", ".join(repr(name) for name in channels[:3])
    return names + (f" and {len(channels) - 3} more" if len(channels) > 3 else "")


class MessageExpired(CrosswsChannelsError):
    """Messages waited longer than ``expiry`` for a receiver and were dropped."""

    def __init__(self, count: int, channels: Sequence[str]) -> None:
        super().__init__(f"{count} message(s) expired unread on {_names(channels)}")
        self.count = count
        self.channels = list(channels)


class MessagesDropped(CrosswsChannelsError, ChannelFull):
    """Messages were dropped for channels at capacity whose consumers were not reading.

    ``count`` messages since the previous report of the same ``group`` (or, for messages
    sent to one channel, the same channel), over ``channels`` (a few of their names).
    """

    def __init__(self, count: int, channels: Sequence[str], group: str | None = None) -> None:
        where = f" of group {group!r}" if group is not None else ""
        super().__init__(
            f"{count} message(s) dropped for full channel(s){where}: {_names(channels)}"
        )
        self.count = count
        self.channels = list(channels)
        self.group = group


class ChannelStalled(CrosswsChannelsError):
    """Full channels held up relaying for ``backpressure`` seconds without draining.

    Relaying resumed without them: until they have drained to half their capacity,
    messages beyond their capacity are dropped (and reported as :class:`MessagesDropped`).
    """

    def __init__(self, count: int, channels: Sequence[str]) -> None:
        super().__init__(
            f"{count} full channel(s) did not drain within the backpressure limit and no "
            f"longer hold up relaying: {_names(channels)}"
        )
        self.count = count
        self.channels = list(channels)


class BackplaneError(CrosswsChannelsError):
    """A problem with the backplane the layer detected itself."""


class MalformedMessage(BackplaneError):
    """Traffic on the backplane that is not a valid envelope; it was dropped."""


class UnauthenticatedMessage(BackplaneError):
    """Backplane traffic refused because ``signing_keys`` or ``encryption_keys`` is set
    and it was unsigned, badly signed, undecryptable, replayed or outside the replay
    window; it was dropped before anything acted on it."""


class MessagesLost(BackplaneError):
    """Relayed messages from other instances never arrived (gaps in their numbering).

    ``count`` in all since the previous report; ``by_sender`` splits it by sending
    instance (the senders with the most losses, when there are many), and ``sender`` is
    the one that lost the most.
    """

    def __init__(self, sender: str, count: int, by_sender: dict[str, int] | None = None) -> None:
        self.by_sender = dict(by_sender) if by_sender else {sender: count}
        if len(self.by_sender) > 1:
            who = f"{len(self.by_sender)} instances (most by {sender})"
        else:
            who = f"instance {sender}"
        super().__init__(f"{count} message(s) relayed by {who} never arrived")
        self.sender = sender
        self.count = count


class DeafSubscription(BackplaneError):
    """The subscription looked connected but no longer received; it was renewed."""


class RelayUnavailable(BackplaneError):
    """The multiprocessing driver's relay cannot be reached."""


class BackplaneOverloaded(BackplaneError):
    """Messages waited too long to be relayed out and were dropped."""


class ForeignObject(BackplaneError):
    """The pgsql driver found a table or function under one of its names that it did not
    create (another role owns it); it refuses to use it."""


class NotificationQueueFilling(BackplaneError):
    """PostgreSQL's notification queue is more than half full: a listener somewhere (in a
    long transaction, or too slow) holds it back; once full, every NOTIFY fails."""
