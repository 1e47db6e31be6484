"""The live status page: every instance of the cluster, its counters and rates.

Mount it with ``path("backplane/", include("crossws_channels.urls"))``. The page (one
HTML file of this package, with its script and styles inline: no build step, nothing
fetched from elsewhere) asks :func:`status_data` every two seconds; that view pings every
live instance over the backplane for its ``stats()``, as ``backplane_stats`` does
(:meth:`~crossws_channels.layer.BackplaneChannelLayer.cluster_stats`). Who
may see it is decided by :func:`allowed`: staff users by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any

from asgiref.sync import async_to_sync
from channels import DEFAULT_CHANNEL_LAYER
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.urls import reverse
from django.utils.module_loading import import_string
from django.views.decorators.cache import never_cache

from .layer import layer_named

__all__ = ["allowed", "status_data", "status_page"]

# How long the instances have to answer one refresh of the page.
ANSWER_TIMEOUT = 0.5
ACCESS_SETTING = "CROSSWS_CHANNELS_STATUS_ACCESS"


def is_staff(request: HttpRequest) -> bool:
    """The default access rule: an active staff user (``django.contrib.auth``)."""
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_active and user.is_staff)


def allowed(request: HttpRequest) -> bool:
    """Whether ``request`` may see the page: the function named by the setting
    ``CROSSWS_CHANNELS_STATUS_ACCESS`` (a dotted path or a callable), else :func:`is_staff`."""
    rule: str | Callable[[HttpRequest], bool] = getattr(settings, ACCESS_SETTING, is_staff)
    check = import_string(rule) if isinstance(rule, str) else rule
    return bool(check(request))


def _forbidden() -> HttpResponse:
    return HttpResponse(
        "The backplane status page is for staff users (see the setting "
        f"{ACCESS_SETTING} to change who may see it).",
        status=403,
        content_type="text/plain",
    )


@cache
def _page() -> str:
    return (resources.files(__package__) / "status_page.html").read_text(encoding="utf-8")


@never_cache
def status_page(request: HttpRequest) -> HttpResponse:
    if not allowed(request):
        return _forbidden()
    data = reverse("crossws_channels:status-data")
    alias = request.GET.get("layer")
    if alias:
        data += "?" + request.GET.urlencode()
    # The URL is ours and the alias is URL-encoded: nothing to escape in a JS string.
    return HttpResponse(_page().replace("__DATA_URL__", data), content_type="text/html")


@never_cache
def status_data(request: HttpRequest) -> HttpResponse:
    if not allowed(request):
        return _forbidden()
    alias = request.GET.get("layer", DEFAULT_CHANNEL_LAYER)
    layer = layer_named(alias)
    if layer is None:
        return HttpResponseBadRequest(f"no crossws_channels layer {alias!r}")
    pongs = async_to_sync(layer.cluster_stats)(ANSWER_TIMEOUT)
    instances: list[dict[str, Any]] = [
        {
            "instance_id": pong.instance_id,
            "rtt": pong.rtt,
            "host": pong.info.get("host"),
            "pid": pong.info.get("pid"),
            "driver": pong.info.get("driver"),
            "stats": pong.info.get("stats", {}),
        }
        for pong in pongs
    ]
    instances.sort(key=lambda row: (str(row["host"]), str(row["pid"])))
    return JsonResponse(
        {
            "now": time.time(),
            "layer": alias,
            "driver": layer.config.driver_name,
            "channel": layer.config.channel,
            "this": layer.instance_id,
            "instances": instances,
        }
    )
