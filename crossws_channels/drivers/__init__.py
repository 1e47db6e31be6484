"""Backplane drivers, and how the layer finds the one CONFIG names.

Built-in drivers are named by a short key and imported only when chosen, so the
``pgsql`` extra never needs redis-py and the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from django.utils.module_loading import import_string

from ._mp_primary import setup_primary
from .base import (
    Deliver,
    Driver,
    DriverFactory,
    Outgoing,
    SupportsBatch,
    SupportsDirect,
    SupportsFlush,
    SupportsWorkerQueue,
)

__all__ = [
    "BUILTIN",
    "Deliver",
    "Driver",
    "DriverFactory",
    "Outgoing",
    "SupportsBatch",
    "SupportsDirect",
    "SupportsFlush",
    "SupportsWorkerQueue",
    "resolve_factory",
    "setup_primary",
]

BUILTIN: dict[str, str] = {
    "local": "crossws_channels.drivers.local.LocalDriver",
    "redis": "crossws_channels.drivers.redis.RedisDriver",
    "pgsql": "crossws_channels.drivers.pgsql.PgsqlDriver",
    "multiprocessing": "crossws_channels.drivers.multiprocessing.MultiprocessingDriver",
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
