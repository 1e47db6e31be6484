"""The driver interface: what a backplane must provide to the layer.

A driver moves envelope text between the instances of one cluster. The layer does the
rest: it encodes and decodes envelopes, suppresses its own echo, validates what arrives,
keeps channels and groups, and reports errors. A driver is made by a factory
``factory(instance_id, options)``; a class whose ``__init__`` takes those two arguments is
itself a factory.

The three required methods mirror crossws's ``SyncDriver``. The optional capabilities are
small protocols of their own; the layer checks for them once, when it builds the driver,
and falls back to something slower but correct when one is missing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeAlias, runtime_checkable

from ..errors import Stage

__all__ = [
    "Deliver",
    "Driver",
    "DriverFactory",
    "Outgoing",
    "SupportsBatch",
    "SupportsDirect",
    "SupportsFlush",
    "SupportsWorkerQueue",
]

Outgoing: TypeAlias = tuple["str | None", str]
"""One message to relay: the target instance id (``None`` for every instance) and the
envelope text."""


class Deliver(Protocol):
    """What :meth:`Driver.subscribe` receives: the way back into the layer.

    Call it with every message that arrives, as text or UTF-8 bytes, exactly as it came
    off the wire: the layer decodes it, drops what is malformed (and reports it), and
    ignores this instance's own echo. It is synchronous and never raises, and must be
    called on the event loop ``subscribe`` was called on.

    It returns ``None``, or an ``asyncio.Future`` when a channel the message was for is
    full while its consumer is reading: *backpressure*. A driver that honours it delivers
    nothing more until the future is done (``await`` it, or resume reading from its
    done callback) and leaves the rest to its transport: the socket, the server's
    buffers. The future is done within the layer's ``backpressure`` setting, at most.
    A driver that ignores it keeps working; the layer then drops messages for full
    channels instead, as it does with backpressure off.

    The methods let a driver that keeps its subscription alive by itself tell the layer
    what happened. The layer reports each outage once, not once per failed attempt.
    """

    def __call__(self, raw: str | bytes, /) -> asyncio.Future[None] | None: ...

    def report(self, error: Exception, stage: Stage, /) -> None:
        """Report a failure the driver handled itself (it is not an outage)."""

    def connection_lost(self, error: Exception, /) -> None:
        """The subscription broke; the driver is reconnecting."""

    def connection_made(self) -> None:
        """The subscription is in place again after :meth:`connection_lost`."""


class Driver(Protocol):
    """A backplane connecting the instances of one cluster (one ``channel`` value).

    A driver whose ``publish`` does not come back to the publishing instance's own
    subscription (most pub/sub servers do echo) sets a class attribute
    ``echoes = False``: the layer's heartbeat then travels by ``publish_to`` instead.
    """

    async def publish(self, envelope: str, /) -> None:
        """Relay ``envelope`` to every instance of the cluster, this one included if the
        backplane echoes (the layer drops its own echo). Raise if it could not be sent;
        the layer reports it with stage ``publish``."""

    async def subscribe(self, deliver: Deliver, /) -> None:
        """Start listening and return once the subscription is in place.

        Raise if it can't be established; the layer reports it and calls ``subscribe``
        again later, with backoff. Once it has returned, keeping the subscription alive
        (reconnecting, resubscribing) is the driver's job.
        """

    async def close(self) -> None:
        """Stop listening and release what the driver opened, but not a client the user
        passed in."""


class DriverFactory(Protocol):
    """Builds the driver of one layer instance.

    ``options`` holds ``channel`` and every CONFIG key the layer does not use itself;
    reject unknown ones with :class:`~crossws_channels.errors.ConfigurationError`.
    Opening connections belongs in ``subscribe``/``publish``, not here: the factory runs
    when Django builds the layer, outside any event loop.
    """

    def __call__(self, instance_id: str, options: Mapping[str, Any], /) -> Driver: ...


@runtime_checkable
class SupportsDirect(Protocol):
    """Send to one instance only (a ``send`` to a channel another instance owns).

    Without it the layer publishes such messages to every instance, and all but the
    owner ignore them.
    """

    async def publish_to(self, instance_id: str, envelope: str, /) -> None: ...


@runtime_checkable
class SupportsBatch(Protocol):
    """Relay several messages in one go (a pipeline, one network write).

    The layer hands over everything that queued up while the previous batch was being
    written, in order. Without it, it calls ``publish``/``publish_to`` one by one.
    """

    async def publish_batch(self, batch: Sequence[Outgoing], /) -> None: ...


@runtime_checkable
class SupportsWorkerQueue(Protocol):
    """A queue shared by the whole cluster, for worker channels (names without ``!``).

    Each item must be received exactly once across the cluster. Without this capability
    a worker channel is local to each instance.
    """

    async def queue_push(self, channel: str, item: str, capacity: int, expires: float, /) -> bool:
        """Append ``item``; return False, adding nothing, if ``capacity`` items are
        already waiting. ``expires`` (a ``time.time()`` deadline) lets the driver purge
        items no one will read."""

    async def queue_pop(self, channel: str, timeout: float, /) -> str | None:
        """Remove and return the oldest item, waiting up to ``timeout`` seconds for one;
        ``None`` if none came. The layer never cancels a call in progress except when it
        closes."""

    async def queue_return(self, channel: str, item: str, /) -> None:
        """Put back an item a receiver gave up on, at the head of the queue."""


@runtime_checkable
class SupportsFlush(Protocol):
    """Delete what the cluster keeps in the backplane (worker queues), for ``flush()``."""

    async def flush(self) -> None: ...
