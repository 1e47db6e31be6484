"""A cluster of agents on any driver, for tests written once for all of them.

:class:`Cluster` starts agents that share one ``channel`` over the driver it was made
for, with whatever that driver needs around them: the shared Redis or PostgreSQL server,
or a relay process of its own for ``multiprocessing``. On a network driver each agent is
a real OS process (:class:`tests.agent.Agent`). The ``local`` driver relays inside one
process only, so there each agent is a :class:`ThreadAgent`: a layer on an event loop of
its own thread, answering the same commands. The ``cluster`` fixture in ``conftest.py``
gives one cluster per driver in :data:`DRIVERS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from tests.agent import CALL_TIMEOUT, RECORD, Agent, AgentError, from_json, operations, to_json
from tests.loops import OtherLoop

__all__ = [
    "DRIVERS",
    "NETWORK_DRIVERS",
    "ON_CLUSTER",
    "SENTINEL",
    "VARIANTS",
    "Cluster",
    "ThreadAgent",
    "drop_storage",
    "server_options",
    "variant",
]

NETWORK_DRIVERS = ("redis", "pgsql", "multiprocessing", "nats")
DRIVERS = ("local", *NETWORK_DRIVERS)
# Drivers again with encryption_keys (which signs every envelope too): sealed envelopes
# must behave exactly like plain ones. Sealing happens in the layer, before any driver
# sees the envelope, so two transports of different kinds carry it here: a pub/sub
# server's text messages (redis) and the relay's own framing (multiprocessing); the
# sealing tests cover the rest.
ENCRYPTED = "+encrypted"
SEALED = ("redis", "multiprocessing")
# The drivers with topics again with routing "groups" (one topic per group), and redis
# with partitions of groups: selective delivery must keep every promise broadcast does.
GROUPS = "+groups"
PARTITIONS = "+partitions"
# redis through a master, a replica and three sentinels of the session's own.
SENTINEL = "+sentinel"
# redis on a Redis Cluster of the session's own (three primaries), with groups routing.
ON_CLUSTER = "+cluster"
ROUTED = ("local", "redis", "nats")
# redis with partitions of groups is run by the tests where partitions change the wire
# (test_many_and_queries); test_routing covers what partitions decide.
VARIANTS = (
    *DRIVERS,
    *(driver + ENCRYPTED for driver in SEALED),
    *(driver + GROUPS for driver in ROUTED),
    "redis" + SENTINEL,
    "redis" + ON_CLUSTER,
)
CLUSTER_KEYS = ["contract-suite-key-" + "k" * 16]


def server_options(request: Any, driver: str, via: str = "") -> dict[str, Any]:
    """The CONFIG that reaches the shared server of ``driver`` (from the conftest
    fixtures, which skip or fail when it is down); none for the other drivers. ``via``
    :data:`SENTINEL`: the session's sentinels instead."""
    if via == ON_CLUSTER:
        deployment = request.getfixturevalue("redis_cluster")
        return {"url": deployment.url, "cluster": True, "routing": "groups"}
    if via == SENTINEL:
        deployment = request.getfixturevalue("sentinel_deployment")
        return {"sentinels": deployment.addresses, "master_name": deployment.MASTER_NAME}
    if driver == "redis":
        return {"url": request.getfixturevalue("redis_url")}
    if driver == "pgsql":
        return {"dsn": request.getfixturevalue("pg_dsn")}
    if driver == "nats":
        return {"url": request.getfixturevalue("nats_url")}
    return {}


def drop_storage(driver: str, options: dict[str, Any], channel: str) -> None:
    """Remove what cluster ``channel`` left on its server: pgsql tables, JetStream
    streams (Redis keys expire by themselves)."""
    if driver == "pgsql":
        from tests.drivers.pgsql.support import drop_tables

        drop_tables(options["dsn"], channel)
    elif driver == "nats":
        from tests.drivers.nats.support import drop_streams

        drop_streams(options["url"], channel)


def variant(name: str) -> tuple[str, dict[str, Any]]:
    """The driver of a :data:`VARIANTS` name, and the CONFIG the variant adds."""
    if name.endswith(ENCRYPTED):
        return name[: -len(ENCRYPTED)], {"encryption_keys": CLUSTER_KEYS}
    if name.endswith(GROUPS):
        return name[: -len(GROUPS)], {"routing": "groups"}
    if name.endswith(SENTINEL):
        return name[: -len(SENTINEL)], {}
    if name.endswith(ON_CLUSTER):
        return name[: -len(ON_CLUSTER)], {}
    if name.endswith(PARTITIONS):
        # Few partitions, so that the groups of a test share some.
        return name[: -len(PARTITIONS)], {"routing": "groups", "routing_partitions": 4}
    return name, {}


