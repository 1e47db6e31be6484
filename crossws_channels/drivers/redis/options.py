"""The redis driver's options: parsing, client checks, and the names it uses in Redis.

Everything here runs in the driver's constructor, when Django builds the layer, outside
any event loop: it validates and builds objects, and opens no connection.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import quote, urlsplit

from django.utils.module_loading import import_string

from crossws_channels.errors import ConfigurationError

__all__ = [
    "CONNECTORS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_SOCKET_TIMEOUT",
    "DRIVER_KEYS",
    "Connector",
    "RedisOptions",
    "SentinelOptions",
    "WireNames",
]

Connector = Literal["redis", "valkey"]
CONNECTORS: tuple[Connector, ...] = ("redis", "valkey")

DRIVER_KEYS = frozenset(
    {
        "url",
        "client",
        "connector",
        "cluster",
        "sentinels",
        "master_name",
        "sentinel_kwargs",
        "master_kwargs",
    }
)
KNOWN_KEYS = DRIVER_KEYS | {"channel"}

# Defaults for the connections the driver opens from a URL; a query string in the URL
# (``?socket_timeout=2``) overrides them, as redis-py's ``from_url`` does.
DEFAULT_SOCKET_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 5.0

_SCHEMES: dict[str, Connector | None] = {
    "redis": None,
    "rediss": None,
    "unix": None,
    "valkey": "valkey",
    "valkeys": "valkey",
}

# The parts of a client the driver relies on; anything lacking them is refused at once
# instead of failing at the first message.
_REQUIRED_ATTRIBUTES = ("connection_pool", "execute_command", "pipeline", "register_script")


@dataclass(frozen=True, slots=True)
class WireNames:
    """Where one cluster lives in Redis.

    Group broadcasts use the pub/sub channel named exactly ``channel``, which is what a
    crossws server with ``redis({channel})`` publishes and listens on. Everything else
    sits under ``prefix``, ``crossws_channels:<channel, percent-encoded>:``. The encoding
    leaves no ``:`` (nor any glob character) in the channel part, so no cluster's prefix
    can start with another cluster's prefix, and ``flush()`` can match keys by prefix.
    """

    broadcast: str
    prefix: str
    hash_tags: bool = False
    """Redis Cluster: each worker channel's keys carry a hash tag of their own (one
    slot per queue, the queues spread over the nodes)."""

    @classmethod
    def for_channel(cls, channel: str, *, hash_tags: bool = False) -> WireNames:
        return cls(
            broadcast=channel,
            prefix=f"crossws_channels:{quote(channel, safe='')}:",
            hash_tags=hash_tags,
        )

    def direct(self, instance_id: str) -> str:
        """The pub/sub channel only ``instance_id`` listens on."""
        return f"{self.prefix}instance:{instance_id}"

    def topic(self, topic: str) -> str:
        """The pub/sub channel of a topic (routing "groups": ``g.<group>`` or
        ``p.<partition>``), which the instances with members listen on."""
        return f"{self.prefix}{topic}"

    def queue(self, channel: str) -> str:
        """The list holding a worker channel's waiting messages."""
        if self.hash_tags:
            return f"{self.prefix}queue:{{{channel}}}"
        return f"{self.prefix}queue:{channel}"

    @property
    def key_pattern(self) -> str:
        """A SCAN ``MATCH`` pattern for every key of this cluster."""
        return re.sub(r"([\\*?\[\]])", r"\\\1", self.prefix) + "*"


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """The validated options of one redis driver.

    Exactly one of ``url``, ``client`` and ``sentinel`` is set. ``owns_client`` is False only for a
    client object the user passed in: that one stays open when the driver closes.
    """

    channel: str
    connector: Connector
    url: str | None
    client: Any
    owns_client: bool
    sentinel: SentinelOptions | None = None
    cluster: bool = False

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> RedisOptions:
        """Validate the driver's part of CONFIG; raise :class:`ConfigurationError`."""
        for key in options:
            if key not in KNOWN_KEYS:
                raise ConfigurationError(
                    f"is not an option of the redis driver (it takes "
                    f"{', '.join(sorted(KNOWN_KEYS))})",
                    key=str(key),
                )
        channel = options.get("channel")
        if not isinstance(channel, str) or not channel:
            raise ConfigurationError("must be a non-empty string", key="channel")

        connector = options.get("connector")
        if connector is not None and connector not in CONNECTORS:
            raise ConfigurationError(
                f"must be one of {', '.join(repr(c) for c in CONNECTORS)}, not {connector!r}",
                key="connector",
            )
        url = options.get("url")
        client = options.get("client")
        cluster = options.get("cluster", False)
        if not isinstance(cluster, bool):
            raise ConfigurationError(f"must be true or false, got {cluster!r}", key="cluster")
        if cluster:
            for other in ("client", "sentinels"):
                if options.get(other) is not None:
                    raise ConfigurationError(
                        "can't be combined with 'cluster': give the URL of any node of the "
                        "cluster in 'url'",
                        key=other,
                    )
            if not isinstance(url, str) or not url:
                raise ConfigurationError(
                    "is required with 'cluster': the URL of any node of the cluster "
                    "(for example 'redis://10.0.0.1:7000'); the driver finds the others",
                    key="url",
                )
            connector_found = _url_connector(url, connector)
            if urlsplit(url).scheme.lower() == "unix":
                raise ConfigurationError("can't be a unix socket with 'cluster'", key="url")
            return cls(channel, connector_found, url, None, True, cluster=True)
        if options.get("sentinels") is not None or options.get("master_name") is not None:
            sentinel = SentinelOptions.from_mapping(options)
            for other in ("url", "client"):
                if options.get(other) is not None:
                    raise ConfigurationError(
                        "can't be combined with 'sentinels': the sentinels say where the "
                        "master is (its connection settings go in 'master_kwargs')",
                        key=other,
                    )
            wanted: Connector = cast(
                Connector, connector or ("redis" if _importable("redis") else "valkey")
            )
            if not _importable(wanted):
                raise ConfigurationError(
                    f"needs the {_PACKAGE[wanted]} package, which is not installed "
                    f"(pip install 'crossws_channels[redis]')",
                    key="sentinels",
                )
            return cls(channel, wanted, None, None, True, sentinel)
        for key in ("sentinel_kwargs", "master_kwargs"):
            if options.get(key) is not None:
                raise ConfigurationError("is only used with 'sentinels'", key=key)
        if url is not None and client is not None:
            raise ConfigurationError(
                "can't be combined with 'client': give the redis driver one or the other",
                key="url",
            )
        if url is None and client is None:
            raise ConfigurationError(
                "is required by the redis driver (for example 'redis://127.0.0.1:6379/0'); "
                "or pass 'client', a redis.asyncio.Redis or the dotted path of a function "
                "returning one",
                key="url",
            )
        if url is not None:
            if not isinstance(url, str) or not url:
                raise ConfigurationError("must be a non-empty string", key="url")
            return cls(channel, _url_connector(url, connector), url, None, True)

        owns = False
        if isinstance(client, str):
            client = _call_factory(_import_factory(client), client)
            owns = True
        elif callable(client) and not hasattr(client, "connection_pool"):
            client = _call_factory(client, getattr(client, "__qualname__", repr(client)))
            owns = True
        detected = check_client(client, connector)
        return cls(channel, detected, None, client, owns)


