"""The driver interface: everything the layer asks of a backplane, and nothing more.

A driver moves envelope text between the instances of one cluster. The layer does the
rest: it encodes and decodes envelopes, suppresses its own echo, validates what arrives,
keeps channels and groups, keeps the subscription up (one supervisor, one backoff, for
every driver), and reports errors. A driver is made by a factory
``factory(instance_id, options)``; a class whose ``__init__`` takes those two arguments is
itself a factory.

Three methods are required (:class:`Driver`). The optional capabilities are small
protocols of their own; the layer looks for them once per driver class
(:func:`capabilities`) and falls back to something slower but correct when one is
missing. Every attribute the layer reads from a driver or a factory is declared here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

from ..errors import Stage

__all__ = [
    "Capabilities",
    "DeclaresBuffering",
    "DeclaresEcho",
    "DeclaresLimits",
    "DeclaresOptions",
    "Deliver",
    "Driver",
    "DriverFactory",
    "Outgoing",
    "Ready",
    "SubscribingDriver",
    "SupportsBatch",
    "SupportsDirect",
    "SupportsFlush",
    "SupportsTopics",
    "SupportsWorkerQueue",
    "Topic",
    "capabilities",
]


class Topic(str):
    """A target that is a topic (``"routing": "groups"``), not an instance.

    The layer names topics ``g.<group>`` (one per group) or ``p.<number>`` (one per
    partition of groups, with ``routing_partitions``); a driver maps them to its own
    wire names. Only a driver with :class:`SupportsTopics` is ever given one.
    """

    __slots__ = ()


Outgoing: TypeAlias = tuple["str | None", str]
"""One message to relay: its target and the envelope text. The target is ``None`` for
every instance, an instance id for one instance, or a :class:`Topic` (a ``str``
subclass: test ``type(target) is Topic``) for the instances listening to that topic."""

Ready: TypeAlias = Callable[[], None]
"""What :meth:`Driver.listen` calls once its subscription is in place."""


class Deliver(Protocol):
    """What :meth:`Driver.listen` receives: the way back into the layer.

    Call it with every message that arrives, as text or UTF-8 bytes, exactly as it came
    off the wire: the layer decodes it, drops what is malformed (and reports it), and
    ignores this instance's own echo. It is synchronous and never raises, and must be
    called on the event loop ``listen`` was called on.

    It returns ``None``, or an ``asyncio.Future`` when a channel the message was for is
    full while its consumer is reading: *backpressure*. A driver that honours it delivers
    nothing more until the future is done (``await`` it, or resume reading from its
    done callback) and leaves the rest to its transport: the socket, the server's
    buffers. The future is done within the layer's ``backpressure`` setting, at most.
    A driver that ignores it keeps working; the layer then drops messages for full
    channels instead, as it does with backpressure off.
    """

    def __call__(self, raw: str | bytes, /) -> asyncio.Future[None] | None: ...

    def report(self, error: Exception, stage: Stage, /) -> None:
        """Report a failure the driver handled itself (it is not an outage)."""

    def connection_lost(self, error: Exception, /) -> None:
        """The subscription broke. The layer calls it for a :class:`Driver`; a
        :class:`SubscribingDriver`, which reconnects by itself, calls it."""

    def connection_made(self) -> None:
        """The subscription is in place (again). Called like :meth:`connection_lost`."""


class Driver(Protocol):
    """A backplane connecting the instances of one cluster (one ``channel`` value)."""

    async def publish(self, envelope: str, /) -> None:
        """Relay ``envelope`` to every instance of the cluster, this one included if the
        backplane echoes (the layer drops its own echo). Raise if it could not be sent;
        the layer reports it with stage ``publish``."""

    async def listen(self, deliver: Deliver, ready: Ready, /) -> None:
        """Subscribe, call ``ready()`` once the subscription is in place, then hand
        every message to ``deliver`` until the subscription is lost: then raise (or
        return). Don't reconnect: the layer calls ``listen`` again, after a backoff, for
        as long as it runs, and reports each outage once. It cancels ``listen`` to stop
        (or to renew a subscription that went deaf); release the subscription then."""

    async def close(self) -> None:
        """Stop and release what the driver opened, but not a client the user passed in."""


class SubscribingDriver(Protocol):
    """The earlier form of :class:`Driver`, still accepted: ``subscribe`` instead of
    ``listen``.

    ``subscribe(deliver)`` returns once listening and then keeps the subscription alive
    by itself (reconnecting, resubscribing), telling the layer with
    ``deliver.connection_lost(error)`` and ``deliver.connection_made()``. If it raises, the
    layer calls it again later, with backoff.
    """

    async def publish(self, envelope: str, /) -> None: ...

    async def subscribe(self, deliver: Deliver, /) -> None: ...

    async def close(self) -> None: ...


class DriverFactory(Protocol):
    """Builds the driver of one layer instance.

    ``options`` holds ``channel`` and every CONFIG key the layer does not use itself;
    reject unknown ones with :class:`~crossws_channels.errors.ConfigurationError` (or
    declare them, :class:`DeclaresOptions`). Opening connections belongs in
    ``listen``/``publish``, not here: the factory runs when Django builds the layer,
    outside any event loop.
    """

    def __call__(
        self, instance_id: str, options: Mapping[str, Any], /
    ) -> Driver | SubscribingDriver: ...


@runtime_checkable
class DeclaresOptions(Protocol):
    """A factory that names the CONFIG keys its drivers take (besides ``channel``): the
    layer then rejects any other key, naming the setting and the known ones."""

    OPTIONS: frozenset[str]


@runtime_checkable
class DeclaresLimits(Protocol):
    """A factory whose drivers store capacities in a bounded type (a PostgreSQL
    ``integer``): the layer refuses a larger ``capacity`` or ``channel_capacity`` at
    start-up, naming the setting, instead of every push failing later."""

    MAX_CAPACITY: int


@runtime_checkable
class DeclaresEcho(Protocol):
    """A driver that says whether a ``publish`` comes back to the publishing instance's
    own subscription. Without it the layer assumes it does (most pub/sub servers echo).
    With ``echoes = False`` the layer's heartbeat travels by ``publish_to`` instead."""

    echoes: bool


