"""The redis driver on a Redis Cluster (``"cluster": true``): sharded pub/sub, and
worker-channel queues on the node that owns each.

A cluster's shard channels (``SSUBSCRIBE``/``SPUBLISH``) live on the node that owns
their hash slot, so the cluster's channels spread over its shards: every instance's
direct channel, every group's topic with ``"routing": "groups"``, and the broadcast
channel (one slot: with broadcast routing, one shard carries every ``group_send``).
The driver keeps

- the cluster's map of slots to primaries (``CLUSTER SLOTS``, read from a node of
  ``url`` or a primary it knows, and again whenever a node fails, a slot moved or a
  reply says ``MOVED``);
- one subscribe connection per primary, which subscribes to the channels of its slots;
- per primary, a connection for publishes and one for queue pushes, and the pops'.

A failover or resharding ends the subscription (a node's connection breaks, or the
node gives a channel up with an ``sunsubscribe`` of its own): the layer subscribes
again, on the map as it is then. A publish or push that a node refused with ``MOVED``
was not carried out, and is sent once more, to the node the map says now.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..base import Deliver, Outgoing, Ready, Topic
from .connection import CommandConnection, ConnectionFactory, ask_once, bounded, pool_from_url
from .options import Connector, RedisOptions, WireNames
from .queues import WorkerQueues
from .resp import bulk, pack
from .subscription import Subscription

__all__ = ["RedisClusterDriver"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SPUBLISH = b"*3\r\n" + bulk(b"SPUBLISH")
SLOTS = 16384


class _Moved(Exception):
    """A node answered MOVED or ASK: the slot is elsewhere, nothing was done."""


def _moved(reply: Any) -> bool:
    if not isinstance(reply, Exception):
        return False
    text = str(reply)
    return type(reply).__name__ in ("MovedError", "AskError") or text.startswith(("MOVED", "ASK"))


@dataclass(frozen=True)
class Shard:
    """One primary: its address, and the settings of connections to it (the pool-like
    pair :class:`ConnectionFactory` copies)."""

    name: str
    connection_class: type
    connection_kwargs: dict[str, Any]


class Topology:
    """Which primary owns which slot: ``CLUSTER SLOTS``, asked of a node of ``url`` (or
    of a primary it named before) over a short connection of its own."""

    def __init__(self, url: str, connector: Connector) -> None:
        template = pool_from_url(url, connector)
        self._class: type = template.connection_class
        self._kwargs = dict(template.connection_kwargs)
        self._seeds = [
            (str(self._kwargs.get("host", "127.0.0.1")), int(self._kwargs.get("port", 6379)))
        ]
        crc = importlib.import_module(f"{connector}.crc")
        self._slot_of: Callable[[bytes], int] = crc.key_slot
        self._slots: list[Shard] = []
        self._shards: dict[str, Shard] = {}
        self._refreshing: asyncio.Task[None] | None = None

    async def ready(self) -> None:
        if not self._slots:
            await self.refresh()

    async def refresh(self) -> None:
        """Read the map again (concurrent callers share one reading)."""
        task = self._refreshing
        if task is None or task.done():
            task = self._refreshing = asyncio.get_running_loop().create_task(self._read())
            # Its error is the awaiting callers', if any are still there to take it.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
        await asyncio.shield(task)

    async def _read(self) -> None:
        errors = []
        known = [
            (s.connection_kwargs["host"], s.connection_kwargs["port"])
            for s in self._shards.values()
        ]
        for host, port in dict.fromkeys([*known, *self._seeds]):
            connection = self._class(**{**self._kwargs, "host": host, "port": port})
            try:
                reply = await ask_once(connection, "CLUSTER", "SLOTS")
            except Exception as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            self._install(reply)
            return
        raise ConnectionError(f"no node of the cluster told its slots: {'; '.join(errors)}")

    def _install(self, reply: Any) -> None:
        slots: list[Shard | None] = [None] * SLOTS
        shards: dict[str, Shard] = {}
        for start, end, primary, *_replicas in reply:
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            port = int(primary[1])
            name = f"{host}:{port}"
            shard = shards.get(name)
            if shard is None:
                shard = shards[name] = self._shards.get(name) or Shard(
                    name, self._class, {**self._kwargs, "host": host, "port": port}
                )
            for slot in range(int(start), int(end) + 1):
                slots[slot] = shard
        missing = slots.count(None)
        if missing:
            raise ConnectionError(f"{missing} slot(s) of the cluster have no primary")
        self._slots = [shard for shard in slots if shard is not None]
        self._shards = shards

    def node_of(self, name: str) -> Shard:
        return self._slots[self._slot_of(name.encode("utf-8"))]

    def primaries(self) -> list[Shard]:
        return list(self._shards.values())

    async def close(self) -> None:
        """Nothing stays open between readings."""


class _Node:
    """The driver's connections to one primary."""

    def __init__(self, node: Any, connector: Any, instance_id: str, names: WireNames) -> None:
        self.name = node.name
        self.connections = ConnectionFactory(node, connector)
        command_name = self.connections.command_name(f"crossws_channels:cmd:{instance_id}")
        self.publisher = CommandConnection(self.connections, command_name)
        self.queues = WorkerQueues(
            CommandConnection(self.connections, command_name), self.connections, names, instance_id
        )

    async def close(self) -> None:
        connections = [self.publisher, *self.queues.release()]
        await asyncio.gather(*(connection.close() for connection in connections))


