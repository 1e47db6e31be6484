"""The redis driver's worker-channel queues: one Redis list per worker channel.

A push runs a Lua script that, atomically, refuses when ``capacity`` unexpired messages
wait, appends, and keeps the list's TTL at least as long as the newest message's
deadline (so a queue nobody reads disappears by itself). Items are stored as
``<deadline in ms, server clock>:<item>``: deadlines come from one clock, the server's,
whatever the clocks of the hosts that push.

Everything goes over connections of the driver's own, with pre-packed commands
(:class:`CommandConnection`): pushes and returns over one, and pops (``BLPOP``) over one
per pop in progress, so a waiting receiver never holds up a publish or a push, and
several worker channels can be popped at once.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import time
from collections import OrderedDict
from typing import Any

from .connection import CommandConnection, ConnectionFactory
from .options import WireNames
from .resp import pack

__all__ = ["POP_SLICE", "WorkerQueues"]

# A long pop is a series of BLPOPs of at most this long, so a dead connection is
# noticed within it plus the socket timeout, and any timeout (even ``inf``) is served.
POP_SLICE = 5.0

# How many popped items remember their deadline, for an eventual ``queue_return``.
_RETURN_MEMORY = 1024

# How many worker channels remember their key, packed for commands.
_KEY_MEMORY = 1024

_PUSH_SCRIPT = """
-- KEYS[1]: the queue; ARGV: item, capacity, time to live in ms.
-- Stored items are "<deadline ms, server clock>:<item>". Only live items count against
-- the capacity: when the list looks full, expired items at its head are dropped first
-- (below the capacity there is nothing to gain from looking).
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local capacity = tonumber(ARGV[2])
if redis.call('LLEN', KEYS[1]) >= capacity then
  local head = redis.call('LINDEX', KEYS[1], 0)
  while head do
    local deadline = tonumber(string.match(head, '^(%d+):'))
    if deadline == nil or deadline > now then break end
    redis.call('LPOP', KEYS[1])
    head = redis.call('LINDEX', KEYS[1], 0)
  end
  if redis.call('LLEN', KEYS[1]) >= capacity then
    return 0
  end
end
local ttl = tonumber(ARGV[3])
local length = redis.call('RPUSH', KEYS[1], string.format('%d:', now + ttl) .. ARGV[1])
-- A new list has no TTL; an older one keeps its TTL if that outlasts this item.
if length == 1 or redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""

_RETURN_SCRIPT = """
-- KEYS[1]: the queue; ARGV: the stored item ("<deadline>:<item>"), fallback ttl in ms.
-- The item goes back at the head; the key lives at least until the item's deadline.
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('LPUSH', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[2])
local deadline = tonumber(string.match(ARGV[1], '^(%d+):'))
if deadline ~= nil then
  ttl = math.max(deadline - now, 1)
end
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""

# A returned item whose deadline is unknown keeps its queue alive at least this long:
# Channels' default ``expiry``.
_RETURN_FALLBACK_TTL_MS = 60_000


class _Script:
    """A Lua script run by ``EVALSHA``, and by ``EVAL`` when the server lacks it (after a
    restart or ``SCRIPT FLUSH``), which also loads it again."""

    def __init__(self, source: str) -> None:
        self.source = source.encode("utf-8")
        self.sha = hashlib.sha1(self.source, usedforsecurity=False).hexdigest().encode("ascii")

    async def run(
        self, connection: CommandConnection, no_script: type[Exception], *words: bytes
    ) -> Any:
        (reply,) = await connection.execute(pack(b"EVALSHA", self.sha, b"1", *words), 1)
        if isinstance(reply, no_script):
            # NOSCRIPT: nothing ran, so running it now can't do it twice.
            (reply,) = await connection.execute(pack(b"EVAL", self.source, b"1", *words), 1)
        if isinstance(reply, Exception):
            raise reply
        return reply


_PUSH = _Script(_PUSH_SCRIPT)
_RETURN = _Script(_RETURN_SCRIPT)


class WorkerQueues:
    """The queue operations of one driver, and the connections they use."""

    def __init__(
        self,
        pusher: CommandConnection,
        connections: ConnectionFactory,
        names: WireNames,
        instance_id: str,
    ) -> None:
        self._pusher = pusher
        self._connections = connections
        self._names = names
        self._pop_name = f"crossws_channels:pop:{instance_id}"
        self._idle: list[CommandConnection] = []
        self._busy: set[CommandConnection] = set()
        self._released = False
        # Each worker channel's key, encoded for commands once per channel.
        self._key = functools.lru_cache(maxsize=_KEY_MEMORY)(self._new_key)
        self._deadlines: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()

    def _new_key(self, channel: str) -> bytes:
        return self._names.queue(channel).encode("utf-8")

    async def push(self, channel: str, item: str, capacity: int, expires: float) -> bool:
        # A time to live rather than the deadline itself: the script adds it to the
        # server's clock, so hosts with skewed clocks still agree.
        ttl = max(1, min(math.ceil((expires - time.time()) * 1000), 2**47))
        pushed = await _PUSH.run(
            self._pusher,
            self._connections.no_script_error,
            self._key(channel),
            item.encode("utf-8"),
            b"%d" % capacity,
            b"%d" % ttl,
        )
        return int(pushed) == 1

    async def pop(self, channel: str, timeout: float) -> str | None:
        key = self._key(channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                stored = await self._command(pack(b"LPOP", key), 0.0)
            else:
                # BLPOP 0 would block forever: never send less than a millisecond.
                wait = max(min(remaining, POP_SLICE), 0.001)
                reply = await self._command(pack(b"BLPOP", key, b"%.3f" % wait), wait)
                stored = reply[1] if reply is not None else None
            if stored is not None:
                return self._unwrap(channel, bytes(stored))
            if remaining <= 0 or deadline - loop.time() <= 0:
                return None

    async def give_back(self, channel: str, item: str) -> None:
        raw = item.encode("utf-8")
        deadline = self._deadlines.pop((channel, raw), b"")
        await _RETURN.run(
            self._pusher,
            self._connections.no_script_error,
            self._key(channel),
            deadline + b":" + raw,
            b"%d" % _RETURN_FALLBACK_TTL_MS,
        )

    def forget(self) -> None:
        """Drop remembered deadlines (after a flush deleted the queues)."""
        self._deadlines.clear()

    def connections(self) -> list[CommandConnection]:
        """Every connection the queues use now (to reset them: the master moved)."""
        return [self._pusher, *self._idle, *self._busy]

    def release(self) -> list[CommandConnection]:
        """Hand over every connection, for the driver to close; open no more."""
        self._released = True
        connections = [self._pusher, *self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        return connections

    def _unwrap(self, channel: str, stored: bytes) -> str:
        deadline, _, raw = stored.partition(b":")
        self._deadlines[(channel, raw)] = deadline
        if len(self._deadlines) > _RETURN_MEMORY:
            self._deadlines.popitem(last=False)
        return raw.decode("utf-8")

    async def _command(self, packed: bytes, wait: float) -> Any:
        """Run one pop command on an idle pop connection (or a new one)."""
        if self._released:
            raise RuntimeError("the redis driver is closed")
        connection = (
            self._idle.pop() if self._idle else CommandConnection(self._connections, self._pop_name)
        )
        self._busy.add(connection)
        try:
            (reply,) = await connection.execute(packed, 1, wait=wait)
        finally:
            self._busy.discard(connection)
            if self._released:
                await connection.close()
            else:
                self._idle.append(connection)
        if isinstance(reply, Exception):
            raise reply
        return reply
