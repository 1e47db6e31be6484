"""A Django Channels layer that relays groups between processes over a pluggable backplane.

The public surface, importable from here::

    from crossws_channels import BackplaneChannelLayer, encode_envelope, MessagesDropped

Names are imported on first use, so that ``python -m crossws_channels.relay`` (which
needs neither Django nor the layer) starts quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._monitor import GroupSnapshot, Pong
    from .drivers import (
        Deliver,
        Driver,
        DriverFactory,
        Ready,
        SubscribingDriver,
        SupportsBatch,
        SupportsDirect,
        SupportsFlush,
        SupportsPublishNow,
        SupportsQueueTake,
        SupportsTopics,
        SupportsWorkerQueue,
        Topic,
        setup_primary,
    )
    from .envelope import Envelope, SyncMessage, decode_envelope, encode_envelope
    from .errors import (
        BackplaneError,
        BackplaneOverloaded,
        ChannelStalled,
        ConfigurationError,
        CrosswsChannelsError,
        DeafSubscription,
        ErrorHandler,
        ForeignObject,
        MalformedMessage,
        MessageExpired,
        MessagesDropped,
        MessagesLost,
        MessageTooLarge,
        NotificationQueueFilling,
        RelayUnavailable,
        Stage,
        UnauthenticatedMessage,
    )
    from .layer import BackplaneChannelLayer

__all__ = [
    "BackplaneChannelLayer",
    "BackplaneError",
    "BackplaneOverloaded",
    "ChannelStalled",
    "ConfigurationError",
    "CrosswsChannelsError",
    "DeafSubscription",
    "Deliver",
    "Driver",
    "DriverFactory",
    "Envelope",
    "ErrorHandler",
    "ForeignObject",
    "GroupSnapshot",
    "MalformedMessage",
    "MessageExpired",
    "MessageTooLarge",
    "MessagesDropped",
    "MessagesLost",
    "NotificationQueueFilling",
    "Pong",
    "Ready",
    "RelayUnavailable",
    "Stage",
    "SubscribingDriver",
    "SupportsBatch",
    "SupportsDirect",
    "SupportsFlush",
    "SupportsPublishNow",
    "SupportsQueueTake",
    "SupportsTopics",
    "SupportsWorkerQueue",
    "SyncMessage",
    "Topic",
    "UnauthenticatedMessage",
    "__version__",
    "decode_envelope",
    "encode_envelope",
    "setup_primary",
]

# Where each public name lives.
_HOMES = {
    "BackplaneChannelLayer": "layer",
    **dict.fromkeys(["GroupSnapshot", "Pong"], "_monitor"),
    **dict.fromkeys(["Envelope", "SyncMessage", "decode_envelope", "encode_envelope"], "envelope"),
    **dict.fromkeys(
        [
            "Deliver",
            "Driver",
            "DriverFactory",
            "Ready",
            "SubscribingDriver",
            "SupportsBatch",
            "SupportsDirect",
            "SupportsFlush",
            "SupportsPublishNow",
            "SupportsQueueTake",
            "SupportsTopics",
            "SupportsWorkerQueue",
            "Topic",
            "setup_primary",
        ],
        "drivers",
    ),
}


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "__version__":
        module = importlib.import_module(f".{_HOMES.get(name, 'errors')}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
