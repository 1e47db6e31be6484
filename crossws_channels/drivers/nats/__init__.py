"""The ``nats`` driver: a cluster relayed over NATS, worker channels in JetStream.

``"driver": "nats"`` in CONFIG, with ``url`` (or ``client``); see
``docs/drivers/nats.md``. One module per concern:

* :mod:`.options`: CONFIG keys, and the cluster's subjects and stream names;
* :mod:`.connection`: the driver's NATS client, and its connection state;
* :mod:`.queues`: worker channels, one JetStream work-queue stream each;
* :mod:`.driver`: :class:`NatsDriver`, which puts them together.
"""

from .driver import NatsDriver

__all__ = ["NatsDriver"]
