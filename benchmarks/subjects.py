"""What is measured: this layer with each driver, its peers, and the raw transports.

A *subject* is a key (``crossws-redis``) with a short label for the tables. Layer subjects
are built inside the benchmark processes by :func:`open_layer`; raw subjects by
:mod:`benchmarks.raw`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from .env import Env

Family = Literal["crossws", "peer", "raw"]
Service = Literal["redis", "pgsql", "multiprocessing", "local", "nats"]

# In the transport measurements every layer gets this capacity, so that no message is
# dropped for a full channel: the numbers measure transports and fan-out, not a
# configured bound. The default-settings cases (A) leave every layer as it comes.
CAPACITY = 1_000_000


@dataclass(frozen=True)
class Subject:
    key: str
    label: str
    family: Family
    service: Service
    note: str


SUBJECTS: dict[str, Subject] = {
    s.key: s
    for s in [
        Subject("crossws-redis", "crossws redis", "crossws", "redis", "this layer, redis driver"),
        Subject("crossws-pgsql", "crossws pgsql", "crossws", "pgsql", "this layer, pgsql driver"),
        Subject(
            "crossws-mp",
            "crossws mp",
            "crossws",
            "multiprocessing",
            "this layer, multiprocessing driver (relay process)",
        ),
        Subject("crossws-local", "crossws local", "crossws", "local", "this layer, local driver"),
        Subject("redis-core", "redis core", "peer", "redis", "channels_redis RedisChannelLayer"),
        Subject(
            "redis-pubsub",
            "redis pubsub",
            "peer",
            "redis",
            "channels_redis RedisPubSubChannelLayer",
        ),
        Subject(
            "channels-postgres",
            "channels-postgres",
            "peer",
            "pgsql",
            "channels_postgres PostgresChannelLayer",
        ),
        Subject("inmemory", "in-memory", "peer", "local", "channels InMemoryChannelLayer"),
        Subject("raw-redis", "raw redis", "raw", "redis", "redis-py PUBLISH, each awaited"),
        Subject(
            "raw-redis-pipe",
            "raw redis pipelined",
            "raw",
            "redis",
            "redis-py PUBLISH, pipelined",
        ),
        Subject("raw-pg", "raw pg", "raw", "pgsql", "psycopg NOTIFY, each awaited"),
        Subject("raw-pg-pipe", "raw pg pipelined", "raw", "pgsql", "psycopg NOTIFY, pipelined"),
        Subject(
            "raw-pg-batch",
            "raw pg batched",
            "raw",
            "pgsql",
            "psycopg, one pg_notify() statement per batch",
        ),
        Subject("crossws-nats", "crossws nats", "crossws", "nats", "this layer, nats driver"),
        Subject("channels-nats", "channels-nats", "peer", "nats", "channels_nats NatsChannelLayer"),
        Subject("raw-nats", "raw nats", "raw", "nats", "nats-py publish, each awaited"),
        Subject("raw-nats-pipe", "raw nats pipelined", "raw", "nats", "nats-py publish, one flush"),
        Subject(
            "crossws-redis-groups",
            "crossws redis groups",
            "crossws",
            "redis",
            'this layer, redis driver, "routing": "groups"',
        ),
        Subject(
            "crossws-nats-groups",
            "crossws nats groups",
            "crossws",
            "nats",
            'this layer, nats driver, "routing": "groups"',
        ),
        Subject(
            "crossws-redis-cluster",
            "crossws redis cluster",
            "crossws",
            "redis",
            'this layer, redis driver on a 3-primary Redis Cluster ("cluster": true)',
        ),
        Subject(
            "crossws-redis-cluster-groups",
            "crossws redis cluster groups",
            "crossws",
            "redis",
            'this layer, redis driver on a 3-primary Redis Cluster, "routing": "groups"',
        ),
        Subject(
            "crossws-redis-signed",
            "crossws redis signed",
            "crossws",
            "redis",
            "this layer, redis driver, signing_keys",
        ),
        Subject(
            "crossws-redis-encrypted",
            "crossws redis encrypted",
            "crossws",
            "redis",
            "this layer, redis driver, encryption_keys",
        ),
    ]
}

# The same driver with and without sealed envelopes (A: what signing costs).
SEALED_REDIS = ("crossws-redis", "crossws-redis-signed", "crossws-redis-encrypted")
# The secret the sealed subjects share (a benchmark's, not a real one).
BENCHMARK_KEY = "benchmark-only-secret-0123456789"


# The same drivers with "routing": "groups" (A, B: what selective delivery costs one
# instance; F: what it saves a cluster).
ROUTED = ("crossws-redis-groups", "crossws-nats-groups")

# The redis driver on a Redis Cluster (F): the run starts a private one unless it is
# given one (--redis-cluster-url).
ON_CLUSTER = ("crossws-redis-cluster", "crossws-redis-cluster-groups")

# The channel layers that relay between processes (A, B), in table order.
CROSS_PROCESS_LAYERS = (
    "crossws-redis",
    "crossws-pgsql",
    "crossws-mp",
    "crossws-nats",
    "redis-pubsub",
    "redis-core",
    "channels-postgres",
    "channels-nats",
)


def short(key: str) -> str:
    """A short code for ``key`` in names (channels-postgres allows 100 bytes per group key)."""
    return f"s{list(SUBJECTS).index(key)}"


DRIVER_SERVICES: dict[str, Service] = {
    "redis": "redis",
    "pgsql": "pgsql",
    "multiprocessing": "multiprocessing",
    "mp": "multiprocessing",
    "local": "local",
    "nats": "nats",
}


def available(key: str, env: Env) -> str | None:
    """Why ``key`` can't run in ``env``; ``None`` if it can."""
    service = SUBJECTS[key].service
    if key in ON_CLUSTER:
        if env.redis_cluster_url is None:
            return "no Redis Cluster"
    elif service == "redis" and env.redis_url is None:
        return "no Redis"
    if service == "pgsql" and env.pg_dsn is None:
        return "no PostgreSQL"
    if key == "channels-postgres" and env.chpg_database is None:
        return "channels-postgres unavailable"
    if service == "multiprocessing" and env.mp_socket_dir is None:
        return "no relay"
    if service == "nats" and env.nats_url is None:
        return "no NATS"
    if key == "channels-nats":
        try:
            import channels_nats  # noqa: F401
        except ImportError:
            return "channels-nats is not installed (pip install channels-nats)"
    return None


