"""One cluster with crossws itself: a Node crossws server and Django share a backplane.

A real crossws 0.4.17 server (tests/node/crossws_server.mjs, with ioredis or pg) and
BackplaneChannelLayer instances use the same ``channel`` on the same Redis or PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from crossws_channels import serialize
from tests.conftest import ErrorLog
from tests.drivers.pgsql.support import drop_tables
from tests.node.crossws import CrosswsServer
from tests.servers import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(params=["redis", "pgsql"])
def backplane(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Driver settings for both sides: the same channel on the same server."""
    channel = f"interop-{uuid.uuid4().hex[:10]}"
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        yield {"driver": "redis", "channel": channel, "url": url, "node": {"REDIS_URL": url}}
        return
    dsn = request.getfixturevalue("pg_dsn")
    try:
        yield {"driver": "pgsql", "channel": channel, "dsn": dsn, "node": {"PG_DSN": dsn}}
    finally:
        drop_tables(dsn, channel)


@pytest.fixture
def crossws(backplane: dict[str, Any]) -> Iterator[CrosswsServer]:
    """The crossws server of the cluster."""
    env = {"DRIVER": backplane["driver"], "CHANNEL": backplane["channel"], **backplane["node"]}
    server = CrosswsServer(env, free_port())
    yield server
    output = server.close()
    assert "error" not in output.lower(), output


@pytest.fixture
def layer_config(backplane: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in backplane.items() if key != "node"}


@pytest.fixture
async def peer(crossws: CrosswsServer) -> AsyncIterator[Any]:
    """Open a crossws WebSocket peer on a path; closed after the test."""
    opened: list[ClientConnection] = []

    async def open_peer(path: str) -> ClientConnection:
        connection = await connect(crossws.ws_url(path), proxy=None)
        opened.append(connection)
        welcome = json.loads(await asyncio.wait_for(connection.recv(), 5))
        assert welcome["type"] == "welcome"
        return connection

    yield open_peer
    for connection in opened:
        await connection.close()


async def publish_from_crossws(
    server: CrosswsServer, topic: str, body: bytes, **query: str
) -> None:
    params = "&".join(f"{key}={value}" for key, value in {"topic": topic, **query}.items())
    request = urllib.request.Request(server.url(f"/publish?{params}"), data=body, method="POST")
    await asyncio.to_thread(urllib.request.urlopen, request, timeout=5)


async def test_group_send_reaches_crossws_peers_as_json_text(
    make_layer: Any, layer_config: dict[str, Any], peer: Any
) -> None:
    """A message without bytes arrives at crossws subscribers of the topic as its JSON text."""
    layer = make_layer(**layer_config)
    connection = await peer("/topic/room")
    await layer.group_send("room", {"type": "chat.message", "text": "hé from django"})
    frame = await asyncio.wait_for(connection.recv(), 5)
    assert isinstance(frame, str)
    assert json.loads(frame) == {"type": "chat.message", "text": "hé from django"}


async def test_group_send_with_bytes_reaches_crossws_as_binary(
    make_layer: Any, layer_config: dict[str, Any], peer: Any
) -> None:
    """A message holding bytes arrives as a binary frame of the layer's binary encoding."""
    layer = make_layer(**layer_config)
    connection = await peer("/topic/files")
    message = {"type": "file.chunk", "data": bytes(range(256))}
    await layer.group_send("files", message)
    frame = await asyncio.wait_for(connection.recv(), 5)
    assert isinstance(frame, bytes)
    assert serialize.loads(frame) == message


async def test_crossws_typed_json_becomes_that_message(
    make_layer: Any, layer_config: dict[str, Any], crossws: CrosswsServer
) -> None:
    """Text that is a JSON object with a string "type" is delivered as that message."""
    layer = make_layer(**layer_config)
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    await publish_from_crossws(crossws, "room", b'{"type":"chat.message","text":"from node"}')
    assert await asyncio.wait_for(layer.receive(channel), 5) == {
        "type": "chat.message",
        "text": "from node",
    }


async def test_crossws_other_text_and_binary_become_crossws_messages(
    make_layer: Any, layer_config: dict[str, Any], crossws: CrosswsServer
) -> None:
    """Other text arrives as {"type": "crossws.message", "text"}; binary as "bytes"."""
    layer = make_layer(**layer_config)
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    await publish_from_crossws(crossws, "room", b"just text", namespace="lobby")
    assert await asyncio.wait_for(layer.receive(channel), 5) == {
        "type": "crossws.message",
        "text": "just text",
        "namespace": "lobby",
    }
    await publish_from_crossws(crossws, "room", b"[1, 2]")
    assert (await asyncio.wait_for(layer.receive(channel), 5))["text"] == "[1, 2]"
    await publish_from_crossws(crossws, "room", b"\x00\x01\xfe\xff", binary="1")
    assert await asyncio.wait_for(layer.receive(channel), 5) == {
        "type": "crossws.message",
        "bytes": b"\x00\x01\xfe\xff",
        "namespace": "",
    }


async def test_crossws_peer_frames_reach_django(
    make_layer: Any, layer_config: dict[str, Any], peer: Any
) -> None:
    """Frames a crossws WebSocket peer sends (text and binary) reach Channels members."""
    layer = make_layer(**layer_config)
    channel = await layer.new_channel()
    await layer.group_add("talk", channel)
    connection = await peer("/topic/talk")
    await connection.send('{"type":"chat.message","text":"typed"}')
    await connection.send(b"\x10\x20")
    first = await asyncio.wait_for(layer.receive(channel), 5)
    second = await asyncio.wait_for(layer.receive(channel), 5)
    assert first == {"type": "chat.message", "text": "typed"}
    assert second == {"type": "crossws.message", "bytes": b"\x10\x20", "namespace": "/topic/talk"}


async def test_topics_that_are_not_group_names_are_dropped_quietly(
    make_layer: Any, layer_config: dict[str, Any], crossws: CrosswsServer, errors: ErrorLog
) -> None:
    """A crossws topic Channels can't name as a group is ignored without an error."""
    layer = make_layer(on_error=errors, **layer_config)
    channel = await layer.new_channel()
    await layer.group_add("fine", channel)
    await publish_from_crossws(crossws, "not%20a%20group%21", b'{"type":"x"}')
    await publish_from_crossws(crossws, "fine", b'{"type":"after"}')
    assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "after"}
    assert errors.calls == []


async def test_namespace_option_scopes_what_crossws_peers_get(
    make_layer: Any, layer_config: dict[str, Any], peer: Any
) -> None:
    """With a namespace, only crossws peers of that namespace receive the layer's messages."""
    layer = make_layer(namespace="/topic/news", **layer_config)
    inside = await peer("/topic/news")
    outside = await peer("/chat/news")  # subscribes to "chat_news": another topic anyway
    await layer.group_send("news", {"type": "headline"})
    assert json.loads(await asyncio.wait_for(inside.recv(), 5)) == {"type": "headline"}
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(outside.recv(), 0.3)
