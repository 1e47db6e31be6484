"""Rooms, message texts and which process is speaking: what every chat message carries."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from typing import Any, TypedDict, TypeGuard

__all__ = [
    "MAX_TEXT",
    "ROOM",
    "ProcessInfo",
    "clean_text",
    "is_room",
    "process_info",
    "room_group",
    "scope_server",
]

# A room name: ASCII letters, digits, ``-`` and ``_``, short enough that ``chat_<room>``
# stays a valid Channels group name.
ROOM = r"[A-Za-z0-9_-]{1,64}"
MAX_TEXT = 1000
_ROOM_RE = re.compile(ROOM)


class ProcessInfo(TypedDict):
    """A process of the demo: its pid, its role and, for a server, the address it serves."""

    pid: int
    host: str
    role: str
    server: str


def process_info(role: str, server: str = "") -> ProcessInfo:
    """This process, as shown to chat clients."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "role": role, "server": server}


def scope_server(scope: Mapping[str, Any]) -> str:
    """``host:port`` the ASGI server listens on for this connection, or ``""``."""
    server = scope.get("server")
    if isinstance(server, (list, tuple)) and len(server) == 2 and server[1] is not None:
        return f"{server[0]}:{server[1]}"
    return ""


def is_room(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a valid room name."""
    return isinstance(value, str) and _ROOM_RE.fullmatch(value) is not None


def room_group(room: str) -> str:
    """The Channels group of a room."""
    return f"chat_{room}"


def clean_text(value: object, limit: int = MAX_TEXT) -> str | None:
    """``value`` stripped, if it is a non-empty string of at most ``limit`` characters."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or len(text) > limit:
        return None
    return text
