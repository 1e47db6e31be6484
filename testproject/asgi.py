"""ASGI entry point: ``daphne testproject.asgi:application``.

HTTP goes to Django, WebSockets under ``ws/chat/<room>/`` to the chat consumer, and the
``chat-jobs`` worker channel (``manage.py runworker chat-jobs``) to the job consumer.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
# Set up Django (apps, settings) before anything imports models or consumers.
django_asgi_app = get_asgi_application()

from channels.layers import get_channel_layer  # noqa: E402
from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from testproject.chat import routing, workers  # noqa: E402

# Build the channel layer now: a configuration error stops the server at start-up, not at
# the first WebSocket.
get_channel_layer()

channel_router = ChannelNameRouter(routing.worker_channels)

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(URLRouter(routing.websocket_urlpatterns)),
        "channel": channel_router,
    }
)

if workers.embedded_worker_requested(os.environ):
    workers.start_embedded_worker(channel_router, list(routing.worker_channels))
