"""The ``chat-jobs`` worker channel: jobs sent by the job view, results to the room.

Run it as its own process with ``manage.py runworker chat-jobs``. With a driver that
only spans one process (``local``), ``TESTPROJECT_EMBEDDED_WORKER=1`` runs the same
worker on a thread of the server process instead (see :func:`start_embedded_worker`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from channels.consumer import AsyncConsumer
from channels.layers import get_channel_layer
from channels.worker import Worker
from django.core.exceptions import ImproperlyConfigured

from testproject.chat.rooms import clean_text, is_room, process_info, room_group

__all__ = [
    "JOBS_CHANNEL",
    "JobConsumer",
    "embedded_worker_requested",
    "run_job",
    "start_embedded_worker",
]

logger = logging.getLogger(__name__)

JOBS_CHANNEL = "chat-jobs"


def run_job(text: str) -> str:
    """The job itself: count the words of ``text`` and reverse it."""
    words = len(text.split())
    return f"{words} word{'' if words == 1 else 's'}, reversed: {text[::-1]}"


class JobConsumer(AsyncConsumer):
    """Handles ``chat.job`` messages: runs the job and tells the room the result."""

    async def chat_job(self, message: dict[str, Any]) -> None:
        room = message.get("room")
        text = clean_text(message.get("text"))
        if not is_room(room) or text is None:
            logger.warning("dropping a malformed chat.job message")
            return
        await self.channel_layer.group_send(
            room_group(room),
            {
                "type": "chat.message",
                "kind": "job",
                "room": room,
                "author": "worker",
                "text": run_job(text),
                "sender": process_info("worker", JOBS_CHANNEL),
                "requested_by": message.get("requested_by"),
            },
        )


def embedded_worker_requested(environ: Mapping[str, str]) -> bool:
    """Whether this server process should also run the worker channels."""
    return environ.get("TESTPROJECT_EMBEDDED_WORKER", "") == "1"


def start_embedded_worker(application: Any, channels: list[str]) -> threading.Thread:
    """Run a Channels ``Worker`` for ``channels`` on a daemon thread of this process.

    It is what ``manage.py runworker`` runs, on its own thread and event loop, sharing
    this process's channel layer. A worker channel's messages go to one receiver in the
    cluster, so a separate ``runworker`` process may run next to it.
    """
    layer = get_channel_layer()
    if layer is None:
        raise ImproperlyConfigured("the embedded worker needs CHANNEL_LAYERS")
    worker = Worker(application=application, channels=channels, channel_layer=layer)
    thread = threading.Thread(target=worker.run, name="embedded-worker", daemon=True)
    thread.start()
    logger.info("embedded worker for channels %s runs in process %s", channels, os.getpid())
    return thread
