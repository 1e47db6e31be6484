"""The pgsql driver's options: parsing, validation, and the names derived from ``channel``.

Everything here runs in the driver's constructor, which the layer calls when Django builds
it, outside any event loop: nothing is opened, every mistake raises
:class:`~crossws_channels.errors.ConfigurationError` naming the key.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import psycopg
from django.utils.module_loading import import_string
from psycopg import conninfo

from crossws_channels.config import MIN_SECONDS, is_seconds
from crossws_channels.errors import ConfigurationError

__all__ = [
    "DEFAULT_APPLICATION_NAME",
    "NOTIFY_LIMIT",
    "Connector",
    "Names",
    "PgsqlOptions",
    "classify_client",
    "direct_channel",
    "table_names",
]

Connector: TypeAlias = Literal["psycopg", "asyncpg"]

# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (BLCKSZ - NAMEDATALEN - 128).
NOTIFY_LIMIT = 7999
# NAMEDATALEN - 1: longer identifiers are truncated by LISTEN and refused by pg_notify().
IDENTIFIER_LIMIT = 63

DEFAULT_APPLICATION_NAME = "crossws_channels"
DEFAULT_LARGE_MESSAGE_TTL = 60.0
DEFAULT_PING_INTERVAL = 10.0
DEFAULT_SCHEMA = "public"
# Longer than any statement of the driver takes on a working server (a push waits its turn
# on a channel's lock, a publish writes one batch); past it the connection is taken as
# frozen (a half-open TCP connection never errors by itself) and replaced.
DEFAULT_STATEMENT_TIMEOUT = 5.0

# Raw cursors ($1 placeholders) and notifies(timeout=...) came in 3.2; notifications that
# arrive between two notifies() calls are kept since 3.2.4.
MIN_PSYCOPG = (3, 2, 4)

_KNOWN_KEYS = frozenset(
    {
        "channel",
        "dsn",
        "client",
        "connector",
        "application_name",
        "large_message_ttl",
        "ping_interval",
        "schema",
        "statement_timeout",
    }
)

_POOL_MESSAGE = (
    "is a connection pool, which can't carry the relay: LISTEN belongs to one database "
    "session, and a pool hands each query to whichever session is free, so notifications "
    "would arrive on a connection nobody listens on. Pass a single dedicated connection "
    "(psycopg.AsyncConnection or asyncpg.Connection), the dotted path of a function that "
    "opens one, or a 'dsn' and let the driver open its own"
)


def _digest(*parts: str, size: int) -> str:
    return hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=size).hexdigest()


def table_names(channel: str) -> tuple[str, str]:
    """The worker-queue table and the large-message table of the cluster ``channel``.

    Both names are valid unquoted identifiers: ``crossws_`` and a readable slug of the
    channel, then a hash of the full name, so two clusters never share a table.
    """
    slug = re.sub(r"[^a-z0-9]+", "_", channel.lower()).strip("_")[:20]
    digest = _digest("tables", channel, size=5)
    stem = f"crossws_{slug}_{digest}" if slug else f"crossws_{digest}"
    return f"{stem}_queue", f"{stem}_large"


@dataclass(frozen=True, slots=True)
class Names:
    """Every name the driver uses on the server for one cluster and one instance.

    ``broadcast`` is ``channel`` itself, so any crossws server relaying over
    ``pgsql({channel})`` shares the cluster. The other notification channels are derived
    hashes, at most 63 bytes whatever ``channel`` is.
    """

    broadcast: str
    direct: str
    wakeup: str
    queue_table: str
    large_table: str
    push_function: str
    schema: str = DEFAULT_SCHEMA

    @classmethod
    def for_instance(cls, channel: str, instance_id: str, schema: str = DEFAULT_SCHEMA) -> Names:
        queue_table, large_table = table_names(channel)
        return cls(
            schema=schema,
            broadcast=channel,
            direct=direct_channel(channel, instance_id),
            wakeup=f"crossws.wakeup.{_digest('wakeup', channel, size=12)}",
            queue_table=queue_table,
            large_table=large_table,
            push_function=queue_table.removesuffix("_queue") + "_push",
        )


# Every direct send names its target's channel; a process sends to few targets.
@functools.lru_cache(maxsize=1024)
def direct_channel(channel: str, instance_id: str) -> str:
    """The notification channel on which ``instance_id`` of cluster ``channel`` listens
    for messages sent to it alone."""
    return f"crossws.direct.{_digest('direct', channel, instance_id, size=12)}"


ClientKind: TypeAlias = Literal["psycopg", "asyncpg", "factory"]


def _module_roots(value: object) -> set[str]:
    return {cls.__module__ for cls in type(value).__mro__}


def classify_client(value: object, what: str) -> Connector:
    """Say which library ``value`` is a usable connection of, or raise ``ValueError``
    explaining why it can't be used."""
    modules = _module_roots(value)
    if any(module.startswith("psycopg_pool") for module in modules):
        raise ValueError(f"{what} {_POOL_MESSAGE}")
    if "asyncpg.pool" in modules:
        if type(value).__name__ == "PoolConnectionProxy":
            raise ValueError(
                f"{what} is a connection acquired from an asyncpg pool, which takes it back "
                "(and resets it, dropping LISTEN) when it is released. Pass a dedicated "
                "connection from asyncpg.connect(), the dotted path of a function that opens "
                "one, or a 'dsn'"
            )
        raise ValueError(f"{what} {_POOL_MESSAGE}")
    if isinstance(value, psycopg.AsyncConnection):
        return "psycopg"
    if isinstance(value, psycopg.Connection):
        raise ValueError(
            f"{what} is a synchronous psycopg.Connection; the driver runs on an event loop "
            "and needs a psycopg.AsyncConnection (or an asyncpg connection, or a 'dsn')"
        )
    if "asyncpg.connection" in modules:
        return "asyncpg"
    if any(module.startswith("django.") for module in modules):
        raise ValueError(
            f"{what} is Django's database connection, which can't carry the relay: it is "
            "synchronous, and its transactions would hold back every NOTIFY until they "
            "commit. Give the driver a 'dsn' (it may point at the same database)"
        )
    raise ValueError(
        f"{what} must be a psycopg.AsyncConnection, an asyncpg connection, or the dotted "
        f"path of a function returning one; got {type(value).__qualname__}"
    )


