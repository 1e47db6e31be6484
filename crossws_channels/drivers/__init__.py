"""Backplane drivers, and how the layer finds the one CONFIG names.

Built-in drivers are named by a short key and imported only when chosen, so the
``pgsql`` extra never needs redis-py and the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from django.utils.module_loading import import_string

from .base import (
    Capabilities,
    DeclaresEcho,
    DeclaresLimits,
    DeclaresOptions,
    Deliver,
    Driver,
    DriverFactory,
    Outgoing,
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
    capabilities,
)

__all__ = [
    "BUILTIN",
    "Capabilities",
    "DeclaresEcho",
    "DeclaresLimits",
    "DeclaresOptions",
    "Deliver",
    "Driver",
    "DriverFactory",
    "Outgoing",
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
    "capabilities",
    "resolve_factory",
    "setup_primary",
]

BUILTIN: dict[str, str] = {
    "local": "crossws_channels.drivers.local.LocalDriver",
    "redis": "crossws_channels.drivers.redis.redis_driver",
    "pgsql": "crossws_channels.drivers.pgsql.PgsqlDriver",
    "multiprocessing": "crossws_channels.drivers.multiprocessing.MultiprocessingDriver",
    "nats": "crossws_channels.drivers.nats.NatsDriver",
}


def resolve_factory(driver: str | Callable[..., Any]) -> DriverFactory:
    """Turn a CONFIG ``driver`` value into a factory.

    Raises ``ValueError`` for an unknown name and ``ImportError`` (with the reason) when
    the module can't be imported, for example because an extra is not installed.
    """
    if callable(driver):
        return cast(DriverFactory, driver)
    path = BUILTIN.get(driver, driver)
    if "." not in path:
        raise ValueError(
            f"unknown driver {driver!r}; use one of {', '.join(sorted(BUILTIN))}, "
            "or the dotted path of a driver factory"
        )
    factory = import_string(path)
    if not callable(factory):
        raise ValueError(f"driver {driver!r} imports as {factory!r}, which is not callable")
    return cast(DriverFactory, factory)


def __getattr__(name: str) -> Any:
    # setup_primary imports the multiprocessing driver's process management (subprocess,
    # select, threads): only for those who ask for it.
    if name == "setup_primary":
        from .multiprocessing import setup_primary

        return setup_primary
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
