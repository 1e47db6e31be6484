"""testproject as a real cluster: two daphne processes and a runworker, on a shared backplane.

Each test runs once per networked driver. A WebSocket client on each daphne joins one
room; messages cross between the processes both ways; the sync announce view of one
process reaches clients of both; a job queued by a view of one process is done by the
separate ``runworker`` process, exactly once, and its result reaches everyone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.drivers.nats.support import drop_streams
from tests.drivers.pgsql.support import drop_tables
from tests.e2e.harness import DaphneServer, Processes, WSClient, http_post, project_env

pytestmark = pytest.mark.slow


@pytest.fixture(params=["redis", "pgsql", "nats"])
def cluster_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The environment of one cluster on the driver under test (pgsql: tables dropped
    after; nats: streams)."""
    driver: str = request.param
    if driver == "redis":
        yield project_env("redis", redis_url=request.getfixturevalue("redis_url"))
        return
    if driver == "nats":
        url = request.getfixturevalue("nats_url")
        env = project_env("nats", extra={"CROSSWS_NATS_URL": url})
        try:
            yield env
        finally:
            drop_streams(url, env["CROSSWS_CHANNEL"])
        return
    dsn = request.getfixturevalue("pg_dsn")
    env = project_env("pgsql", pg_dsn=dsn)
    try:
        yield env
    finally:
        drop_tables(dsn, env["CROSSWS_CHANNEL"])


@pytest.fixture
def servers(processes: Processes, cluster_env: dict[str, str]) -> list[DaphneServer]:
    """Two daphne processes of one cluster, plus a runworker process for chat-jobs."""
    started = processes.daphnes(2, cluster_env)
    processes.runworker(cluster_env)
    return started


async def join(server: DaphneServer, room: str) -> WSClient:
    client = await WSClient.connect(server.room_url(room))
    welcome = await client.receive_type("welcome")
    assert welcome["served_by"]["pid"] == server.pid
    return client


def message(kind: str, text: str) -> Callable[[Any], bool]:
    def match(content: Any) -> bool:
        return bool(
            content.get("type") == "message"
            and content.get("kind") == kind
            and content.get("text") == text
        )

    return match


async def test_messages_cross_between_processes_both_ways(servers: list[DaphneServer]) -> None:
    """A client on each process; each receives what the other sends, once."""
    first, second = servers
    alice, bob = await join(first, "lobby"), await join(second, "lobby")
    try:
        await alice.send_json({"text": "from the first process"})
        await bob.send_json({"text": "from the second process"})
        for client, server in ((alice, first), (bob, second)):
            got = [await client.receive_type("message") for _ in range(2)]
            assert sorted(m["text"] for m in got) == [
                "from the first process",
                "from the second process",
            ]
            assert {m["sender"]["pid"] for m in got} == {first.pid, second.pid}
            assert all(m["served_by"]["pid"] == server.pid for m in got)
            await client.assert_silent(0.5)
    finally:
        await alice.close()
        await bob.close()


async def test_announce_from_one_process_reaches_both(servers: list[DaphneServer]) -> None:
    """The sync view's async_to_sync(group_send) reaches clients of every process."""
    first, second = servers
    alice, bob = await join(first, "news"), await join(second, "news")
    try:
        response = await http_post(second.url("/chat/news/announce/"), {"text": "hello all"})
        assert response.status == 200, response.body
        for client in (alice, bob):
            got = await client.receive_until(message("announce", "hello all"))
            assert got["sender"]["pid"] == second.pid
            await client.assert_silent(0.5)
    finally:
        await alice.close()
        await bob.close()


async def test_runworker_does_each_job_once(servers: list[DaphneServer]) -> None:
    """Jobs queued by both processes' views are done by the runworker process, once each."""
    first, second = servers
    alice, bob = await join(first, "work"), await join(second, "work")
    try:
        texts = [f"job number {n}" for n in range(6)]
        for n, text in enumerate(texts):
            response = await http_post(servers[n % 2].url("/chat/work/job/"), {"text": text})
            assert response.status == 202, response.body
        for client in (alice, bob):
            results = [await client.receive_type("message", timeout=15) for _ in texts]
            assert sorted(r["text"] for r in results) == sorted(
                f"3 words, reversed: {text[::-1]}" for text in texts
            )
            assert {r["sender"]["role"] for r in results} == {"worker"}
            assert not {r["sender"]["pid"] for r in results} & {first.pid, second.pid}
            await client.assert_silent(0.5)
    finally:
        await alice.close()
        await bob.close()
