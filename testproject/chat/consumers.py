"""The chat's WebSocket consumer: one room per connection, relayed through the group."""

from __future__ import annotations

import logging
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from testproject.chat.rooms import ProcessInfo, clean_text, process_info, room_group, scope_server

__all__ = ["ChatConsumer"]

logger = logging.getLogger(__name__)

MAX_AUTHOR = 40


class ChatConsumer(AsyncJsonWebsocketConsumer):
    """A client in a room: what it sends goes to everybody in the room, on any process.

    Client to server: ``{"text": "...", "author": "..."}``. Server to client: a
    ``welcome`` naming the room and the process that serves this connection, then one
    ``message`` per chat line (``kind`` ``chat``, ``announce`` or ``job``) with the process
    that sent it (``sender``) and the one that delivered it (``served_by``), or an
    ``error``.
    """

    room: str
    group: str
    me: ProcessInfo

    async def connect(self) -> None:
        self.room = self.scope["url_route"]["kwargs"]["room"]
        self.group = room_group(self.room)
        self.me = process_info("server", scope_server(self.scope))
        # Join before accepting: once the client sees "welcome", it gets the room's messages.
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self.send_json({"type": "welcome", "room": self.room, "served_by": self.me})

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        if text_data is None:
            await self._error("send JSON text frames, not binary ones")
            return
        try:
            content = await self.decode_json(text_data)
        except ValueError:
            await self._error("not valid JSON")
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict):
            await self._error('send an object: {"text": "..."}')
            return
        text = clean_text(content.get("text"))
        if text is None:
            await self._error("text must be a non-empty string of at most 1000 characters")
            return
        author = clean_text(content.get("author"), MAX_AUTHOR) or "anonymous"
        await self.channel_layer.group_send(
            self.group,
            {
                "type": "chat.message",
                "kind": "chat",
                "room": self.room,
                "author": author,
                "text": text,
                "sender": self.me,
            },
        )

    async def chat_message(self, event: dict[str, Any]) -> None:
        """A message for the room, from this process or another one."""
        await self.send_json(
            {
                "type": "message",
                "kind": event.get("kind", "chat"),
                "room": event.get("room", self.room),
                "author": event.get("author", ""),
                "text": event.get("text", ""),
                "sender": event.get("sender"),
                "served_by": self.me,
            }
        )

    async def _error(self, error: str) -> None:
        await self.send_json({"type": "error", "error": error})
