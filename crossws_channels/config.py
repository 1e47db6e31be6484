"""CONFIG parsing: every layer-level check happens here, when Django builds the layer.

A mistake in ``CHANNEL_LAYERS`` is an :class:`~crossws_channels.errors.ConfigurationError`
at start-up naming the alias and the key, never a surprise at the first message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from django.conf import settings
from django.utils.module_loading import import_string

from .drivers import BUILTIN, Driver, DriverFactory, SubscribingDriver, resolve_factory
from .drivers.base import DeclaresLimits, DeclaresOptions, capabilities
from .errors import ConfigurationError, ErrorHandler

__all__ = [
    "LAYER_KEYS",
    "MIN_SECONDS",
    "LayerConfig",
    "build_driver",
    "find_alias",
    "is_seconds",
    "parse_config",
    "setting_path",
]

BACKEND = "crossws_channels.layer.BackplaneChannelLayer"

LAYER_KEYS = frozenset(
    {
        "driver",
        "channel",
        "on_error",
        "expiry",
        "group_expiry",
        "capacity",
        "channel_capacity",
        "max_message_size",
        "namespace",
        "heartbeat",
        "resync_type",
        "backpressure",
        "signing_keys",
        "encryption_keys",
        "replay_window",
        "routing",
        "routing_partitions",
    }
)
"""Keys the layer uses itself; every other CONFIG key is an option of the driver."""

DEFAULT_EXPIRY = 60.0
DEFAULT_GROUP_EXPIRY = 86400.0
DEFAULT_CAPACITY = 100
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
# The shortest expiry or heartbeat: below it the sweeps and probes that follow these
# settings would run on every turn of the event loop (1e-9 was accepted once).
MIN_SECONDS = 0.01
DEFAULT_HEARTBEAT = 15.0
DEFAULT_BACKPRESSURE = 1.0
# A pause longer than this would hold up every channel of a process for too long, and
# outlast the heartbeat's patience (a paused subscription reads nothing).
MAX_BACKPRESSURE = 10.0
# How far a sealed envelope's timestamp may be from the receiver's clock: room for
# relaying delays (a paused subscription, a backlog) and for clocks that disagree.
DEFAULT_REPLAY_WINDOW = 60.0
MIN_REPLAY_WINDOW = 1.0
ROUTINGS = ("broadcast", "groups")
# More partitions than this would be a subscription per group anyway, with none of the
# naming that makes one topic per group readable (routing_partitions = 0).
MAX_PARTITIONS = 65536
# A secret shorter than this is too easy to guess offline from one signed envelope.
MIN_SECRET_BYTES = 16


@dataclass(frozen=True)
class LayerConfig:
    """A validated CONFIG."""

    driver: DriverFactory
    driver_name: str
    channel: str
    options: Mapping[str, Any]
    on_error: ErrorHandler | None = None
    expiry: float = DEFAULT_EXPIRY
    group_expiry: float = DEFAULT_GROUP_EXPIRY
    capacity: int = DEFAULT_CAPACITY
    channel_capacity: list[tuple[re.Pattern[str], int]] = field(default_factory=list)
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    namespace: str = ""
    heartbeat: float = DEFAULT_HEARTBEAT
    resync_type: str | None = None
    backpressure: float = DEFAULT_BACKPRESSURE
    signing_keys: tuple[bytes, ...] = ()
    encryption_keys: tuple[bytes, ...] = ()
    replay_window: float = DEFAULT_REPLAY_WINDOW
    routing: str = "broadcast"
    routing_partitions: int = 0
    alias: str | None = None

    @property
    def sealed(self) -> bool:
        """Whether envelopes are signed (and perhaps encrypted)."""
        return bool(self.signing_keys or self.encryption_keys)


def setting_path(alias: str | None, key: str | None = None) -> str:
    """How a setting is spelled in messages: ``CHANNEL_LAYERS['default']['CONFIG']['channel']``."""
    base = f"CHANNEL_LAYERS[{alias!r}]['CONFIG']" if alias else "the channel layer's CONFIG"
    return f"{base}[{key!r}]" if key else base


def find_alias(config: Mapping[str, Any]) -> str | None:
    """Find which CHANNEL_LAYERS entry ``config`` came from.

    Channels builds a layer as ``BACKEND(**CONFIG)`` without saying which alias it is
    building; matching the CONFIG against the settings recovers it for error messages.
    """
    try:
        layers = getattr(settings, "CHANNEL_LAYERS", None) or {}
    except Exception:  # settings not configured: the layer was built by hand
        return None
    for alias, entry in layers.items():
        if not isinstance(entry, Mapping) or entry.get("BACKEND") != BACKEND:
            continue
        for key in ("CONFIG", "TEST_CONFIG"):
            candidate = entry.get(key)
            if isinstance(candidate, Mapping) and dict(candidate) == dict(config):
                return str(alias)
    return None


def is_seconds(value: object, minimum: float = MIN_SECONDS) -> bool:
    """Whether ``value`` is a finite number of seconds, at least ``minimum`` (a bool is
    not a number here); for the drivers' options too."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value >= minimum
    )


