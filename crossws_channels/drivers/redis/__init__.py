"""The ``redis`` driver: the relay over Redis pub/sub, worker channels in Redis lists.

``"driver": "redis"`` in CONFIG, with ``url`` (or ``client``); see
``docs/drivers/redis.md``. One module per concern:

* :mod:`.options`: CONFIG keys, the cluster's names in Redis (:class:`WireNames`);
* :mod:`.connection`: the connections the driver opens itself, and the bounds on them;
* :mod:`.resp`: what the driver does below redis-py's public API, in one place;
* :mod:`.subscription`: the subscribe connection, its reader and its watchdog;
* :mod:`.queues`: worker channels as Redis lists (Lua);
* :mod:`.driver`: :class:`RedisDriver`, which puts them together;
* :mod:`.cluster`: :class:`RedisClusterDriver`, the same on a Redis Cluster.

:data:`redis_driver` is the factory ``"driver": "redis"`` names: it builds the one or
the other, from ``"cluster"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .cluster import RedisClusterDriver
from .driver import RedisDriver
from .options import DRIVER_KEYS, RedisOptions, WireNames

__all__ = ["RedisClusterDriver", "RedisDriver", "RedisOptions", "WireNames", "redis_driver"]


class _Factory:
    """``"driver": "redis"``: a :class:`RedisClusterDriver` with ``"cluster": true``,
    else a :class:`RedisDriver`."""

    OPTIONS: frozenset[str] = DRIVER_KEYS

    def __call__(
        self, instance_id: str, options: Mapping[str, Any]
    ) -> RedisDriver | RedisClusterDriver:
        parsed = RedisOptions.from_mapping(options)
        if parsed.cluster:
            return RedisClusterDriver(instance_id, parsed)
        return RedisDriver(instance_id, options)


redis_driver = _Factory()
