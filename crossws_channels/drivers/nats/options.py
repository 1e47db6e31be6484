"""The nats driver's CONFIG keys, and the names the cluster uses on the NATS server."""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from crossws_channels.errors import ConfigurationError

__all__ = ["DEFAULT_URL", "DRIVER_KEYS", "NatsNames", "NatsOptions"]

DEFAULT_URL = "nats://127.0.0.1:4222"
DRIVER_KEYS = frozenset({"url", "client", "connect", "stream_replicas"})

# A publish subject: dot-separated tokens, none empty, no whitespace, no wildcard.
_SUBJECT = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")
_STREAM_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
# Keywords the driver sets itself on its own connections.
_DRIVER_SET = frozenset(
    {
        "servers",
        "error_cb",
        "disconnected_cb",
        "closed_cb",
        "reconnected_cb",
        "discovered_server_cb",
        "lame_duck_mode_cb",
    }
)


def _digest(*parts: str, size: int = 8) -> str:
    return hashlib.blake2b("\0".join(parts).encode("utf-8"), digest_size=size).hexdigest()


@dataclass(frozen=True, slots=True)
class NatsNames:
    """Where one cluster lives on the NATS server.

    Group broadcasts go on the subject named exactly ``channel``; messages for one
    instance on ``<channel>.instance.<instance id>``. Each worker channel is a JetStream
    stream of its own, named from hashes of ``channel`` and the worker channel, so no two
    clusters and no two worker channels share one.
    """

    broadcast: str
    stream_prefix: str
    queue_prefix: str

    @classmethod
    def for_channel(cls, channel: str) -> NatsNames:
        cluster = _digest("cluster", channel)
        return cls(
            broadcast=channel,
            stream_prefix=f"crossws_channels_{cluster}_",
            queue_prefix=f"crossws_channels.{cluster}.queue.",
        )

    def direct(self, instance_id: str) -> str:
        return f"{self.broadcast}.instance.{instance_id}"

    def topic(self, topic: str) -> str:
        """The subject of a topic (routing "groups"): ``<channel>.g.<group>`` or
        ``<channel>.p.<partition>``. A group name that would leave an empty subject
        token (a leading, trailing or doubled ``.``) goes by its digest instead."""
        if ".." in topic or topic.endswith("."):
            return f"{self.broadcast}.h.{_digest('topic', topic)}"
        return f"{self.broadcast}.{topic}"

    def stream(self, worker: str) -> str:
        readable = _STREAM_UNSAFE.sub("_", worker)[:24]
        return f"{self.stream_prefix}{readable}_{_digest('worker', worker)}"

    def queue_subject(self, worker: str) -> str:
        return self.queue_prefix + _digest("worker", worker)


@dataclass(frozen=True)
class NatsOptions:
    """The validated options of one nats driver."""

    channel: str
    servers: list[str]
    client: Any = None
    connect: Mapping[str, Any] = field(default_factory=dict)
    stream_replicas: int = 1

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> NatsOptions:
        for key in options:
            if key != "channel" and key not in DRIVER_KEYS:
                known = ", ".join(sorted(DRIVER_KEYS))
                raise ConfigurationError(
                    f"is not an option of the nats driver (it takes {known})", key=str(key)
                )
        channel = options.get("channel")
        if not isinstance(channel, str) or not _SUBJECT.fullmatch(channel):
            raise ConfigurationError(
                "must be a NATS subject for the nats driver: dot-separated tokens without "
                f"spaces or wildcards (* and >), such as 'my-app', not {channel!r}",
                key="channel",
            )
        client = options.get("client")
        url = options.get("url")
        if client is not None and url is not None:
            raise ConfigurationError("give either 'url' or 'client', not both", key="client")
        if client is not None:
            _check_client(client)
        servers = _servers(DEFAULT_URL if url is None else url)
        connect = options.get("connect") or {}
        _check_connect(connect)
        replicas = options.get("stream_replicas", 1)
        if isinstance(replicas, bool) or replicas not in (1, 2, 3, 4, 5):
            raise ConfigurationError(
                "must be the number of servers of a NATS cluster that keep each worker "
                f"channel's stream, from 1 to 5 (JetStream's limit), not {replicas!r}",
                key="stream_replicas",
            )
        return cls(
            channel=channel,
            servers=servers,
            client=client,
            connect=dict(connect),
            stream_replicas=replicas,
        )


def _servers(url: object) -> list[str]:
    if isinstance(url, str):
        servers = [part.strip() for part in url.split(",") if part.strip()]
    elif isinstance(url, (list, tuple)) and all(isinstance(u, str) for u in url):
        servers = [u.strip() for u in url]
    else:
        raise ConfigurationError(
            "must be a NATS URL, or several separated by commas, not " + repr(url), key="url"
        )
    if not servers:
        raise ConfigurationError("names no server", key="url")
    for server in servers:
        if not re.fullmatch(r"(nats|tls|ws|wss)://[^\s/]+/?", server):
            raise ConfigurationError(
                f"{server!r} is not a NATS server URL (nats://host:port, tls://host:port)",
                key="url",
            )
    return servers


def _check_client(client: object) -> None:
    from nats.aio.client import Client

    if not isinstance(client, Client):
        raise ConfigurationError(
            f"must be a connected nats.aio.client.Client, not {type(client).__qualname__}",
            key="client",
        )
    if client.options.get("no_echo"):
        # The layer's heartbeat is a message the instance sends itself, over this client.
        raise ConfigurationError(
            "must hear its own messages: connect it without no_echo (the layer's "
            "heartbeat comes back by it; the driver's own connection handles this itself)",
            key="client",
        )


def _check_connect(connect: object) -> None:
    from nats.aio.client import Client

    if not isinstance(connect, Mapping):
        raise ConfigurationError(
            "must be a dict of nats.connect() keyword arguments (user, password, token, "
            "tls, user_credentials, name, ...)",
            key="connect",
        )
    accepted = set(inspect.signature(Client.connect).parameters) - {"self"}
    for key in connect:
        if key in _DRIVER_SET:
            raise ConfigurationError(
                f"[{key!r}] is set by the driver itself (servers come from 'url')", key="connect"
            )
        if key not in accepted:
            raise ConfigurationError(
                f"[{key!r}] is not an argument of nats.connect(); it takes: "
                + ", ".join(sorted(accepted - _DRIVER_SET)),
                key="connect",
            )