def _positive_number(
    config: Mapping[str, Any], key: str, default: float, alias: str | None
) -> float:
    value = config.get(key, default)
    if not is_seconds(value):
        raise ConfigurationError(
            f"{setting_path(alias, key)} must be a positive number of seconds (at least "
            f"{MIN_SECONDS}), got {value!r}"
        )
    return float(value)


def _positive_int(config: Mapping[str, Any], key: str, default: int, alias: str | None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(
            f"{setting_path(alias, key)} must be a positive integer, got {value!r}"
        )
    return value


def _channel_capacity(value: object, alias: str | None) -> list[tuple[re.Pattern[str], int]]:
    import fnmatch

    where = setting_path(alias, "channel_capacity")
    if value is None:
        return []
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{where} must map channel name patterns to capacities, got {type(value).__name__}"
        )
    compiled: list[tuple[re.Pattern[str], int]] = []
    for pattern, capacity in value.items():
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ConfigurationError(
                f"{where}[{pattern!r}] must be a positive integer, got {capacity!r}"
            )
        if isinstance(pattern, re.Pattern):
            compiled.append((cast("re.Pattern[str]", pattern), capacity))
        elif isinstance(pattern, str) and pattern:
            compiled.append((re.compile(fnmatch.translate(pattern)), capacity))
        else:
            raise ConfigurationError(
                f"{where} keys must be glob patterns (str) or compiled regexes, got {pattern!r}"
            )
    return compiled


def _secrets(config: Mapping[str, Any], key: str, alias: str | None) -> tuple[bytes, ...]:
    where = setting_path(alias, key)
    value = config.get(key)
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ConfigurationError(
            f"{where} must be a list of secrets (str or bytes), the first one signing and "
            f"all of them verifying; got {type(value).__name__}"
        )
    if not value:
        raise ConfigurationError(f"{where} must hold at least one secret (or be left out)")
    secrets = []
    for index, secret in enumerate(value):
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if not isinstance(secret, bytes):
            raise ConfigurationError(
                f"{where}[{index}] must be a str or bytes secret, got {type(secret).__name__}"
            )
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigurationError(
                f"{where}[{index}] is {len(secret)} bytes long; a secret needs at least "
                f"{MIN_SECRET_BYTES} (secrets.token_urlsafe(32) makes a good one)"
            )
        secrets.append(secret)
    return tuple(secrets)


def _sealing(
    config: Mapping[str, Any], alias: str | None
) -> tuple[tuple[bytes, ...], tuple[bytes, ...], float]:
    signing = _secrets(config, "signing_keys", alias)
    encryption = _secrets(config, "encryption_keys", alias)
    if signing and encryption:
        raise ConfigurationError(
            f"{setting_path(alias, 'signing_keys')} and {setting_path(alias, 'encryption_keys')} "
            "are both set: encryption_keys authenticates every envelope too, so set only one"
        )
    if encryption:
        try:
            import cryptography.hazmat.primitives.ciphers.aead  # noqa: F401
        except ImportError as exc:
            raise ConfigurationError(
                f"{setting_path(alias, 'encryption_keys')} needs the cryptography package "
                f"(pip install 'crossws_channels[encryption]'): {exc}"
            ) from exc
    window = config.get("replay_window", DEFAULT_REPLAY_WINDOW)
    if not is_seconds(window, MIN_REPLAY_WINDOW):
        raise ConfigurationError(
            f"{setting_path(alias, 'replay_window')} must be a number of seconds, at least "
            f"{MIN_REPLAY_WINDOW:g}, got {window!r}"
        )
    return signing, encryption, float(window)


