"""The redis driver behind Redis Sentinel: asking the sentinels where the master is.

:class:`MasterLocator` asks the sentinels, in turn, ``SENTINEL GET-MASTER-ADDR-BY-NAME``,
each time over a connection of its own that is closed before the answer is used, so an
attempt cut short (a timeout, the layer closing) leaves nothing open. The connections the
driver makes (:func:`sentinel_settings`) ask it when they connect: after a failover, the
next connection reaches the new master.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from .connection import ask_once
from .options import DEFAULT_CONNECT_TIMEOUT, DEFAULT_SOCKET_TIMEOUT, Connector, SentinelOptions

__all__ = ["MasterLocator", "MasterNotFound", "SentinelSettings", "sentinel_settings"]


class MasterNotFound(ConnectionError):
    """No sentinel named a master for ``master_name``."""


class MasterLocator:
    """Asks the sentinels where the master of ``master_name`` is."""

    def __init__(self, options: SentinelOptions, connector: Connector) -> None:
        module = importlib.import_module(f"{connector}.asyncio.connection")
        self._connection_class = module.Connection
        self._sentinels = list(options.sentinels)
        self._name = options.master_name
        self._kwargs: dict[str, Any] = {
            "socket_timeout": DEFAULT_SOCKET_TIMEOUT,
            "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT,
            **options.sentinel_kwargs,
        }
        if self._kwargs.pop("ssl", False):
            self._connection_class = module.SSLConnection

    async def locate(self) -> tuple[str, int]:
        """The master's address; :class:`MasterNotFound` if no sentinel answered with one.

        The sentinel that answered is asked first next time.
        """
        errors = []
        for index, (host, port) in enumerate(self._sentinels):
            connection = self._connection_class(host=host, port=port, **self._kwargs)
            try:
                reply = await ask_once(
                    connection, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self._name
                )
            except Exception as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            if isinstance(reply, (list, tuple)) and len(reply) == 2:
                if index:
                    self._sentinels.insert(0, self._sentinels.pop(index))
                address = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
                return address, int(reply[1])
            errors.append(f"{host}:{port}: no master named {self._name!r}")
        raise MasterNotFound(f"no sentinel named the master {self._name!r}: {'; '.join(errors)}")


class SentinelSettings:
    """Connection settings (a pool's ``connection_class`` and ``connection_kwargs``, for
    :class:`~.connection.ConnectionFactory`) whose connections ask ``locator`` where
    to connect."""

    def __init__(self, locator: MasterLocator, connection_class: type, kwargs: Mapping[str, Any]):
        self.locator = locator
        self.connection_class = connection_class
        self.connection_kwargs = dict(kwargs)

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """Nothing to close: the settings hold no connection."""


def sentinel_settings(options: SentinelOptions, connector: Connector) -> SentinelSettings:
    """The settings of the master's connections, from ``master_kwargs``."""
    module = importlib.import_module(f"{connector}.asyncio.connection")
    locator = MasterLocator(options, connector)
    kwargs: dict[str, Any] = {
        "socket_timeout": DEFAULT_SOCKET_TIMEOUT,
        "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT,
        "socket_keepalive": True,
        **options.master_kwargs,
    }
    base = module.SSLConnection if kwargs.pop("ssl", False) else module.Connection

    class LocatedConnection(base):  # type: ignore[misc, valid-type]
        """A connection that asks the sentinels for the master's address first."""

        async def connect(self) -> None:
            if not self.is_connected:
                self.host, self.port = await locator.locate()
            await super().connect()

    return SentinelSettings(locator, LocatedConnection, kwargs)
