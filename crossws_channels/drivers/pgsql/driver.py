"""The ``pgsql`` driver: a cluster relayed over PostgreSQL LISTEN/NOTIFY.

Group broadcasts are NOTIFYed on the channel named ``channel`` itself, so a crossws server
using ``pgsql({channel})`` on the same database shares the cluster. Messages for one
instance go to a channel derived from ``channel`` and that instance's id. Envelopes too
large for a NOTIFY payload (8000 bytes) are written to a table and the NOTIFY carries a
reference to the row. Worker channels are a table read with ``FOR UPDATE SKIP LOCKED``,
with a NOTIFY to wake waiting receivers.

Every statement runs on the driver's own autocommit connections, never on Django's: inside
an application transaction a NOTIFY is held back until the transaction commits (and is
discarded on rollback), and at commit it takes a cluster-wide lock on the notification
queue that would be held for the rest of that transaction's commit. The relay is best
effort and must not wait for, or roll back with, a request's transaction.

See ``docs/drivers/pgsql.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from crossws_channels.errors import ConfigurationError

from ..base import Deliver, Outgoing, Ready
from .link import Link
from .options import Names, PgsqlOptions
from .queues import Queues
from .relay import Relay
from .session import Opener
from .sql import Statements
from .tables import Tables

__all__ = ["PgsqlDriver"]


class PgsqlDriver:
    """Relays a cluster's envelopes over PostgreSQL LISTEN/NOTIFY.

    ``options`` (from CONFIG): ``channel``; ``dsn``, or ``client`` (a
    ``psycopg.AsyncConnection``, an asyncpg connection, or the dotted path of a function,
    sync or async, returning one); optionally ``connector`` (``"psycopg"`` or
    ``"asyncpg"``), ``application_name``, ``large_message_ttl``, ``ping_interval``,
    ``schema`` and ``statement_timeout``.
    """

    # Worker-queue capacities travel as a PostgreSQL integer.
    MAX_CAPACITY = 2**31 - 1

    def __init__(self, instance_id: str, options: Mapping[str, Any]) -> None:
        self.options = PgsqlOptions.from_mapping(options)
        if not isinstance(instance_id, str) or not instance_id:
            raise ConfigurationError("the instance id must be a non-empty string")
        self.instance_id = instance_id
        self.names = Names.for_instance(self.options.channel, instance_id, self.options.schema)
        sql = Statements.for_names(self.names)
        opener = Opener(self.options)
        tables = Tables(sql)
        # Publishing and large-message reads on one connection, worker queues on another,
        # so a burst of queue traffic never delays the relay.
        limit = self.options.statement_timeout
        self._out = Link(opener, limit)
        self._work = Link(opener, limit)
        self._queues = Queues(self._work, tables, sql, self.names)
        self._relay = Relay(self.options, self.names, sql, opener, self._out, tables, self._queues)
        self._closed = False

    def __repr__(self) -> str:
        return f"<PgsqlDriver channel={self.options.channel!r} instance={self.instance_id!r}>"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this pgsql driver is closed")

    # Relay

    async def publish(self, envelope: str, /) -> None:
        """NOTIFY ``envelope`` to every instance of the cluster."""
        self._check_open()
        await self._relay.publish_one(None, envelope)

    async def publish_to(self, instance_id: str, envelope: str, /) -> None:
        """NOTIFY ``envelope`` to the instance ``instance_id`` only."""
        self._check_open()
        await self._relay.publish_one(instance_id, envelope)

    async def publish_batch(self, batch: Sequence[Outgoing], /) -> None:
        """Relay ``batch`` in order, as few statements as the payloads allow."""
        self._check_open()
        await self._relay.publish_batch(batch)

    async def listen(self, deliver: Deliver, ready: Ready, /) -> None:
        """LISTEN for the cluster's broadcasts, this instance's direct messages and the
        queue wake-ups, and deliver until the listening session breaks (then raise)."""
        self._check_open()
        try:
            await self._relay.listen(deliver, ready)
        except Exception:
            # The server may be gone for every connection, not just this one.
            self._out.invalidate()
            self._work.invalidate()
            raise

    # Worker queues

    async def queue_push(self, channel: str, item: str, capacity: int, expires: float, /) -> bool:
        """Append ``item`` unless ``capacity`` unexpired items already wait on ``channel``."""
        self._check_open()
        return await self._queues.push(channel, item, capacity, expires)

    async def queue_pop(self, channel: str, timeout: float, /) -> str | None:
        """Take the oldest item of ``channel``, waiting up to ``timeout`` seconds for one."""
        self._check_open()
        return await self._queues.pop(channel, timeout)

    async def queue_return(self, channel: str, item: str, /) -> None:
        """Put ``item`` back at the head of ``channel``."""
        self._check_open()
        await self._queues.give_back(channel, item)

    async def flush(self) -> None:
        """Delete this cluster's waiting worker messages and large messages."""
        self._check_open()
        await self._queues.flush()

    # Lifecycle

    async def close(self) -> None:
        """Close every connection the driver opened (a client the user passed in stays
        open, its LISTENs undone when the listener stopped)."""
        if self._closed:
            return
        self._closed = True
        await self._relay.close()
        # In-flight pops, and the give-backs they may start, finish before the connections
        # they use are closed.
        await self._queues.close()
        await self._out.close()
        await self._work.close()
