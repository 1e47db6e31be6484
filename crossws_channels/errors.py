"""Exceptions raised or reported by crossws_channels, and the ``on_error`` hook type.

The tree::

    CrosswsChannelsError
    ├── ConfigurationError      (also django's ImproperlyConfigured)
    ├── MessageTooLarge         (also ValueError)
    ├── MessageExpired          reported: a message waited longer than ``expiry``
    └── BackplaneError
        ├── MalformedMessage    reported: backplane traffic that could not be decoded
        ├── MessagesLost        reported: a sender's sequence numbers skipped some
        ├── DeafSubscription    reported: the subscription stopped receiving
        ├── RelayUnavailable    the multiprocessing relay cannot be reached
        └── BackplaneOverloaded reported: the outbox was full, messages were dropped

``MessageTooLarge`` and ``ConfigurationError`` are raised to the caller. The others are
never raised into ``send``/``group_send``: the layer hands them to the ``on_error`` hook
(or to ``logging``) with the stage they happened in. A full channel is reported with
Channels' own :class:`channels.exceptions.ChannelFull`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Literal, Protocol, TypeAlias

from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "STAGES",
    "BackplaneError",
    "BackplaneOverloaded",
    "ConfigurationError",
    "CrosswsChannelsError",
    "DeafSubscription",
    "ErrorHandler",
    "MalformedMessage",
    "MessageExpired",
    "MessageTooLarge",
    "MessagesLost",
    "RelayUnavailable",
    "Stage",
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


class MessageExpired(CrosswsChannelsError):
    """Messages waited longer than ``expiry`` for a receiver and were dropped."""

    def __init__(self, count: int, channels: Sequence[str]) -> None:
        names = ", ".join(repr(name) for name in channels[:3])
        more = f" and {len(channels) - 3} more" if len(channels) > 3 else ""
        super().__init__(f"{count} message(s) expired unread on {names}{more}")
        self.count = count
        self.channels = list(channels)


class BackplaneError(CrosswsChannelsError):
    """A problem with the backplane the layer detected itself."""


class MalformedMessage(BackplaneError):
    """Traffic on the backplane that is not a valid envelope; it was dropped."""


class MessagesLost(BackplaneError):
    """Relayed messages from another instance never arrived (a gap in its numbering)."""

    def __init__(self, sender: str, count: int) -> None:
        super().__init__(f"{count} message(s) relayed by instance {sender} never arrived")
        self.sender = sender
        self.count = count


class DeafSubscription(BackplaneError):
    """The subscription looked connected but no longer received; it was renewed."""


class RelayUnavailable(BackplaneError):
    """The multiprocessing driver's relay cannot be reached."""


class BackplaneOverloaded(BackplaneError):
    """Messages waited too long to be relayed out and were dropped."""
