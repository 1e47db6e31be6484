"""dev.py, the script behind the README's two commands: venv reuse, the demo's plan, the demo."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shlex
import signal
import socket
import sys
from pathlib import Path

import pytest
from playwright.async_api import Browser

import dev
from tests.e2e.harness import ROOT, Processes, WSClient, http_get, http_post, project_env
from tests.e2e.test_status_page import BROWSER_TIMEOUT, check_status_page
from tests.servers import free_port


@pytest.fixture
def venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An existing virtual environment for dev.py whose python is this interpreter."""
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    monkeypatch.setattr(dev, "VENV", tmp_path)
    return tmp_path


class Recorder:
    """Stands in for a function: records each call's argument, returns ``result``."""

    def __init__(self, result: int = 0) -> None:
        self.calls: list[list[str]] = []
        self.result = result

    def __call__(self, command: list[object]) -> int:
        self.calls.append([str(part) for part in command])
        return self.result


def pyproject_digest() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def test_install_is_skipped_while_pyproject_is_unchanged(
    venv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stamp holding pyproject.toml's hash skips pip; the dev install also serves the demo."""
    run = Recorder()
    monkeypatch.setattr(dev, "run", run)
    (venv / ".crossws-dev.stamp").write_text(pyproject_digest() + "\n")
    assert dev.ensure_venv("dev") == venv / "bin" / "python"
    assert dev.ensure_venv("demo") == venv / "bin" / "python"
    assert run.calls == []


def test_changed_pyproject_reinstalls(venv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale stamp makes dev.py reinstall the extra and record the new hash."""
    run = Recorder()
    monkeypatch.setattr(dev, "run", run)
    (venv / ".crossws-demo.stamp").write_text("0" * 64 + "\n")
    dev.ensure_venv("demo")
    assert run.calls == [
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-e", ".[demo]"]
    ]
    assert (venv / ".crossws-demo.stamp").read_text().strip() == pyproject_digest()


def test_failed_install_is_reported_and_not_stamped(
    venv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When pip fails, dev.py says so and writes no stamp, so the next run tries again."""
    monkeypatch.setattr(dev, "run", Recorder(result=1))
    with pytest.raises(dev.DevError, match="could not install"):
        dev.ensure_venv("dev")
    assert not (venv / ".crossws-dev.stamp").exists()


def test_demo_plan_for_local_and_for_a_cluster() -> None:
    """Local: one daphne that hosts the worker; a cross-process driver: N daphnes plus runworker."""
    python = Path("/venv/bin/python")
    (server,) = dev.plan_demo(python, "local", [8000])
    assert server.port == 8000
    assert server.env["CROSSWS_DRIVER"] == "local"
    assert server.env["TESTPROJECT_EMBEDDED_WORKER"] == "1"
    assert server.command[-5:] == ["-b", "127.0.0.1", "-p", "8000", "testproject.asgi:application"]

    services = dev.plan_demo(python, "redis", [8000, 8001])
    assert [s.name for s in services] == ["daphne-1", "daphne-2", "runworker"]
    assert [s.port for s in services] == [8000, 8001, None]
    assert all(s.env["TESTPROJECT_EMBEDDED_WORKER"] == "0" for s in services)
    assert services[2].command[-2:] == ["runworker", "chat-jobs"]

    relay, *rest = dev.plan_demo(python, "multiprocessing", [8000, 8001])
    assert relay.command[-3:] == [
        "crossws_channels.relay",
        "--channel",
        relay.env["CROSSWS_CHANNEL"],
    ]
    assert relay.ready_text is not None
    assert [s.name for s in rest] == ["daphne-1", "daphne-2", "runworker"]


def test_ports_skip_taken_ones() -> None:
    """The demo takes the asked port when free, else the next free ones."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = dev.free_ports(port, 2)
    assert port not in ports
    assert len(set(ports)) == 2
    assert all(p > port for p in ports)


def test_local_driver_refuses_several_processes(capsys: pytest.CaptureFixture[str]) -> None:
    """The local driver can't connect processes, so --processes 2 with it is refused."""
    assert dev.main(["demo", "--processes", "2", "--driver", "local"]) == 1
    assert "spans one process only" in capsys.readouterr().err


def test_test_command_passes_every_argument_to_pytest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything after `test`, options included, goes to pytest unchanged."""
    cmd_test = Recorder()
    monkeypatch.setattr(dev, "cmd_test", cmd_test)
    assert dev.main(["test", "-x", "-k", "envelope", "--help"]) == 0
    assert cmd_test.calls == [["-x", "-k", "envelope", "--help"]]


@pytest.mark.slow
@BROWSER_TIMEOUT
@pytest.mark.skipif(os.name != "posix", reason="the fake venv python is a shell script")
async def test_demo_is_a_cluster_and_stops_on_ctrl_c(
    venv: Path, processes: Processes, browser: Browser, tmp_path: Path
) -> None:
    """`dev.py demo` runs a relay, two daphne processes and a runworker: tabs served by
    different processes chat with each other, jobs are done, the room counts its members
    across the processes, an announcement reaches every room at once, the status page
    shows every process and its charts move, and Ctrl-C stops it all."""
    (venv / ".crossws-demo.stamp").write_text(pyproject_digest() + "\n")
    port = free_port()
    env = project_env(extra={"CROSSWS_VENV": str(venv)})
    demo = processes.start(
        "dev-demo", [sys.executable, str(ROOT / "dev.py"), "demo", "--port", str(port)], env
    )
    demo.wait_for_output("Ctrl-C stops the demo")
    output = demo.output()
    assert "driver 'multiprocessing', 2 server processes" in output
    servers = re.findall(r"(http://127\.0\.0\.1:\d+/)\s+daphne-\d, pid (\d+)", output)
    assert len(servers) == 2, output
    pids = [int(pid) for _, pid in servers]
    relay_pid = int(re.search(r"relay, pid (\d+)", output)[1])  # type: ignore[index]

    clients = []
    for url, pid in servers:
        page = await http_get(url + "chat/lobby/")
        assert str(pid) in page.body
        client = await WSClient.connect(url.replace("http", "ws") + "ws/chat/lobby/")
        assert (await client.receive_type("welcome"))["served_by"]["pid"] == int(pid)
        clients.append(client)
    try:
        await clients[0].send_json({"text": "across processes"})
        got = await clients[1].receive_type("message", timeout=10)
        assert (got["text"], got["sender"]["pid"]) == ("across processes", pids[0])
        assert (await http_post(servers[1][0] + "chat/lobby/job/", {"text": "a b"})).status == 202
        for client in clients:
            message = await client.receive_until(
                lambda m: m.get("type") == "message" and m.get("kind") == "job", timeout=10
            )
            assert message["text"] == "2 words, reversed: b a"
        who = (await http_get(servers[0][0] + "chat/lobby/who/")).json()
        assert (who["size"], who["processes"]) == (2, 2)
        elsewhere = await WSClient.connect(servers[0][0].replace("http", "ws") + "ws/chat/random/")
        await elsewhere.receive_type("welcome")
        everywhere = {"text": "to all rooms", "everywhere": "1"}
        assert (await http_post(servers[1][0] + "chat/lobby/announce/", everywhere)).status == 200
        for client in (*clients, elsewhere):
            message = await client.receive_until(
                lambda m: m.get("kind") == "announce" and m.get("text") == "to all rooms"
            )
            assert message["sender"]["pid"] == pids[1]
        await elsewhere.close()

        status = re.search(r"(http://127\.0\.0\.1:\d+/backplane/)", output)
        assert status is not None, output
        worker_pid = int(re.search(r"runworker, pid (\d+)", output)[1])  # type: ignore[index]

        async def chat() -> None:
            for n in range(60):
                await clients[1].send_json({"text": f"flowing {n}"})
                await asyncio.sleep(0.05)

        await check_status_page(
            browser, status[1], {*pids, worker_pid}, pids[0], chat, tmp_path / "demo.png"
        )
        # The cluster's metrics, from the URL the demo prints: both servers and the worker.
        cluster = re.search(r"(http://127\.0\.0\.1:\d+/metrics\?scope=cluster)", output)
        assert cluster is not None, output
        scraped = (await http_get(cluster[1])).body
        answered = set(re.findall(r'crossws_channels_connected\{[^}]*pid="(\d+)"', scraped))
        assert {str(pid) for pid in pids} <= answered and len(answered) >= 3, scraped
    finally:
        for client in clients:
            await client.close()

    demo.signal(signal.SIGINT)
    assert demo.process.wait(15) == 0
    for pid in [*pids, relay_pid]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # dev.py stopped (and reaped) every process


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="the fake venv python is a shell script")
async def test_single_process_demo(venv: Path, processes: Processes) -> None:
    """`dev.py demo --processes 1` serves the chat from one daphne on the local driver."""
    (venv / ".crossws-demo.stamp").write_text(pyproject_digest() + "\n")
    port = free_port()
    env = project_env(extra={"CROSSWS_VENV": str(venv)})
    demo = processes.start(
        "dev-demo",
        [sys.executable, str(ROOT / "dev.py"), "demo", "--port", str(port), "--processes", "1"],
        env,
    )
    demo.wait_for_output("Ctrl-C stops the demo")
    match = re.search(r"(http://127\.0\.0\.1:(\d+)/)\s+daphne, pid (\d+)", demo.output())
    assert match, demo.output()
    url = match[1]
    client = await WSClient.connect(url.replace("http", "ws") + "ws/chat/lobby/")
    try:
        await client.receive_type("welcome")
        assert (await http_post(url + "chat/lobby/job/", {"text": "a b"})).status == 202
        message = await client.receive_type("message", timeout=10)
        assert message["text"] == "2 words, reversed: b a"
    finally:
        await client.close()
    demo.signal(signal.SIGINT)
    assert demo.process.wait(15) == 0