@dataclass(frozen=True, slots=True)
class SentinelOptions:
    """Where the sentinels are, which master to ask them for, and how to connect."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    sentinel_kwargs: Mapping[str, Any]
    master_kwargs: Mapping[str, Any]

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> SentinelOptions:
        value = options.get("sentinels")
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigurationError(
                "must be a list of sentinel addresses, such as ['10.0.0.1:26379', "
                f"'10.0.0.2:26379'], got {value!r}",
                key="sentinels",
            )
        sentinels = tuple(_address(entry) for entry in value)
        name = options.get("master_name")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                "is required with 'sentinels': the name the sentinels monitor the master "
                f"by (their 'sentinel monitor <name> ...' line), got {name!r}",
                key="master_name",
            )
        kwargs = []
        for key in ("sentinel_kwargs", "master_kwargs"):
            given = options.get(key) or {}
            if not isinstance(given, Mapping) or not all(isinstance(k, str) for k in given):
                raise ConfigurationError(
                    "must be a dict of connection arguments (password, username, ssl, "
                    f"socket_timeout, ...), got {given!r}",
                    key=key,
                )
            kwargs.append(dict(given))
        for key in ("host", "port", "connection_class", "connection_pool"):
            if key in kwargs[1]:
                raise ConfigurationError(
                    f"can't set {key!r}: the sentinels say where the master is",
                    key="master_kwargs",
                )
        return cls(sentinels, name, kwargs[0], kwargs[1])


def _address(entry: object) -> tuple[str, int]:
    host: object
    port: object
    if isinstance(entry, str):
        host, _, port = entry.rpartition(":")
        host = host.strip("[]")
    elif isinstance(entry, (list, tuple)) and len(entry) == 2:
        host, port = entry
    else:
        host, port = None, None
    try:
        number = int(port)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        number = 0
    if not isinstance(host, str) or not host or not 0 < number < 65536:
        raise ConfigurationError(
            f"has {entry!r}, which is not a 'host:port' address (or a (host, port) pair)",
            key="sentinels",
        )
    return host, number


def _url_connector(url: str, connector: Connector | None) -> Connector:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"must start with redis://, rediss:// or unix:// (or valkey://, valkeys://), "
            f"not {url.split(':', 1)[0]!r}://",
            key="url",
        )
    wanted = connector or _SCHEMES[scheme]
    if wanted is None:
        # redis-py is the project's own dependency; valkey-py is its API twin and serves
        # when only it is installed.
        wanted = "redis" if _importable("redis") or not _importable("valkey") else "valkey"
    if not _importable(wanted):
        raise ConfigurationError(
            f"needs the {_PACKAGE[wanted]} package, which is not installed "
            f"(pip install 'crossws_channels[redis]')",
            key="connector" if connector else "url",
        )
    if wanted == "redis" and scheme.startswith("valkey"):
        raise ConfigurationError(
            "uses a valkey:// scheme, which redis-py does not read; write redis:// instead",
            key="url",
        )
    return wanted


_PACKAGE: dict[Connector, str] = {"redis": "redis", "valkey": "valkey"}


def _importable(name: str) -> bool:
    try:
        importlib.import_module(f"{name}.asyncio")
    except ImportError:
        return False
    return True


def _import_factory(path: str) -> Callable[[], Any]:
    try:
        factory = import_string(path)
    except ImportError as exc:
        raise ConfigurationError(
            f"must be a redis client or the dotted path of a function returning one; "
            f"{path!r} could not be imported: {exc}",
            key="client",
        ) from exc
    if not callable(factory):
        raise ConfigurationError(
            f"{path!r} imports as {factory!r}, which is not callable", key="client"
        )
    return cast("Callable[[], Any]", factory)


def _call_factory(factory: Callable[[], Any], name: str) -> Any:
    try:
        return factory()
    except Exception as exc:
        raise ConfigurationError(
            f"factory {name} raised {type(exc).__name__}: {exc}", key="client"
        ) from exc


def _class_in(module_name: str, class_name: str) -> type | None:
    # A client can only be an instance of a library that is already imported, so this
    # never imports redis-py or valkey-py just to look.
    module = sys.modules.get(module_name)
    found = getattr(module, class_name, None) if module is not None else None
    return found if isinstance(found, type) else None


def check_client(client: Any, connector: Connector | None) -> Connector:
    """Return the connector for ``client``, or raise if the driver can't use it."""
    for name, sync_name, cluster_names in (
        ("redis", "Redis", ("RedisCluster",)),
        ("valkey", "Valkey", ("ValkeyCluster",)),
    ):
        for module in (f"{name}.cluster", f"{name}.asyncio.cluster", f"{name}.asyncio", name):
            for cluster_name in cluster_names:
                cluster_class = _class_in(module, cluster_name)
                if cluster_class is not None and isinstance(client, cluster_class):
                    raise ConfigurationError(
                        f"is a {type(client).__qualname__}, a Redis Cluster client, which "
                        f"the redis driver does not support; pass a client for one server",
                        key="client",
                    )
        sync_class = _class_in(name, sync_name)
        if sync_class is not None and isinstance(client, sync_class):
            raise ConfigurationError(
                f"is a synchronous {name}.{sync_name}; the redis driver needs an asyncio "
                f"client: {name}.asyncio.{sync_name}",
                key="client",
            )
    detected: Connector | None = None
    for name, class_name in (("redis", "Redis"), ("valkey", "Valkey")):
        async_class = _class_in(f"{name}.asyncio", class_name)
        if async_class is not None and isinstance(client, async_class):
            detected = cast(Connector, name)
    if connector is None and detected is None:
        raise ConfigurationError(
            f"must be a redis.asyncio.Redis or a valkey.asyncio.Valkey (or the dotted path "
            f"of a function returning one), not {type(client).__qualname__}; set "
            f"'connector' if it is a compatible client of another type",
            key="client",
        )
    missing = [name for name in _REQUIRED_ATTRIBUTES if not hasattr(client, name)]
    pool = getattr(client, "connection_pool", None)
    if missing or not hasattr(pool, "connection_class") or not hasattr(pool, "connection_kwargs"):
        raise ConfigurationError(
            f"is a {type(client).__qualname__}, which lacks what a redis-py asyncio client "
            f"has ({', '.join(missing) or 'connection_pool.connection_kwargs'})",
            key="client",
        )
    if not inspect.iscoroutinefunction(client.execute_command):
        raise ConfigurationError(
            f"is a {type(client).__qualname__} whose commands are not coroutines; the "
            f"redis driver needs an asyncio client (redis.asyncio.Redis)",
            key="client",
        )
    return connector or cast(Connector, detected)
