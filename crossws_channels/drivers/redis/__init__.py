"""The ``redis`` driver: the relay over Redis pub/sub, worker channels in Redis lists.

``"driver": "redis"`` in CONFIG, with ``url`` (or ``client``); see
``docs/drivers/redis.md``. One module per concern:

* :mod:`.options`: CONFIG keys, the cluster's names in Redis (:class:`WireNames`);
* :mod:`.connection`: the connections the driver opens itself, and the bounds on them;
* :mod:`.resp`: what the driver does below redis-py's public API, in one place;
* :mod:`.subscription`: the subscribe connection, its reader and its watchdog;
* :mod:`.queues`: worker channels as Redis lists (Lua);
* :mod:`.driver`: :class:`RedisDriver`, which puts them together.
"""

from .driver import RedisDriver
from .options import RedisOptions, WireNames

__all__ = ["RedisDriver", "RedisOptions", "WireNames"]