def _routing(config: Mapping[str, Any], alias: str | None) -> tuple[str, int]:
    routing = config.get("routing", "broadcast")
    if routing not in ROUTINGS:
        raise ConfigurationError(
            f"{setting_path(alias, 'routing')} must be 'broadcast' (every instance hears "
            f"every group_send) or 'groups' (only the instances with members), got {routing!r}"
        )
    partitions = config.get("routing_partitions", 0)
    if (
        isinstance(partitions, bool)
        or not isinstance(partitions, int)
        or not 0 <= partitions <= MAX_PARTITIONS
    ):
        raise ConfigurationError(
            f"{setting_path(alias, 'routing_partitions')} must be an integer from 0 (one "
            f"topic per group) to {MAX_PARTITIONS}, got {partitions!r}"
        )
    if partitions and routing != "groups":
        raise ConfigurationError(
            f"{setting_path(alias, 'routing_partitions')} is set but "
            f"{setting_path(alias, 'routing')} is not 'groups': partitions route groups"
        )
    return str(routing), partitions


def _on_error(value: object, alias: str | None) -> ErrorHandler | None:
    where = setting_path(alias, "on_error")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = import_string(value)
        except ImportError as exc:
            raise ConfigurationError(f"{where} can't be imported: {exc}") from exc
    if not callable(value):
        raise ConfigurationError(f"{where} must be a callable or its dotted path, got {value!r}")
    return cast(ErrorHandler, value)


def _driver(value: object, alias: str | None) -> tuple[DriverFactory, str]:
    where = setting_path(alias, "driver")
    if value is None:
        raise ConfigurationError(
            f"{where} is required: one of {', '.join(repr(n) for n in sorted(BUILTIN))}, "
            "or the dotted path of a driver factory"
        )
    if not (isinstance(value, str) and value) and not callable(value):
        raise ConfigurationError(
            f"{where} must be a driver name, a dotted path or a callable, got {value!r}"
        )
    name = value if isinstance(value, str) else getattr(value, "__qualname__", repr(value))
    try:
        return resolve_factory(cast("str | Callable[..., Any]", value)), name
    except ValueError as exc:
        raise ConfigurationError(f"{where}: {exc}") from exc
    except ImportError as exc:
        hint = ""
        if value in ("redis", "pgsql", "nats"):
            hint = f" (install it with: pip install 'crossws_channels[{value}]')"
        raise ConfigurationError(
            f"{where}: driver {value!r} can't be imported: {exc}{hint}"
        ) from exc


