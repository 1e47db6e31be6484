"""The ``pgsql`` driver: a cluster relayed over PostgreSQL LISTEN/NOTIFY.

``"driver": "pgsql"`` in CONFIG, with ``dsn`` (or ``client``); see
``docs/drivers/pgsql.md``. One module per concern:

* :mod:`.options`: CONFIG keys, and the cluster's names in PostgreSQL;
* :mod:`.session`: one database session over psycopg 3 or asyncpg;
* :mod:`.link`: a session of the driver's own, reopened after it broke;
* :mod:`.sql`: every statement; :mod:`.tables`: the tables, made on demand;
* :mod:`.relay`: NOTIFY out, LISTEN in, large messages;
* :mod:`.queues`: worker channels;
* :mod:`.driver`: :class:`PgsqlDriver`, which puts them together.
"""

from .driver import PgsqlDriver
from .options import table_names

__all__ = ["PgsqlDriver", "table_names"]