class RedisClusterDriver:
    """The redis driver for a Redis Cluster; built by :class:`RedisDriver`'s factory
    for ``"cluster": true`` (see the module docstring)."""

    def __init__(self, instance_id: str, options: RedisOptions) -> None:
        assert options.url is not None
        self.options = options
        self.instance_id = instance_id
        # Each worker channel's keys in a slot of its own: queues spread over the nodes.
        self.names = WireNames.for_channel(options.channel, hash_tags=True)
        self._topology = Topology(options.url, options.connector)
        self._nodes: dict[str, _Node] = {}
        self._topics: set[str] = set()  # topic channels listened to
        self._subscriptions: dict[str, Subscription] = {}  # per primary, while listening
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<RedisClusterDriver channel={self.options.channel!r} instance={self.instance_id!r}>"
        )

    def _node(self, node: Any) -> _Node:
        found = self._nodes.get(node.name)
        if found is None:
            found = self._nodes[node.name] = _Node(
                node, self.options.connector, self.instance_id, self.names
            )
        return found

    def _channel(self, target: str | None) -> str:
        if target is None:
            return self.names.broadcast
        if type(target) is Topic:
            return self.names.topic(target)
        return self.names.direct(target)

    # Relay out

    async def publish(self, envelope: str, /) -> None:
        await self.publish_batch([(None, envelope)])

    async def publish_to(self, instance_id: str, envelope: str, /) -> None:
        await self.publish_batch([(instance_id, envelope)])

    async def publish_topic(self, topic: str, envelope: str, /) -> None:
        await self.publish_batch([(Topic(topic), envelope)])

    async def publish_batch(self, batch: Sequence[Outgoing], /) -> None:
        """SPUBLISH each message on the node that owns its channel: one write and one
        round trip per node, in order per node (so per channel)."""
        if self._closed:
            raise RuntimeError("the redis driver is closed")
        topology = self._topology
        await topology.ready()
        pending = [(self._channel(target), envelope.encode("utf-8")) for target, envelope in batch]
        for _attempt in range(2):
            by_node: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
            nodes: dict[str, Any] = {}
            for channel, data in pending:
                node = topology.node_of(channel)
                nodes[node.name] = node
                by_node[node.name].append((channel, data))
            results = await asyncio.gather(
                *(self._spublish(nodes[name], items) for name, items in by_node.items()),
                return_exceptions=True,
            )
            pending = []
            failure: BaseException | None = None
            for result in results:
                if isinstance(result, BaseException):
                    failure = failure or result
                else:
                    pending += result
            if failure is not None:
                await self._after_failure(failure)
                raise failure
            if not pending:
                return
            await topology.refresh()  # MOVED: sent again, once, where the map says now
        raise _Moved(f"{len(pending)} message(s) still refused with MOVED after a refresh")

    async def _spublish(self, node: Any, items: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """Publish ``items`` on ``node``; return those it answered MOVED to."""
        packed = b"".join(_SPUBLISH + bulk(ch.encode("utf-8")) + bulk(data) for ch, data in items)
        replies = await self._node(node).publisher.execute(packed, len(items))
        moved = [item for item, reply in zip(items, replies, strict=True) if _moved(reply)]
        for reply in replies:
            if isinstance(reply, Exception) and not _moved(reply):
                raise reply
        return moved

    async def _after_failure(self, error: BaseException) -> None:
        # A node that broke may be failing over: read the map again for the next call.
        if isinstance(error, (ConnectionError, OSError, TimeoutError)):
            try:
                await self._topology.refresh()
            except Exception as exc:
                logger.debug("reading the cluster's map failed: %s", exc)

    # Relay in

    async def listen(self, deliver: Deliver, ready: Ready, /) -> None:
        """Subscribe on every primary to the channels of its slots, then deliver until
        one of them is lost or the cluster moves a slot (then raise)."""
        if self._closed:
            raise RuntimeError("the redis driver is closed")
        topology = self._topology
        await topology.refresh()
        subscriptions: dict[str, Subscription] = {}
        owners: dict[str, Any] = {}
        base = [self.names.broadcast, self.names.direct(self.instance_id)]

        def channels_of(name: str) -> Callable[[], list[str]]:
            def channels() -> list[str]:
                return [c for c in (*base, *self._topics) if topology.node_of(c).name == name]

            return channels

        for node in topology.primaries():
            owners[node.name] = node
            subscriptions[node.name] = Subscription(
                self._node(node).connections,
                f"crossws_channels:sub:{self.instance_id}",
                channels_of(node.name),
                sharded=True,
            )
        self._subscriptions = subscriptions
        runs: list[asyncio.Task[Any]] = []
        try:
            opened = await asyncio.gather(
                *(s.open(deliver) for s in subscriptions.values()), return_exceptions=True
            )
            for outcome in opened:
                if isinstance(outcome, BaseException):
                    raise outcome
            ready()
            loop = asyncio.get_running_loop()
            runs = [loop.create_task(s.run(deliver)) for s in subscriptions.values()]
            done, _ = await asyncio.wait(runs, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended it
        finally:
            if self._subscriptions is subscriptions:
                self._subscriptions = {}
            for task in runs:
                task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            await asyncio.gather(*(s.close() for s in subscriptions.values()))
            # The next subscription reads the map afresh: whatever ended this one may
            # have moved slots.

    async def listen_to(self, topics: Sequence[str], /) -> None:
        channels = [self.names.topic(topic) for topic in topics]
        self._topics.update(channels)
        await self._on_owners(channels, Subscription.add)

    async def stop_listening(self, topics: Sequence[str], /) -> None:
        channels = [self.names.topic(topic) for topic in topics]
        self._topics.difference_update(channels)
        await self._on_owners(channels, Subscription.remove)

    async def _on_owners(
        self, channels: list[str], operation: Callable[[Subscription, list[str]], Any]
    ) -> None:
        subscriptions = self._subscriptions
        if not subscriptions:
            return  # the next subscription has them
        by_node: dict[str, list[str]] = defaultdict(list)
        for channel in channels:
            by_node[self._topology.node_of(channel).name].append(channel)
        calls = []
        for name, names in by_node.items():
            subscription = subscriptions.get(name)
            if subscription is None:
                # A node the map did not have when subscribing: the map changed, and
                # the subscription is about to end (a moved slot), or is ended.
                continue
            calls.append(operation(subscription, names))
        await asyncio.gather(*calls)

    # Worker channels

    async def _on_queue(self, channel: str, call: Callable[[WorkerQueues], Any]) -> Any:
        topology = self._topology
        await topology.ready()
        key = self.names.queue(channel)
        for attempt in range(2):
            try:
                return await call(self._node(topology.node_of(key)).queues)
            except Exception as exc:
                if _moved(exc) and attempt == 0:
                    await topology.refresh()
                    continue
                await self._after_failure(exc)
                raise
        raise AssertionError("unreachable")

    async def queue_push(self, channel: str, item: str, capacity: int, expires: float, /) -> bool:
        return bool(
            await self._on_queue(channel, lambda q: q.push(channel, item, capacity, expires))
        )

    async def queue_pop(self, channel: str, timeout: float, /) -> str | None:
        popped: str | None = await self._on_queue(channel, lambda q: q.pop(channel, timeout))
        return popped

    async def queue_return(self, channel: str, item: str, /) -> None:
        await self._on_queue(channel, lambda q: q.give_back(channel, item))

    async def flush(self) -> None:
        """Delete this cluster's keys on every primary (SCAN by prefix, UNLINK)."""
        topology = self._topology
        await topology.refresh()
        pattern = self.names.key_pattern.encode("utf-8")
        for node in topology.primaries():
            connection = self._node(node).publisher
            cursor = b"0"
            while True:
                ((cursor, keys),) = await connection.execute(
                    pack(b"SCAN", cursor, b"MATCH", pattern, b"COUNT", b"1000"), 1
                )
                if keys:
                    # One UNLINK per key: keys of different slots can't share one.
                    await connection.execute(b"".join(pack(b"UNLINK", k) for k in keys), len(keys))
                if cursor in (b"0", 0):
                    break
        for connections in self._nodes.values():
            connections.queues.forget()

    # Shutdown

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        subscriptions, self._subscriptions = self._subscriptions, {}
        closing = [s.close() for s in subscriptions.values()]
        closing += [node.close() for node in self._nodes.values()]
        closing.append(self._topology.close())
        try:
            async with bounded(5.0):
                await asyncio.gather(*closing)
        except TimeoutError:
            logger.warning("closing the redis cluster driver's connections timed out")