class ThreadAgent:
    """The commands of :class:`tests.agent.Agent`, run by a layer on a thread of this
    process (for the ``local`` driver). Results go through the same JSON round trip."""

    def __init__(self, config: dict[str, Any]) -> None:
        from crossws_channels.layer import BackplaneChannelLayer

        self._reports: list[dict[str, Any]] = []
        if config.get("on_error") == RECORD:
            config = {**config, "on_error": self._record}
        self._other = OtherLoop()
        self.layer = BackplaneChannelLayer(**config)
        self._operations = operations(self.layer)
        self._operations["reports"] = self._reports_so_far
        self._pending: dict[int, Future[Any]] = {}
        self._ids = itertools.count(1)
        self.instance_id = ""

    def _record(self, error: Exception, stage: str) -> None:
        self._reports.append(
            {"type": type(error).__name__, "stage": stage, "count": getattr(error, "count", None)}
        )

    async def _reports_so_far(self) -> list[dict[str, Any]]:
        return list(self._reports)

    def wait_ready(self) -> ThreadAgent:
        self.call("new_channel")  # returns once the subscription is in place
        self.instance_id = self.layer.instance_id
        return self

    def submit(self, op: str, *args: Any) -> int:
        command = next(self._ids)
        arguments = from_json(json.loads(json.dumps(to_json(list(args)))))
        coroutine = self._operations[op](*arguments)
        self._pending[command] = asyncio.run_coroutine_threadsafe(coroutine, self._other.loop)
        return command

    def result(self, command: int, timeout: float = CALL_TIMEOUT) -> Any:
        future = self._pending.pop(command)
        try:
            value = future.result(timeout)
        except FutureTimeout:
            raise AssertionError(f"thread agent: no answer {command} within {timeout} s") from None
        except Exception as exc:
            raise AgentError(type(exc).__name__, str(exc)) from exc
        return from_json(json.loads(json.dumps(to_json(value))))

    def call(self, op: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return self.result(self.submit(op, *args), timeout)

    def sync_group_send(self, group: str, count: int, timeout: float = 120.0) -> dict[str, Any]:
        """``count`` group_sends through async_to_sync, from a thread without a loop, as
        a sync view or a management command calls the layer."""
        import threading
        import time

        from asgiref.sync import async_to_sync

        done: dict[str, Any] = {}

        def run() -> None:
            started = time.monotonic()
            group_send = async_to_sync(self.layer.group_send)
            for n in range(count):
                group_send(group, {"type": "sync.message", "n": n})
            done.update(done=count, seconds=time.monotonic() - started)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(timeout)
        assert done, f"thread agent: {count} sync group_sends did not finish in {timeout} s"
        return done

    def kill(self) -> None:
        """Down: a thread has no SIGKILL, so its layer closes and it answers nothing."""
        self.stop()

    def stop(self) -> None:
        for future in self._pending.values():
            future.cancel()
        if self._other.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.layer.close(), self._other.loop).result(15)
        self._other.close()


class Cluster:
    """Agents of one cluster (one ``channel``) on ``driver``; :meth:`close` stops them."""

    def __init__(self, driver: str, options: dict[str, Any], log_dir: Path) -> None:
        self.driver = driver
        self.channel = f"cl-{uuid.uuid4().hex[:10]}"
        self._options = options
        self._log_dir = log_dir
        self._agents: list[Agent | ThreadAgent] = []
        self._siblings: list[Cluster] = []
        self._stack = contextlib.ExitStack()
        if driver == "multiprocessing":
            from tests.drivers.multiprocessing.support import (
                RelayProcess,
                short_socket_dir,
            )

            socket_dir = self._stack.enter_context(short_socket_dir())
            self._options = {**options, "socket_dir": str(socket_dir)}
            self._stack.enter_context(RelayProcess(self.channel, socket_dir, log_dir))

    def config(self, **overrides: Any) -> dict[str, Any]:
        """The CONFIG of this cluster's layers, with ``overrides``."""
        return {"driver": self.driver, "channel": self.channel, **self._options, **overrides}

    def start(self, count: int, *, sync: bool = False, **overrides: Any) -> list[Any]:
        """Start ``count`` agents (CONFIG ``overrides`` for all of them), ready. With
        ``sync``, agents that call the layer through ``async_to_sync`` only (network
        drivers: a process, like a management command)."""
        config = self.config(**overrides)
        batch: list[Agent | ThreadAgent]
        if self.driver == "local":
            batch = [ThreadAgent(config) for _ in range(count)]
        else:
            batch = [Agent(config, sync=sync) for _ in range(count)]
        self._agents.extend(batch)
        return [agent.wait_ready() for agent in batch]

    def sibling(self) -> Cluster:
        """Another cluster (another ``channel``) on the same server, stopped with this one."""
        options = {k: v for k, v in self._options.items() if k != "socket_dir"}
        other = Cluster(self.driver, options, self._log_dir)
        self._siblings.append(other)
        return other

    def close(self) -> None:
        for sibling in self._siblings:
            sibling.close()
        for agent in self._agents:
            agent.stop()
        self._stack.close()
        drop_storage(self.driver, self._options, self.channel)
