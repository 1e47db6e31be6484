"""Adding ``crossws_channels`` to INSTALLED_APPS enables its system checks and commands."""

from __future__ import annotations

from django.apps import AppConfig


class CrosswsChannelsConfig(AppConfig):
    name = "crossws_channels"
    verbose_name = "crossws_channels"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the checks)
