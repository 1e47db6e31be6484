"""One chat room served by Django (daphne) and by crossws (Node), on one backplane."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect

from tests.drivers.pgsql.support import drop_tables
from tests.e2e.harness import Processes, WSClient, project_env
from tests.node.crossws import CrosswsServer
from tests.servers import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(params=["redis", "pgsql"])
def shared(request: pytest.FixtureRequest) -> Iterator[tuple[dict[str, str], CrosswsServer]]:
    """testproject's environment and a crossws chat server sharing its backplane."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        env = project_env("redis", redis_url=url)
        node = {"DRIVER": "redis", "REDIS_URL": url}
    else:
        dsn = request.getfixturevalue("pg_dsn")
        env = project_env("pgsql", pg_dsn=dsn)
        node = {"DRIVER": "pgsql", "PG_DSN": dsn}
    server = CrosswsServer({**node, "CHANNEL": env["CROSSWS_CHANNEL"]}, free_port())
    try:
        yield env, server
    finally:
        server.close()
        if request.param == "pgsql":
            drop_tables(node["PG_DSN"], env["CROSSWS_CHANNEL"])


async def test_a_room_spans_django_and_crossws(
    processes: Processes, shared: tuple[dict[str, str], CrosswsServer]
) -> None:
    """A WebSocket client on each server chats with the other, both ways."""
    env, crossws = shared
    daphne = processes.daphne(env)
    django_client = await WSClient.connect(daphne.room_url("mixed"))
    await django_client.receive_type("welcome")
    async with connect(crossws.ws_url("/chat/mixed"), proxy=None) as node_client:
        assert json.loads(await asyncio.wait_for(node_client.recv(), 5))["type"] == "welcome"

        await node_client.send(json.dumps({"text": "hello from crossws"}))
        got = await django_client.receive_type("message")
        assert (got["text"], got["author"], got["sender"]["role"]) == (
            "hello from crossws",
            "crossws",
            "crossws",
        )
        echo = json.loads(await asyncio.wait_for(node_client.recv(), 5))
        assert echo["text"] == "hello from crossws"  # crossws delivers locally too

        await django_client.send_json({"text": "hello from django", "author": "dj"})
        assert (await django_client.receive_type("message"))["text"] == "hello from django"
        relayed = json.loads(await asyncio.wait_for(node_client.recv(), 5))
        assert relayed["type"] == "chat.message"
        assert (relayed["text"], relayed["author"]) == ("hello from django", "dj")
        assert relayed["sender"]["pid"] == daphne.pid
    await django_client.close()
