"""testproject on the multiprocessing driver, deployed the two ways the docs describe.

1. gunicorn with ``uvicorn.workers.UvicornWorker`` and two workers, configured by
   ``docs/examples/gunicorn.conf.py`` (whose ``on_starting`` hook calls
   ``setup_primary()``): clients served by different workers chat with each other.
2. Two daphne processes and ``manage.py runworker`` processes, relayed by a standalone
   ``python -m crossws_channels.relay``.

Every process is real, every client a real WebSocket client.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import crossws_channels.drivers
from crossws_channels.drivers.multiprocessing import paths
from tests.e2e.harness import (
    HOST,
    ROOT,
    ManagedProcess,
    Processes,
    WSClient,
    http_post,
    project_env,
)
from tests.servers import free_port, wait_for_port

pytestmark = pytest.mark.slow

EXAMPLE_CONFIG = ROOT / "docs" / "examples" / "gunicorn.conf.py"


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short socket_dir (pytest's tmp_path is too long for a Unix socket path)."""
    from tests.drivers.multiprocessing.support import short_socket_dir

    with short_socket_dir() as directory:
        yield directory


def is_message(kind: str, text: str | None = None) -> Any:
    def match(content: Any) -> bool:
        return (
            content.get("type") == "message"
            and content.get("kind") == kind
            and (text is None or content.get("text") == text)
        )

    return match


async def join(url: str) -> tuple[WSClient, int]:
    """A welcomed client (so already in the room's group) and the pid serving it."""
    client = await WSClient.connect(url)
    welcome = await client.receive_type("welcome", timeout=10)
    return client, int(welcome["served_by"]["pid"])


async def clients_on_distinct_workers(url: str, count: int, attempts: int = 60) -> list[WSClient]:
    """Connect until ``count`` clients are served by ``count`` different processes."""
    chosen: dict[int, WSClient] = {}
    extra: list[WSClient] = []
    try:
        for _ in range(attempts):
            client, pid = await join(url)
            if pid in chosen:
                extra.append(client)
            else:
                chosen[pid] = client
            if len(chosen) == count:
                return list(chosen.values())
            await asyncio.sleep(0.05)
    finally:
        await asyncio.gather(*(client.close() for client in extra))
    await asyncio.gather(*(client.close() for client in chosen.values()))
    raise AssertionError(f"{attempts} connections all went to the pids {sorted(chosen)}")


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        with contextlib.suppress(FileNotFoundError):
            if "zombie" in Path(f"/proc/{pid}/status").read_text():
                return
        assert time.monotonic() < deadline, f"process {pid} still runs after {timeout}s"
        time.sleep(0.05)


def start_gunicorn(processes: Processes, env: dict[str, str], port: int) -> ManagedProcess:
    server = processes.start(
        "gunicorn",
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            str(EXAMPLE_CONFIG),
            "-b",
            f"{HOST}:{port}",
            "testproject.asgi:application",
        ],
        env,
    )

    def listening() -> bool:
        try:
            wait_for_port(port, timeout=0.2)
        except TimeoutError:
            return False
        return True

    server.wait_until(listening, f"listener on {HOST}:{port}", 30)
    # Until a worker has loaded the application it accepts nothing, and the other one
    # gets every connection.
    server.wait_until(
        lambda: server.output().count("Application startup complete") >= 2, "two workers", 30
    )
    return server


async def test_gunicorn_workers_exchange_room_messages(
    processes: Processes, socket_dir: Path
) -> None:
    """Clients on different gunicorn workers chat; the master's relay stops with it."""
    assert hasattr(crossws_channels.drivers, "setup_primary"), (
        "crossws_channels.drivers must re-export setup_primary: the documented gunicorn "
        "config imports it from there"
    )
    env = project_env("multiprocessing", options={"socket_dir": str(socket_dir)})
    port = free_port()
    gunicorn = start_gunicorn(processes, env, port)
    url = f"ws://{HOST}:{port}/ws/chat/lobby/"
    alice, bob = await clients_on_distinct_workers(url, 2)
    try:
        await alice.send_json({"text": "hi from alice", "author": "alice"})
        await bob.send_json({"text": "hi from bob", "author": "bob"})
        for client in (alice, bob):
            got = [await client.receive_until(is_message("chat"), timeout=10) for _ in range(2)]
            assert sorted(m["text"] for m in got) == ["hi from alice", "hi from bob"]
            served_by = {m["served_by"]["pid"] for m in got}
            assert len(served_by) == 1
            await client.assert_silent(0.3)
        senders = {m["author"]: m["sender"]["pid"] for m in alice.received if "author" in m}
        assert senders["alice"] != senders["bob"], "both messages came from one worker"
    finally:
        await alice.close()
        await bob.close()

    # The relay is a child of the gunicorn master, and goes away with it.
    relay_pid = int(paths.lock_path(env["CROSSWS_CHANNEL"], socket_dir).read_text())
    assert parent_pid(relay_pid) == gunicorn.pid
    gunicorn.stop(timeout=15)
    wait_gone(relay_pid)
    assert not paths.socket_path(env["CROSSWS_CHANNEL"], socket_dir).exists()
    processes.assert_no_tracebacks()


