"""A cluster of agent processes on any network driver, for tests written once for all.

:class:`Cluster` starts :class:`tests.agent.Agent` processes that share one ``channel``
over the driver it was made for, with whatever that driver needs around them: the
shared Redis or PostgreSQL server, or a relay process of its own for ``multiprocessing``.
The ``cluster`` fixture in ``conftest.py`` gives one per driver in :data:`DRIVERS`.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

from tests.agent import Agent

__all__ = ["DRIVERS", "Cluster"]

DRIVERS = ("redis", "pgsql", "multiprocessing")


class Cluster:
    """Agents of one cluster (one ``channel``) on ``driver``; :meth:`close` stops them."""

    def __init__(self, driver: str, options: dict[str, Any], log_dir: Path) -> None:
        self.driver = driver
        self.channel = f"cl-{uuid.uuid4().hex[:10]}"
        self._options = options
        self._log_dir = log_dir
        self._agents: list[Agent] = []
        self._stack = contextlib.ExitStack()
        if driver == "multiprocessing":
            from tests.drivers.test_multiprocessing_helpers import (
                RelayProcess,
                short_socket_dir,
            )

            socket_dir = self._stack.enter_context(short_socket_dir())
            self._options = {**options, "socket_dir": str(socket_dir)}
            self._stack.enter_context(RelayProcess(self.channel, socket_dir, log_dir))

    def config(self, **overrides: Any) -> dict[str, Any]:
        """The CONFIG of this cluster's layers, with ``overrides``."""
        return {"driver": self.driver, "channel": self.channel, **self._options, **overrides}

    def start(self, count: int, **overrides: Any) -> list[Agent]:
        """Start ``count`` agents (CONFIG ``overrides`` for all of them), ready."""
        batch = [Agent(self.config(**overrides)) for _ in range(count)]
        self._agents.extend(batch)
        return [agent.wait_ready() for agent in batch]

    def close(self) -> None:
        for agent in self._agents:
            agent.stop()
        self._stack.close()
        if self.driver == "pgsql":
            from tests.drivers.test_pgsql_support import drop_tables

            drop_tables(self._options["dsn"], self.channel)
