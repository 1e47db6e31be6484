"""URLs of the status page: ``path("backplane/", include("crossws_channels.urls"))``."""

from __future__ import annotations

from django.urls import URLPattern, path

from .status import status_data, status_page

app_name = "crossws_channels"

urlpatterns: list[URLPattern] = [
    path("", status_page, name="status"),
    path("status.json", status_data, name="status-data"),
]