def _number(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    # Shorter than MIN_SECONDS, a timer would fire all the time (a ping per loop turn,
    # rows expiring as they are written).
    if not is_seconds(value):
        raise ConfigurationError(
            f"must be a number of seconds, at least {MIN_SECONDS} and finite, not {value!r}",
            key=key,
        )
    return float(value)


@dataclass(frozen=True, slots=True)
class PgsqlOptions:
    """The validated options of one pgsql driver."""

    channel: str
    dsn: str | None
    client: Any
    client_kind: ClientKind | None
    factory: Callable[[], Any] | None
    connector: Connector | None
    application_name: str | None
    large_message_ttl: float
    ping_interval: float
    schema: str = DEFAULT_SCHEMA
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> PgsqlOptions:
        """Validate ``options`` (the driver's part of CONFIG) or raise ConfigurationError."""
        _check_psycopg_version(psycopg.__version__)
        for key in options:
            if key not in _KNOWN_KEYS:
                known = ", ".join(sorted(_KNOWN_KEYS))
                raise ConfigurationError(
                    f"is not an option of the pgsql driver (it takes {known})", key=str(key)
                )
        channel = options.get("channel")
        if not isinstance(channel, str) or not channel:
            raise ConfigurationError("must be a non-empty string", key="channel")
        if "\0" in channel:
            raise ConfigurationError("can't contain a NUL character", key="channel")
        size = len(channel.encode("utf-8"))
        if size > IDENTIFIER_LIMIT:
            raise ConfigurationError(
                f"is {size} bytes in UTF-8; the pgsql driver uses it as a PostgreSQL "
                f"LISTEN/NOTIFY channel, an identifier of at most {IDENTIFIER_LIMIT} bytes",
                key="channel",
            )

        connector = options.get("connector")
        if connector not in (None, "psycopg", "asyncpg"):
            raise ConfigurationError(
                f"must be 'psycopg' or 'asyncpg', not {connector!r}", key="connector"
            )
        if connector == "asyncpg":
            try:
                importlib.import_module("asyncpg")
            except ImportError as exc:
                raise ConfigurationError(
                    f"is 'asyncpg', but asyncpg can't be imported ({exc})", key="connector"
                ) from exc

        application_name = options.get("application_name")
        if application_name is not None and (
            not isinstance(application_name, str) or "\0" in application_name
        ):
            raise ConfigurationError("must be a string", key="application_name")

        dsn = options.get("dsn")
        client = options.get("client")
        if dsn is not None and client is not None:
            raise ConfigurationError("give either 'dsn' or 'client', not both", key="client")
        if dsn is None and client is None:
            raise ConfigurationError(
                "is required by the pgsql driver (or 'client': a connection or the dotted "
                "path of a function returning one)",
                key="dsn",
            )

        client_kind: ClientKind | None = None
        factory: Callable[[], Any] | None = None
        if dsn is not None:
            _check_dsn(dsn, connector)
        else:
            if isinstance(client, str):
                try:
                    client = import_string(client)
                except ImportError as exc:
                    raise ConfigurationError(f"can't be imported: {exc}", key="client") from exc
            client_kind, factory = _check_client(client, connector)
            if factory is not None:
                client = None

        return cls(
            channel=channel,
            dsn=dsn,
            client=client,
            client_kind=client_kind,
            factory=factory,
            connector=connector,
            application_name=application_name,
            large_message_ttl=_number(options, "large_message_ttl", DEFAULT_LARGE_MESSAGE_TTL),
            ping_interval=_number(options, "ping_interval", DEFAULT_PING_INTERVAL),
            schema=_schema(options.get("schema", DEFAULT_SCHEMA)),
            statement_timeout=_number(options, "statement_timeout", DEFAULT_STATEMENT_TIMEOUT),
        )


def _schema(value: object) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigurationError(f"must be the name of a schema, not {value!r}", key="schema")
    if len(value.encode("utf-8")) > IDENTIFIER_LIMIT:
        raise ConfigurationError(
            f"is longer than a PostgreSQL identifier ({IDENTIFIER_LIMIT} bytes)", key="schema"
        )
    return value


def _check_psycopg_version(version: str) -> None:
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    if numbers < MIN_PSYCOPG:
        wanted = ".".join(map(str, MIN_PSYCOPG))
        raise ConfigurationError(
            f"'pgsql' needs psycopg {wanted} or later; {version} is installed "
            "(pip install 'crossws_channels[pgsql]')",
            key="driver",
        )


def _check_dsn(dsn: object, connector: Connector | None) -> None:
    if not isinstance(dsn, str):
        raise ConfigurationError(
            f"must be a connection string or URL, not {type(dsn).__qualname__}", key="dsn"
        )
    if connector == "asyncpg":
        if not dsn.startswith(("postgres://", "postgresql://")):
            raise ConfigurationError(
                "must be a postgresql:// URL when connector is 'asyncpg'", key="dsn"
            )
        return
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(f"is not a valid connection string: {exc}", key="dsn") from exc
    timeout = params.get("connect_timeout")
    # libpq waits for ever on zero, a negative number or (silently) anything that is not
    # a number: a dead server would then hold every reconnection attempt.
    if timeout is not None and not (str(timeout).isdigit() and int(str(timeout)) > 0):
        raise ConfigurationError(
            f"has connect_timeout={timeout!r}; it must be a positive whole number of seconds",
            key="dsn",
        )


def _check_client(
    client: object, connector: Connector | None
) -> tuple[ClientKind, Callable[[], Any] | None]:
    try:
        kind = classify_client(client, "client")
    except ValueError as exc:
        if not callable(client) or (isinstance(client, type) and _is_connection_class(client)):
            raise ConfigurationError(str(exc).removeprefix("client "), key="client") from None
        # A function (or any callable) that opens a connection when called.
        return "factory", client
    if connector is not None and connector != kind:
        raise ConfigurationError(
            f"is {connector!r} but client is a {kind} connection", key="connector"
        )
    if kind == "psycopg":
        if client.closed:  # type: ignore[attr-defined]
            raise ConfigurationError("is a closed connection", key="client")
        if not client.autocommit:  # type: ignore[attr-defined]
            raise ConfigurationError(
                "must be in autocommit mode (connect with autocommit=True): LISTEN only "
                "takes effect, and notifications only arrive, outside a transaction",
                key="client",
            )
    else:
        if client.is_closed():  # type: ignore[attr-defined]
            raise ConfigurationError("is a closed connection", key="client")
        if not hasattr(client, "_addr") or not hasattr(client, "_params"):
            raise ConfigurationError(
                "is an asyncpg connection whose connection parameters can't be read, so the "
                "driver could not open its own connections beside it; pass a 'dsn' or the "
                "dotted path of a function that opens a connection",
                key="client",
            )
    return kind, None


def _is_connection_class(value: type) -> bool:
    # Passing the class itself (client=psycopg.AsyncConnection) is a mistake, not a factory.
    modules = {cls.__module__ for cls in value.__mro__}
    return any(m.startswith(("psycopg", "asyncpg")) for m in modules)