def open_layer(key: str, env: Env, scope: str, defaults: bool = False) -> Any:
    """Build the layer of subject ``key``; ``scope`` keeps its names apart from others'.

    ``defaults``: with the layer's own default settings (capacity included), as a user
    who configured nothing gets it; otherwise with :data:`CAPACITY`.
    """
    capacity: dict[str, Any] = {} if defaults else {"capacity": CAPACITY}
    if key.startswith("crossws-"):
        from crossws_channels.layer import BackplaneChannelLayer

        config: dict[str, Any] = {"channel": scope, **capacity}
        if key.endswith("-groups"):
            config.update(routing="groups")
        if key in ON_CLUSTER:
            config.update(driver="redis", url=env.redis_cluster_url, cluster=True)
        elif key.startswith("crossws-redis"):
            config.update(driver="redis", url=env.redis_url)
            if key == "crossws-redis-signed":
                config.update(signing_keys=[BENCHMARK_KEY])
            elif key == "crossws-redis-encrypted":
                config.update(encryption_keys=[BENCHMARK_KEY])
        elif key == "crossws-pgsql":
            config.update(driver="pgsql", dsn=env.pg_dsn)
        elif key.startswith("crossws-nats"):
            config.update(driver="nats", url=env.nats_url)
        elif key == "crossws-mp":
            config.update(
                driver="multiprocessing", channel=env.mp_channel, socket_dir=env.mp_socket_dir
            )
        else:
            config.update(driver="local")
        return BackplaneChannelLayer(**config)
    if key == "redis-core":
        from channels_redis.core import RedisChannelLayer

        return RedisChannelLayer(hosts=[env.redis_url], prefix=scope, **capacity)
    if key == "redis-pubsub":
        from channels_redis.pubsub import RedisPubSubChannelLayer

        return RedisPubSubChannelLayer(hosts=[env.redis_url], prefix=scope)
    if key == "channels-postgres":
        from channels_postgres.core import PostgresChannelLayer

        if env.chpg_database is None:
            raise RuntimeError("channels-postgres has no database in this run")
        return PostgresChannelLayer(prefix=scope, **env.chpg_database)
    if key == "channels-nats":
        from channels_nats import NatsChannelLayer

        return NatsChannelLayer(servers=env.nats_url, prefix=scope, **capacity)
    if key == "inmemory":
        from channels.layers import InMemoryChannelLayer

        return InMemoryChannelLayer(**capacity)
    raise ValueError(f"{key!r} is not a layer subject")


async def start_receivers(
    key: str, layer: Any, loops: list[Coroutine[Any, Any, None]]
) -> list[asyncio.Task[None]]:
    """Start receive loops, one per channel.

    channels-postgres starts its LISTEN connection in the first ``receive()``, and every
    ``receive()`` called before that connection is up starts another one: a hundred
    channels starting at once open a hundred connections and exhaust the server's. Its
    first loop is therefore started alone, and the others once it listens, as they
    would be in a server whose consumers arrive one by one.
    """
    tasks: list[asyncio.Task[None]] = []
    for index, loop in enumerate(loops):
        tasks.append(asyncio.create_task(loop))
        if index == 0 and key == "channels-postgres":
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                listening = getattr(layer, "listener_task_is_running", None)
                if listening is not None and listening.is_set():
                    break
                await asyncio.sleep(0.01)
    return tasks


async def close_layer(key: str, layer: Any) -> None:
    """Release what the layer opened, each the way its documentation says."""
    if key.startswith("crossws-"):
        await layer.close()
    elif key == "redis-core":
        await layer.close_pools()
    elif key == "redis-pubsub":
        await layer.flush()
    elif key == "channels-nats":
        await layer.close()


async def stop_and_close(key: str, layer: Any, tasks: list[asyncio.Task[None]]) -> dict[str, Any]:
    """Cancel a role's receive loops, then close its layer; the layer's stats before."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    stats = layer_stats(key, layer)
    await close_layer(key, layer)
    return stats


def layer_stats(key: str, layer: Any) -> dict[str, Any]:
    """This layer's own counters (drops it reported), where it has them."""
    if key.startswith("crossws-"):
        stats: dict[str, Any] = layer.stats()
        return stats
    return {}


def reported_losses(stats: dict[str, Any]) -> int:
    """Messages a crossws instance says it dropped or saw go missing."""
    return sum(
        int(value) for name, value in stats.items() if name.startswith("dropped.") or name == "lost"
    )
