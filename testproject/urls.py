"""HTTP routes: the chat pages, the two sync views that talk to the channel layer, and
the layer's Prometheus metrics at ``/metrics`` (``?scope=cluster``: every instance's),
and the backplane status page at ``/backplane/``."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, include, path, re_path

from crossws_channels.prometheus import metrics_view
from testproject.chat import views
from testproject.chat.rooms import ROOM

urlpatterns: list[URLPattern | URLResolver] = [
    path("", views.index, name="index"),
    re_path(rf"^chat/(?P<room>{ROOM})/$", views.room, name="room"),
    re_path(rf"^chat/(?P<room>{ROOM})/announce/$", views.announce, name="announce"),
    re_path(rf"^chat/(?P<room>{ROOM})/job/$", views.job, name="job"),
    re_path(rf"^chat/(?P<room>{ROOM})/who/$", views.who, name="who"),
    path("metrics", metrics_view, name="metrics"),
    path("backplane/", include("crossws_channels.urls")),
]
