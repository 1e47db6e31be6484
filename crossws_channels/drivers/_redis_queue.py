"""The redis driver's worker-channel queues: one Redis list per worker channel.

A push runs a Lua script that, atomically, drops expired messages from the head,
refuses when ``capacity`` messages still wait, appends, and stretches the list's TTL to
the newest message's deadline (so a queue nobody reads disappears by itself). Items are
stored as ``<deadline in ms, server clock>:<item>``: deadlines come from one clock, the
server's, whatever the clocks of the hosts that push. Pops use ``BLPOP`` on connections
of the driver's own, one per pop in progress, so a waiting receiver never holds up a
publish and several worker channels can be popped at once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from typing import Any

from ._redis_config import WireNames
from ._redis_conn import Client, Connection, ConnectionFactory, Script, disconnect_quietly

__all__ = ["POP_SLICE", "WorkerQueues"]

# A long pop is a series of BLPOPs of at most this long, so a dead connection is
# noticed within it plus the socket timeout, and any timeout (even ``inf``) is served.
POP_SLICE = 5.0

# How many popped items remember their deadline, for an eventual ``queue_return``.
_RETURN_MEMORY = 1024

_PUSH_SCRIPT = """
-- KEYS[1]: the queue; ARGV: item, capacity, time to live in ms.
-- Stored items are "<deadline ms, server clock>:<item>". Expired items at the head are
-- dropped first, so messages no one will read do not count against the capacity.
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local head = redis.call('LINDEX', KEYS[1], 0)
while head do
  local deadline = tonumber(string.match(head, '^(%d+):'))
  if deadline == nil or deadline > now then break end
  redis.call('LPOP', KEYS[1])
  head = redis.call('LINDEX', KEYS[1], 0)
end
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
local ttl = tonumber(ARGV[3])
redis.call('RPUSH', KEYS[1], string.format('%d:', now + ttl) .. ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
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


class WorkerQueues:
    """The queue operations of one driver, and the pop connections they use."""

    def __init__(
        self, client: Client, connections: ConnectionFactory, names: WireNames, instance_id: str
    ) -> None:
        self._client = client
        self._connections = connections
        self._names = names
        self._pop_name = f"crossws_channels:pop:{instance_id}"
        self._idle: list[Connection] = []
        self._busy: set[Connection] = set()
        self._released = False
        self._push_script: Script | None = None
        self._return_script: Script | None = None
        self._deadlines: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()

    async def push(self, channel: str, item: str, capacity: int, expires: float) -> bool:
        if self._push_script is None:
            self._push_script = self._client.register_script(_PUSH_SCRIPT)
        # A time to live rather than the deadline itself: the script adds it to the
        # server's clock, so hosts with skewed clocks still agree.
        ttl = max(1, min(math.ceil((expires - time.time()) * 1000), 2**47))
        pushed = await self._push_script(
            keys=[self._names.queue(channel)], args=[item.encode("utf-8"), capacity, ttl]
        )
        return int(pushed) == 1

    async def pop(self, channel: str, timeout: float) -> str | None:
        key = self._names.queue(channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                stored = await self._command("LPOP", key)
            else:
                # BLPOP 0 would block forever: never send less than a millisecond.
                wait = max(min(remaining, POP_SLICE), 0.001)
                reply = await self._command("BLPOP", key, f"{wait:.3f}")
                stored = reply[1] if reply is not None else None
            if stored is not None:
                return self._unwrap(channel, bytes(stored))
            if remaining <= 0 or deadline - loop.time() <= 0:
                return None

    async def give_back(self, channel: str, item: str) -> None:
        if self._return_script is None:
            self._return_script = self._client.register_script(_RETURN_SCRIPT)
        raw = item.encode("utf-8")
        deadline = self._deadlines.pop((channel, raw), b"")
        await self._return_script(
            keys=[self._names.queue(channel)],
            args=[deadline + b":" + raw, _RETURN_FALLBACK_TTL_MS],
        )

    def forget(self) -> None:
        """Drop remembered deadlines (after a flush deleted the queues)."""
        self._deadlines.clear()

    def release(self) -> list[Connection]:
        """Hand over every pop connection, for the driver to close; open no more."""
        self._released = True
        connections = [*self._idle, *self._busy]
        self._idle.clear()
        self._busy.clear()
        return connections

    def _unwrap(self, channel: str, stored: bytes) -> str:
        deadline, _, raw = stored.partition(b":")
        self._deadlines[(channel, raw)] = deadline
        if len(self._deadlines) > _RETURN_MEMORY:
            self._deadlines.popitem(last=False)
        return raw.decode("utf-8")

    async def _command(self, *args: Any) -> Any:
        connection = (
            self._idle.pop()
            if self._idle
            else self._connections(
                self._pop_name, socket_timeout=POP_SLICE + self._connections.socket_timeout
            )
        )
        self._busy.add(connection)
        try:
            if connection.is_connected:
                try:
                    # An idle connection the server closed (a restart) reads as EOF;
                    # find out before sending rather than lose a popped item to it.
                    stale = await connection.can_read_destructive()
                except Exception:
                    stale = True
                if stale:
                    await disconnect_quietly(connection, nowait=True)
            await connection.connect()
            await connection.send_command(*args)
            reply = await connection.read_response()
        except BaseException:
            self._busy.discard(connection)
            await disconnect_quietly(connection, nowait=True)
            raise
        self._busy.discard(connection)
        if self._released:
            await disconnect_quietly(connection)
        else:
            self._idle.append(connection)
        return reply