def parse_config(config: Mapping[str, Any], alias: str | None = None) -> LayerConfig:
    """Validate a CONFIG mapping; raise :class:`ConfigurationError` naming the key."""
    channel = config.get("channel")
    if not isinstance(channel, str) or not channel.strip():
        got = "it is missing" if channel is None else f"got {channel!r}"
        raise ConfigurationError(
            f"{setting_path(alias, 'channel')} is required: a non-empty name that scopes "
            f"the cluster, such as 'my-app' ({got})"
        )
    namespace = config.get("namespace", "")
    if not isinstance(namespace, str):
        raise ConfigurationError(
            f"{setting_path(alias, 'namespace')} must be a string, got {namespace!r}"
        )
    heartbeat = config.get("heartbeat", DEFAULT_HEARTBEAT)
    if heartbeat is None:
        heartbeat = 0
    if isinstance(heartbeat, bool) or (heartbeat != 0 and not is_seconds(heartbeat)):
        raise ConfigurationError(
            f"{setting_path(alias, 'heartbeat')} must be a number of seconds, at least "
            f"{MIN_SECONDS} (0 turns the heartbeat off), got {heartbeat!r}"
        )
    resync_type = config.get("resync_type")
    if resync_type is not None and (not isinstance(resync_type, str) or not resync_type):
        raise ConfigurationError(
            f"{setting_path(alias, 'resync_type')} must be a message type (a non-empty "
            f"string) or None, got {resync_type!r}"
        )
    backpressure = config.get("backpressure", DEFAULT_BACKPRESSURE)
    if not (is_seconds(backpressure, 0) and backpressure <= MAX_BACKPRESSURE):
        raise ConfigurationError(
            f"{setting_path(alias, 'backpressure')} must be a number of seconds from 0 (off) "
            f"to {MAX_BACKPRESSURE:g}, got {backpressure!r}"
        )
    signing_keys, encryption_keys, replay_window = _sealing(config, alias)
    routing, partitions = _routing(config, alias)
    factory, driver_name = _driver(config.get("driver"), alias)
    options = {key: value for key, value in config.items() if key not in LAYER_KEYS}
    options["channel"] = channel
    return LayerConfig(
        driver=factory,
        driver_name=driver_name,
        channel=channel,
        options=options,
        on_error=_on_error(config.get("on_error"), alias),
        expiry=_positive_number(config, "expiry", DEFAULT_EXPIRY, alias),
        group_expiry=_positive_number(config, "group_expiry", DEFAULT_GROUP_EXPIRY, alias),
        capacity=_positive_int(config, "capacity", DEFAULT_CAPACITY, alias),
        channel_capacity=_channel_capacity(config.get("channel_capacity"), alias),
        max_message_size=_positive_int(config, "max_message_size", DEFAULT_MAX_MESSAGE_SIZE, alias),
        namespace=namespace,
        heartbeat=float(heartbeat),
        resync_type=resync_type,
        backpressure=float(backpressure),
        signing_keys=signing_keys,
        encryption_keys=encryption_keys,
        replay_window=replay_window,
        routing=routing,
        routing_partitions=partitions,
        alias=alias,
    )


def _check_capacities(config: LayerConfig, limit: int) -> None:
    reason = f"is more than the {config.driver_name!r} driver can store ({limit})"
    if config.capacity > limit:
        raise ConfigurationError(f"{setting_path(config.alias, 'capacity')} {reason}")
    for pattern, capacity in config.channel_capacity:
        if capacity > limit:
            where = setting_path(config.alias, "channel_capacity")
            raise ConfigurationError(f"{where}[{pattern.pattern!r}] {reason}")


def build_driver(config: LayerConfig, instance_id: str) -> Driver | SubscribingDriver:
    """Call the driver factory; its option errors come back naming the setting.

    Factories open nothing (connections belong to ``listen``/``publish``), so this is
    also how ``manage.py check`` validates driver options without touching the network.
    """
    if isinstance(config.driver, DeclaresOptions):
        known = config.driver.OPTIONS
        for key in config.options:
            if key != "channel" and key not in known:
                options = ", ".join(sorted(known)) or "none"
                raise ConfigurationError(
                    f"{setting_path(config.alias, key)}: unknown key. The layer's keys are "
                    f"{', '.join(sorted(LAYER_KEYS))}; the {config.driver_name!r} driver's "
                    f"options are: {options}"
                )
    if isinstance(config.driver, DeclaresLimits):
        _check_capacities(config, config.driver.MAX_CAPACITY)
    try:
        driver = config.driver(instance_id, config.options)
    except ConfigurationError as exc:
        where = setting_path(config.alias, exc.key)
        separator = " " if exc.key else ": "
        raise ConfigurationError(f"{where}{separator}{exc.message}") from exc
    except Exception as exc:
        raise ConfigurationError(
            f"{setting_path(config.alias, 'driver')}: building the {config.driver_name!r} "
            f"driver failed: {exc}"
        ) from exc
    if config.routing == "groups" and not capabilities(driver).topics:
        raise ConfigurationError(
            f"{setting_path(config.alias, 'routing')} is 'groups', but the "
            f"{config.driver_name!r} driver can't deliver to some instances only; use "
            "'broadcast' with it (drivers with topics: redis, nats, local)"
        )
    return driver