@runtime_checkable
class DeclaresBuffering(Protocol):
    """A driver that says whether its publishing methods only buffer what they send (in
    a client library's write buffer, which the library writes out soon after) and never
    wait for the server. With ``buffers = True`` the layer publishes a message from the
    sending task itself when nothing else is waiting to be relayed, instead of handing it
    to its relaying task: one turn of the event loop less on every hop."""

    buffers: bool


@runtime_checkable
class SupportsPublishNow(Protocol):
    """A buffering driver (``buffers = True``) whose publishing can also be done without
    a coroutine: the layer tries it first when it would publish from the sending task.
    A ``group_send`` then costs no coroutine below the layer's own."""

    def publish_now(self, target: str | Topic | None, envelope: str, /) -> bool:
        """What ``publish`` (``target`` None), ``publish_to`` (an instance id) or
        ``publish_topic`` (a :class:`Topic`) would do, done synchronously; False, doing
        nothing, when it can't be done that way now (then the layer awaits the method).
        Never raises; called on the event loop ``listen`` runs on."""


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
class SupportsQueueTake(Protocol):
    """A worker queue whose driver takes several items at a time (a batch the server
    handed over together) and can give one at hand without waiting.

    ``receive`` on a worker channel then asks for an item itself before it waits for the
    layer's fetching task: for a consumer that keeps up, most messages are taken
    synchronously, without waking a task.
    """

    def queue_take(self, channel: str, /) -> str | None:
        """An item of ``channel`` this instance has already taken from the queue (it is
        this instance's alone now), or ``None``. Synchronous, never raises, called on
        the event loop ``listen`` runs on; what it returns counts as popped."""


@runtime_checkable
class SupportsTopics(Protocol):
    """Selective delivery: what is published on a topic reaches only the instances
    listening to it (``"routing": "groups"``).

    The driver keeps the set of topics this instance listens to. ``listen`` subscribes
    to all of them (besides what it always subscribes to) before it calls ``ready()``,
    every time it is called, so that a new subscription after an outage hears the same
    topics. The three methods are called on the event loop ``listen`` runs on.
    """

    async def publish_topic(self, topic: str, envelope: str, /) -> None:
        """Relay ``envelope`` to the instances listening to ``topic``."""

    async def listen_to(self, topics: Sequence[str], /) -> None:
        """Add ``topics`` to the set; return once the backplane confirmed them on the
        live subscription (at once when there is none: ``listen`` will subscribe).
        Raise if it could not; the set keeps them either way."""

    async def stop_listening(self, topics: Sequence[str], /) -> None:
        """Remove ``topics`` from the set and from the live subscription, if any. What
        was in flight on them may still arrive."""


@runtime_checkable
class SupportsFlush(Protocol):
    """Delete what the cluster keeps in the backplane (worker queues), for ``flush()``."""

    async def flush(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a driver class offers, as the layer sees it."""

    listens: bool
    """It has ``listen`` (a :class:`Driver`); otherwise ``subscribe``."""
    echoes: bool
    direct: bool
    batch: bool
    worker_queue: bool
    flush: bool
    topics: bool = False
    buffers: bool = False
    take: bool = False
    publish_now: bool = False


_known: dict[type, Capabilities] = {}


def capabilities(driver: object) -> Capabilities:
    """The capabilities of ``driver``'s class, looked up once per class: a runtime
    protocol check costs microseconds, and the layer asks on every message it sends."""
    kind = type(driver)
    found = _known.get(kind)
    if found is None:
        found = _known[kind] = Capabilities(
            listens=callable(getattr(driver, "listen", None)),
            echoes=driver.echoes if isinstance(driver, DeclaresEcho) else True,
            direct=isinstance(driver, SupportsDirect),
            batch=isinstance(driver, SupportsBatch),
            worker_queue=isinstance(driver, SupportsWorkerQueue),
            flush=isinstance(driver, SupportsFlush),
            topics=isinstance(driver, SupportsTopics),
            buffers=isinstance(driver, DeclaresBuffering) and driver.buffers is True,
            take=isinstance(driver, SupportsQueueTake),
            publish_now=isinstance(driver, SupportsPublishNow)
            and isinstance(driver, DeclaresBuffering)
            and driver.buffers is True,
        )
    return found
