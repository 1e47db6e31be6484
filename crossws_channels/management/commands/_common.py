"""What the backplane commands share: finding the layer and asking the cluster."""

from __future__ import annotations

from argparse import ArgumentParser
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from asgiref.sync import async_to_sync
from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import get_channel_layer
from django.core.management.base import CommandError

from crossws_channels._monitor import Pong
from crossws_channels.layer import BackplaneChannelLayer

T = TypeVar("T")


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--layer",
        default=DEFAULT_CHANNEL_LAYER,
        help="the CHANNEL_LAYERS alias to check (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        help="seconds to wait for instances to answer (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def layer_for(alias: str) -> BackplaneChannelLayer:
    layer = get_channel_layer(alias)
    if layer is None:
        raise CommandError(f"CHANNEL_LAYERS has no {alias!r} layer")
    if not isinstance(layer, BackplaneChannelLayer):
        raise CommandError(
            f"the {alias!r} layer is a {type(layer).__name__}, not crossws_channels' "
            "BackplaneChannelLayer"
        )
    return layer


def then_close(layer: BackplaneChannelLayer, ask: Callable[[], Awaitable[T]]) -> T:
    """``ask()`` from this command's sync code, then close the layer: a command's
    instance lives only for its question."""

    async def run() -> T:
        try:
            return await ask()
        finally:
            await layer.close()

    result: T = async_to_sync(run)()
    return result


def ask_cluster(layer: BackplaneChannelLayer, timeout: float, stats: bool) -> list[Pong]:
    return then_close(layer, lambda: layer.ping(timeout, stats=stats))


def describe(layer: BackplaneChannelLayer) -> str:
    config = layer.config
    return f"driver {config.driver_name!r}, channel {config.channel!r}"


def as_row(pong: Pong, me: str) -> dict[str, Any]:
    return {
        "instance_id": pong.instance_id,
        "this_command": pong.instance_id == me,
        "host": pong.info.get("host"),
        "pid": pong.info.get("pid"),
        "rtt_ms": round(pong.rtt * 1000, 2),
    }
