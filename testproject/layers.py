"""``CHANNEL_LAYERS`` for testproject, built from environment variables.

===================== ============================================ =====================
variable              meaning                                      default
===================== ============================================ =====================
``CROSSWS_DRIVER``    the backplane driver (``local``, ``redis``,  ``local``
                      ``pgsql``, ``multiprocessing``, ``nats`` or a
                      dotted path)
``CROSSWS_CHANNEL``   the cluster's ``channel``                    ``testproject``
``CROSSWS_REDIS_URL`` ``url`` option of the ``redis`` driver       ``redis://127.0.0.1:6379/0``
``CROSSWS_PG_DSN``    ``dsn`` option of the ``pgsql`` driver       ``postgresql://postgres@127.0.0.1:5432/test``
``CROSSWS_NATS_URL``  ``url`` option of the ``nats`` driver        ``nats://127.0.0.1:4222``
``CROSSWS_OPTIONS``   a JSON object merged into ``CONFIG`` last    none
===================== ============================================ =====================
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured

__all__ = ["DEFAULT_NATS_URL", "DEFAULT_PG_DSN", "DEFAULT_REDIS_URL", "channel_layers_from_env"]

BACKEND = "crossws_channels.layer.BackplaneChannelLayer"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def channel_layers_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``CHANNEL_LAYERS`` setting that ``environ`` asks for."""
    driver = environ.get("CROSSWS_DRIVER") or "local"
    config: dict[str, Any] = {
        "driver": driver,
        "channel": environ.get("CROSSWS_CHANNEL") or "testproject",
    }
    if driver == "redis":
        config["url"] = environ.get("CROSSWS_REDIS_URL") or DEFAULT_REDIS_URL
    elif driver == "pgsql":
        config["dsn"] = environ.get("CROSSWS_PG_DSN") or DEFAULT_PG_DSN
    elif driver == "nats":
        config["url"] = environ.get("CROSSWS_NATS_URL") or DEFAULT_NATS_URL
    raw = environ.get("CROSSWS_OPTIONS")
    if raw:
        try:
            extra = json.loads(raw)
        except ValueError as exc:
            raise ImproperlyConfigured(f"CROSSWS_OPTIONS is not valid JSON: {exc}") from exc
        if not isinstance(extra, dict):
            raise ImproperlyConfigured("CROSSWS_OPTIONS must be a JSON object")
        config.update(extra)
    return {"default": {"BACKEND": BACKEND, "CONFIG": config}}