def expect_only_relay_outages(processes: Processes) -> None:
    """Fail if a process logged a traceback other than of an unreachable relay."""
    for process in processes.started:
        for chunk in process.output().split("Traceback (most recent call last)")[1:]:
            lines = chunk.splitlines()[1:]
            error = next((line for line in lines if line and not line[0].isspace()), "")
            assert "RelayUnavailable" in error, f"{process.describe()}: {error}\n" + chunk


async def ping_until_received(sender: WSClient, receiver: WSClient, timeout: float) -> float:
    """Send pings until one crosses over; return how long that took."""
    started = time.monotonic()
    n = 0
    while True:
        n += 1
        text = f"ping {n}"
        await sender.send_json({"text": text})
        try:
            await receiver.receive_until(is_message("chat", text), timeout=0.25)
            return time.monotonic() - started
        except TimeoutError:
            assert time.monotonic() - started < timeout, f"no ping crossed in {timeout}s"


async def test_daphnes_and_runworkers_behind_a_standalone_relay(
    processes: Processes, socket_dir: Path
) -> None:
    """Two daphnes and two runworkers share rooms and jobs through the standalone relay."""
    env = project_env("multiprocessing", options={"socket_dir": str(socket_dir)})
    channel = env["CROSSWS_CHANNEL"]
    relay_args = [
        sys.executable,
        "-m",
        "crossws_channels.relay",
        "--channel",
        channel,
        "--socket-dir",
        str(socket_dir),
    ]
    relay = processes.start("relay", relay_args, env)
    relay.wait_for_output("listening on")
    first, second = processes.daphnes(2, env)
    workers = [processes.runworker(env), processes.runworker(env)]

    alice, alice_pid = await join(first.room_url("jobs"))
    bob, bob_pid = await join(second.room_url("jobs"))
    assert (alice_pid, bob_pid) == (first.pid, second.pid)
    try:
        await alice.send_json({"text": "hello bob", "author": "alice"})
        message = await bob.receive_until(is_message("chat", "hello bob"))
        assert message["sender"]["pid"] == first.pid
        assert message["served_by"]["pid"] == second.pid
        await alice.receive_until(is_message("chat", "hello bob"))

        # The sync view on one server reaches clients on both.
        response = await http_post(second.url("/chat/jobs/announce/"), {"text": "doors open"})
        assert response.status == 200, response.body
        for client in (alice, bob):
            announced = await client.receive_until(is_message("announce", "doors open"))
            assert announced["sender"]["pid"] == second.pid

        # Jobs go through the relay's queue: each done by exactly one runworker.
        for n in range(6):
            server = first if n % 2 else second
            response = await http_post(server.url("/chat/jobs/job/"), {"text": f"job {n}"})
            assert response.status == 202, response.body
        worker_pids = {worker.pid for worker in workers}
        for client in (alice, bob):
            results = [await client.receive_until(is_message("job"), timeout=15) for _ in range(6)]
            assert sorted(m["text"] for m in results) == sorted(
                f"2 words, reversed: {n} boj" for n in range(6)
            )
            assert {m["sender"]["pid"] for m in results} <= worker_pids
            await client.assert_silent(0.5)

        processes.assert_no_tracebacks()

        # A relay restart: every process rejoins, and chat flows again within 2 s.
        relay.stop()
        relay = processes.start("relay", relay_args, env)
        relay.wait_for_output("listening on")
        listening_at = time.monotonic()
        took = await ping_until_received(alice, bob, timeout=5)
        print(f"chat crossed servers again {took:.2f} s after the new relay listened")
        assert took < 2.0
        await ping_until_received(bob, alice, timeout=2)
        assert time.monotonic() - listening_at < 4.0
    finally:
        await alice.close()
        await bob.close()
    # Publishing failed while the relay was down (at most once: those messages are
    # lost), and each server logged it; nothing else may have gone wrong.
    expect_only_relay_outages(processes)

    # A killed daphne does not disturb the other server or the workers.
    first.kill()
    carol, _ = await join(second.room_url("after"))
    try:
        await carol.send_json({"text": "still up"})
        await carol.receive_until(is_message("chat", "still up"))
        response = await http_post(second.url("/chat/after/job/"), {"text": "one more"})
        assert response.status == 202
        await carol.receive_until(is_message("job"), timeout=10)
    finally:
        await carol.close()
    processes.stop_all()
    expect_only_relay_outages(processes)
