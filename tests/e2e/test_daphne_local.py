"""testproject end to end with the ``local`` driver: one daphne process, real clients.

The ``local`` driver spans one process only, so the ``chat-jobs`` worker runs inside the
daphne process (``TESTPROJECT_EMBEDDED_WORKER=1``: a Channels ``Worker`` on its own thread
and event loop, sharing the server's layer), exactly as the demo runs it.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from tests.e2e.harness import (
    DaphneServer,
    Processes,
    ProcessFailed,
    WSClient,
    http_get,
    http_post,
    project_env,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def server(processes: Processes) -> DaphneServer:
    """One daphne process on the local driver, hosting the chat-jobs worker too."""
    return processes.daphne(project_env("local", embedded_worker=True))


async def join(server: DaphneServer, room: str) -> WSClient:
    """A client in ``room`` that has been welcomed (so it is in the room's group)."""
    client = await WSClient.connect(server.room_url(room))
    welcome = await client.receive_type("welcome")
    assert welcome["room"] == room
    assert welcome["served_by"]["pid"] == server.pid
    return client


def is_message(kind: str, text: str | None = None) -> Any:
    def match(content: Any) -> bool:
        return (
            content.get("type") == "message"
            and content.get("kind") == kind
            and (text is None or content.get("text") == text)
        )

    return match


async def test_pages_render(server: DaphneServer) -> None:
    """The index and room pages render with the chat UI, and bad room names are 404s."""
    index = await http_get(server.url("/"))
    assert index.status == 200
    assert 'href="/chat/lobby/"' in index.body
    assert 'id="enter"' in index.body

    room = await http_get(server.url("/chat/lobby/"))
    assert room.status == 200
    assert room.headers["Content-Type"].startswith("text/html")
    for marker in ('id="message"', 'id="log"', 'id="announce"', 'id="job"', "new WebSocket("):
        assert marker in room.body
    assert '<script id="room-name" type="application/json">"lobby"</script>' in room.body
    assert str(server.pid) in room.body

    assert (await http_get(server.url("/chat/no%20spaces/"))).status == 404


async def test_two_clients_exchange_messages(server: DaphneServer) -> None:
    """Two clients in one room each receive what either of them sends, once and in order."""
    alice = await join(server, "lobby")
    bob = await join(server, "lobby")
    try:
        await alice.send_json({"text": "hi bob", "author": "alice"})
        await bob.send_json({"text": "hi alice", "author": "bob"})
        await alice.send_json({"text": "how are you?", "author": "alice"})
        for client in (alice, bob):
            texts = [(await client.receive_type("message"))["text"] for _ in range(3)]
            # Each client's own messages stay in the order it sent them.
            assert texts.index("hi bob") < texts.index("how are you?")
            assert sorted(texts) == ["hi alice", "hi bob", "how are you?"]
            await client.assert_silent()
        last = alice.received[-1]
        assert last["author"] == "alice"
        assert last["sender"]["pid"] == server.pid
        assert last["sender"]["server"] == server.address
        assert last["served_by"]["pid"] == server.pid
    finally:
        await alice.close()
        await bob.close()


async def test_rooms_are_separate(server: DaphneServer) -> None:
    """A message to one room never reaches a client in another room."""
    here = await join(server, "here")
    there = await join(server, "there")
    try:
        await here.send_json({"text": "only here"})
        assert (await here.receive_type("message"))["text"] == "only here"
        await there.assert_silent(0.5)
    finally:
        await here.close()
        await there.close()


async def test_announce_view_reaches_every_client(server: DaphneServer) -> None:
    """The sync announce view's async_to_sync(group_send) reaches every client in the room."""
    alice = await join(server, "news")
    bob = await join(server, "news")
    try:
        response = await http_post(server.url("/chat/news/announce/"), {"text": "doors open"})
        assert response.status == 200, response.body
        assert response.json()["ok"] is True
        for client in (alice, bob):
            message = await client.receive_until(is_message("announce", "doors open"))
            assert message["sender"]["pid"] == server.pid
            await client.assert_silent()
    finally:
        await alice.close()
        await bob.close()


async def test_job_result_reaches_the_room(server: DaphneServer) -> None:
    """A job sent to the chat-jobs worker channel is done once and its result reaches the room."""
    alice = await join(server, "jobs")
    bob = await join(server, "jobs")
    try:
        response = await http_post(server.url("/chat/jobs/job/"), {"text": "count these words"})
        assert response.status == 202, response.body
        assert response.json()["queued"] == "chat-jobs"
        for client in (alice, bob):
            message = await client.receive_until(is_message("job"), timeout=10)
            assert message["text"] == "3 words, reversed: sdrow eseht tnuoc"
            assert message["sender"]["role"] == "worker"
            assert message["sender"]["pid"] == server.pid
            await client.assert_silent()
    finally:
        await alice.close()
        await bob.close()


async def test_bad_input_is_answered_not_fatal(server: DaphneServer) -> None:
    """Malformed frames and texts get an error reply and the connection stays usable."""
    client = await join(server, "lobby")
    try:
        await client.send_text("not json")
        assert (await client.receive_type("error"))["error"] == "not valid JSON"
        await client.send_json(["a", "list"])
        await client.receive_type("error")
        await client.send_json({"text": "   "})
        await client.receive_type("error")
        await client.send_json({"text": "x" * 1001})
        await client.receive_type("error")
        await client.connection.send(b"\x00binary")
        await client.receive_type("error")
        await client.send_json({"text": "still here"})
        assert (await client.receive_type("message"))["text"] == "still here"
    finally:
        await client.close()

    assert (await http_post(server.url("/chat/lobby/announce/"), {})).status == 400
    assert (await http_post(server.url("/chat/lobby/job/"), {"text": ""})).status == 400
    assert (await http_get(server.url("/chat/lobby/announce/"))).status == 405


async def test_foreign_origin_is_refused(server: DaphneServer) -> None:
    """A WebSocket from another site's page (foreign Origin header) is refused."""
    with pytest.raises(InvalidStatus) as refused:
        await WSClient.connect(server.room_url("lobby"), origin="http://evil.example")
    assert refused.value.response.status_code == 403


async def test_many_clients_each_get_every_message(server: DaphneServer) -> None:
    """Twenty clients in one room each receive all of a burst of messages exactly once."""
    clients = await asyncio.gather(*(join(server, "crowd") for _ in range(20)))
    try:
        for n in range(10):
            await clients[n % len(clients)].send_json({"text": f"m{n}"})
        for client in clients:
            texts = [(await client.receive_type("message"))["text"] for _ in range(10)]
            assert sorted(texts) == sorted(f"m{n}" for n in range(10))
        await asyncio.gather(*(client.assert_silent(0.2) for client in clients))
    finally:
        await asyncio.gather(*(client.close() for client in clients))


async def test_server_stops_cleanly(processes: Processes, server: DaphneServer) -> None:
    """SIGTERM stops daphne (with a worker thread) promptly, without a traceback."""
    client = await join(server, "lobby")
    await client.send_json({"text": "bye"})
    await client.receive_type("message")
    code = server.stop(timeout=10)
    assert code != -signal.SIGKILL, "daphne ignored SIGTERM and had to be killed"
    await client.close()
    processes.assert_no_tracebacks()


async def test_several_servers_start_at_once_and_restart(processes: Processes) -> None:
    """The harness starts several daphne processes together, each on its own port, and
    restarts one on the same port after a crash."""
    servers = processes.daphnes(2, project_env("local"))
    assert len({s.port for s in servers}) == len({s.pid for s in servers}) == 2
    for server in servers:
        page = await http_get(server.url("/"))
        assert page.status == 200
        assert str(server.pid) in page.body

    restarted = processes.restart(servers[0], crash=True)
    assert (restarted.port, restarted.env) == (servers[0].port, servers[0].env)
    assert restarted.pid != servers[0].pid
    assert str(restarted.pid) in (await http_get(restarted.url("/"))).body


def test_bad_layer_config_stops_the_server_at_start(processes: Processes) -> None:
    """A broken layer configuration makes daphne exit at start-up, with the error in its output."""
    with pytest.raises(ProcessFailed, match=r"no\.such\.driver"):
        processes.daphne(project_env("no.such.driver"))


def test_runworker_starts_and_stops(processes: Processes) -> None:
    """`manage.py runworker chat-jobs` starts under the harness and stops on SIGTERM."""
    worker = processes.runworker(project_env("local"))
    assert worker.alive
    assert worker.stop() in (0, -signal.SIGTERM)
