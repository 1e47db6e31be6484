"""Django system checks: ``manage.py check`` reports CHANNEL_LAYERS mistakes up front."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, register

from .config import BACKEND, build_driver, parse_config
from .errors import ConfigurationError

__all__ = ["check_channel_layers"]


@register(Tags.compatibility)
def check_channel_layers(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Validate every CHANNEL_LAYERS entry that uses BackplaneChannelLayer."""
    problems: list[CheckMessage] = []
    layers = getattr(settings, "CHANNEL_LAYERS", None) or {}
    for alias, entry in layers.items():
        if not isinstance(entry, Mapping) or entry.get("BACKEND") != BACKEND:
            continue
        config = entry.get("CONFIG")
        if not isinstance(config, Mapping):
            problems.append(
                Error(
                    f"CHANNEL_LAYERS[{alias!r}]['CONFIG'] must be a dict with at least "
                    "'driver' and 'channel'",
                    id="crossws_channels.E001",
                )
            )
            continue
        try:
            build_driver(parse_config(config, str(alias)), "system-check")
        except ConfigurationError as exc:
            problems.append(Error(str(exc), id="crossws_channels.E001"))
    return problems
