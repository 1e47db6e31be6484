"""What the redis driver does below redis-py's public API, all in one place.

Relaying a small message costs little more than parsing its reply, so the driver reads
and writes the Redis protocol (RESP2) itself where redis-py's public calls would cost
more than the rest of the relay (scenario A of the benchmark: the receiver's CPU per
message roughly halved, the sender's fell from 50 to 11 µs):

* :class:`ReplyReader` parses every reply one socket read brought with hiredis, straight
  from the connection's ``asyncio.StreamReader`` (the private ``_reader``), with the
  library's own error mapping (its parser's ``parse_error``), and falls back to one
  ``read_response`` per call where those are missing;
* :func:`pack` and :func:`bulk` build pre-packed commands (a batch of ``PUBLISH``\\ es is
  one buffer, written at once);
* :func:`resp2_settings` and :func:`closed_while_idle` paper over what redis-py 8
  renamed or added (RESP3-only options, the idle check).

It is exercised against every redis-py release the project supports (``tox -e
redis5,redis6,redis7,redis8``) and valkey-py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["ReplyReader", "bulk", "closed_while_idle", "pack", "resp2_settings"]


def resp2_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for a connection speaking RESP2, in which pub/sub messages arrive as
    plain replies (redis-py 8's RESP3-only extras removed)."""
    kwargs = dict(kwargs, protocol=2)
    if "maint_notifications_config" in kwargs:
        kwargs["maint_notifications_config"] = None
    kwargs.pop("maint_notifications_pool_handler", None)
    return kwargs


async def closed_while_idle(connection: Connection) -> bool:
    """Whether ``connection``, with no reply pending, has been closed by the server (a
    restart, ``CLIENT KILL``) or has unexpected data waiting."""
    # redis-py 8 renamed the check; it does the same (nothing is read when nothing is
    # expected).
    check = getattr(connection, "can_read", None) or getattr(
        connection, "can_read_destructive", None
    )
    try:
        return bool(await check()) if check is not None else True
    except Exception:
        return True


class ReplyReader:
    """Reads a connection's replies in batches: every complete reply one socket read
    brought, with a single ``await``.

    redis-py's ``read_response`` goes through three coroutines and a few checks for each
    reply, which is a fair part of relaying a small message. With hiredis (which the
    ``redis`` extra installs), this parses the connection's stream itself instead; the
    client library's parser is then bypassed, so a connection read by a ``ReplyReader``
    must be read only by it, and a new one is needed after every (re)connect. Without
    hiredis, or with a client library whose connection does not read from an
    ``asyncio.StreamReader``, it falls back to one ``read_response`` per call.

    Error replies come back as exception objects (the class the client library would
    raise), not raised: the replies after them are still read.
    """

    def __init__(self, connection: Connection, reply_error: type[Exception]) -> None:
        self._connection = connection
        self._reply_error = reply_error
        stream = getattr(connection, "_reader", None)
        self._stream = stream if isinstance(stream, asyncio.StreamReader) else None
        # The client library's own mapping of error replies (NOSCRIPT -> NoScriptError...).
        parse_error = getattr(getattr(connection, "_parser", None), "parse_error", None)
        self._parser = _hiredis_reader(parse_error if callable(parse_error) else reply_error)

    async def closed_while_idle(self) -> bool:
        """Whether the server closed the connection (a restart, ``CLIENT KILL``) since
        its last reply was read."""
        stream = self._stream
        if stream is None:
            return await closed_while_idle(self._connection)
        return stream.at_eof() or stream.exception() is not None

    async def read(self) -> list[Any]:
        """The next replies (at least one), in order. Raises ``ConnectionError`` when
        the server closed the connection."""
        parser, stream = self._parser, self._stream
        if parser is None or stream is None:
            try:
                return [await self._connection.read_response()]
            except self._reply_error as exc:
                return [exc]
        replies: list[Any] = []
        while True:
            reply = parser.gets()
            while reply is not False:
                replies.append(reply)
                reply = parser.gets()
            if replies:
                return replies
            chunk = await stream.read(_READ_SIZE)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            parser.feed(chunk)


# How much a ReplyReader asks of its stream at once.
_READ_SIZE = 65536


def _hiredis_reader(reply_error: Callable[[str], Exception]) -> Any:
    try:
        import hiredis
    except ImportError:  # the redis extra installs it; valkey-py does without
        return None
    return hiredis.Reader(replyError=reply_error)


def pack(*args: bytes) -> bytes:
    """One command in the Redis protocol (RESP), from its words."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(arg) for arg in args)


def bulk(data: bytes) -> bytes:
    """``data`` as a RESP bulk string: one word of a command."""
    return b"$%d\r\n%b\r\n" % (len(data), data)
