"""WebSocket routes and worker channels of the chat."""

from __future__ import annotations

from typing import Any

from django.urls import re_path

from testproject.chat.consumers import ChatConsumer
from testproject.chat.rooms import ROOM
from testproject.chat.workers import JOBS_CHANNEL, JobConsumer

# django-stubs types re_path() for views; Channels' URLRouter routes ASGI applications.
websocket_urlpatterns: list[Any] = [
    re_path(rf"^ws/chat/(?P<room>{ROOM})/$", ChatConsumer.as_asgi()),  # type: ignore[arg-type]
]

# Worker channels served by ``manage.py runworker`` (or the embedded worker).
worker_channels: dict[str, Any] = {
    JOBS_CHANNEL: JobConsumer.as_asgi(),
}
