"""The ``multiprocessing`` driver: the server processes of one host, relayed, no broker.

``"driver": "multiprocessing"`` in CONFIG; see ``docs/drivers/multiprocessing.md``. One
module per concern:

* :mod:`.options`: CONFIG keys; :mod:`.paths`: the relay's private socket directory;
* :mod:`.wire`: the frames between a process and its relay;
* :mod:`.connection`: a process's connection to the relay;
* :mod:`.driver`: :class:`MultiprocessingDriver`;
* :mod:`.relay`: the relay itself (``python -m crossws_channels.relay``);
* :mod:`.primary`: :func:`setup_primary`, starting the relay from the process that
  forks the servers.
"""

from .driver import MultiprocessingDriver
from .options import MultiprocessingOptions
from .primary import setup_primary

__all__ = ["MultiprocessingDriver", "MultiprocessingOptions", "setup_primary"]
