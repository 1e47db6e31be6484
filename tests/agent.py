"""A BackplaneChannelLayer in another OS process, for the cross-process tests.

Run as ``python -m tests.agent CONFIG [--sync] [--database DSN]``, this module is an
*agent*: a process holding one ``BackplaneChannelLayer`` built from the JSON ``CONFIG``.

- By default the layer runs on the process's event loop, and the agent answers one JSON
  line per command read from stdin: ``{"id": 1, "op": "send", "args": [...]}`` gets
  ``{"id": 1, "ok": true, "result": ...}`` or ``{"id": 1, "ok": false, "error":
  "ChannelFull", "message": "..."}``. Commands run concurrently, so a waiting ``receive``
  does not hold up the next one. An empty line closes the layer and ends the agent.
- ``--sync``: no event loop of its own. Like a management command or a WSGI view, it calls
  the layer through ``async_to_sync`` only: it reads ``<group> <count>`` lines and answers
  ``{"done": count, "seconds": ...}`` after that many ``group_send`` calls.
- ``--database DSN``: Django's ``default`` database is that PostgreSQL database (instead
  of ``testproject.settings``, which has none), so ``atomic_group_send`` can run a
  ``group_send`` inside a real Django transaction.

Its first line is ``{"ready": true, "instance_id": ..., "pid": ...}``, written once the
layer's subscription is in place. Bytes travel as ``{"$bytes": "<base64>"}`` both ways.

A CONFIG with ``"on_error": "tests.agent.record_error"`` records what the layer reports;
the ``reports`` command returns it.

Imported, it gives the test side: :class:`Agent` (a thread reads its answers, so
synchronous tests can drive several agents at once) and the helpers around it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "CALL_TIMEOUT",
    "RECORD",
    "ROOT",
    "Agent",
    "AgentError",
    "blob",
    "child_env",
    "from_json",
    "operations",
    "record_error",
    "to_json",
]

ROOT = Path(__file__).resolve().parents[1]
MODULE = "tests.agent"
START_TIMEOUT = 30.0
CALL_TIMEOUT = 20.0
RECORD = "tests.agent.record_error"
"""An ``on_error`` value for an agent's CONFIG: the ``reports`` command returns them."""


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that imports this checkout (without the
    ``CROSSWS_*`` variables of the test run, which would configure its layer)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CROSSWS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def to_json(value: Any) -> Any:
    """``value`` with bytes replaced by ``{"$bytes": base64}``, for JSON."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    return value


def from_json(value: Any) -> Any:
    """The inverse of :func:`to_json`."""
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return base64.b64decode(value["$bytes"])
        return {key: from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json(item) for item in value]
    return value


def blob(size: int, seed: int = 0) -> bytes:
    """``size`` bytes holding every byte value, the same for the same seed."""
    block = bytes((seed + i) % 256 for i in range(256))
    return (block * (size // 256 + 1))[:size]


# The agent (runs in the child process)

_REPORTS: list[dict[str, Any]] = []


def record_error(error: Exception, stage: str) -> None:
    """An ``on_error`` hook for agents: remembers each report for ``reports``."""
    _REPORTS.append(
        {"type": type(error).__name__, "stage": stage, "count": getattr(error, "count", None)}
    )


def _write(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(to_json(payload)) + "\n")
    sys.stdout.flush()


def _setup_django(database: str | None) -> None:
    import django

    if database is None:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    else:
        from django.conf import settings
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(database)
        settings.configure(
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": parts.get("dbname", "test"),
                    "USER": parts.get("user", "postgres"),
                    "PASSWORD": parts.get("password", ""),
                    "HOST": parts.get("host", "127.0.0.1"),
                    "PORT": parts.get("port", "5432"),
                }
            },
            INSTALLED_APPS=[],
            USE_TZ=True,
        )
    django.setup()


async def _receive(layer: Any, channel: str, timeout: float) -> Any:
    try:
        return await asyncio.wait_for(layer.receive(channel), timeout)
    except asyncio.TimeoutError:
        return None


async def _drain(layer: Any, channel: str, idle: float) -> list[Any]:
    """Receive until nothing came for ``idle`` seconds."""
    received = []
    while (message := await _receive(layer, channel, idle)) is not None:
        received.append(message)
    return received


async def _group_burst(layer: Any, group: str, count: int) -> float:
    """``count`` group_sends as fast as the layer takes them; the seconds it took."""
    started = time.monotonic()
    for n in range(count):
        await layer.group_send(group, {"type": "burst", "n": n})
    return time.monotonic() - started


async def _send_burst(layer: Any, channel: str, count: int) -> dict[str, Any]:
    """``count`` awaited sends, one after the other; which raised ChannelFull."""
    from channels.exceptions import ChannelFull

    refused = []
    started = time.monotonic()
    for n in range(count):
        try:
            await layer.send(channel, {"type": "burst", "n": n})
        except ChannelFull:
            refused.append(n)
    return {"refused": refused, "seconds": time.monotonic() - started}


async def _collect(layer: Any, channel: str, count: int, idle: float) -> list[int]:
    """The ``n`` of the messages received on ``channel``, in order: ``count`` of them, or
    what came until nothing did for ``idle`` seconds."""
    received: list[int] = []
    while len(received) < count:
        message = await _receive(layer, channel, idle)
        if message is None:
            break
        received.append(message["n"])
    return received


async def _lag(seconds: float) -> float:
    """The longest this process's event loop was late to wake a 10 ms sleep, over
    ``seconds``: how promptly it answers anything."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    end = loop.time() + seconds
    while loop.time() < end:
        before = loop.time()
        await asyncio.sleep(0.01)
        worst = max(worst, loop.time() - before - 0.01)
    return worst


async def _send_blob(layer: Any, channel: str, size: int, seed: int, group: bool) -> str:
    """Send a message carrying ``blob(size, seed)``; its SHA-256 (the bytes stay here)."""
    message = {"type": "blob", "data": blob(size, seed), "seed": seed}
    if group:
        await layer.group_send(channel, message)
    else:
        await layer.send(channel, message)
    return hashlib.sha256(message["data"]).hexdigest()


async def _receive_blob(layer: Any, channel: str, timeout: float) -> dict[str, Any] | None:
    message = await _receive(layer, channel, timeout)
    if message is None:
        return None
    return {"sha256": hashlib.sha256(message["data"]).hexdigest(), "size": len(message["data"])}


def _group_send_in_rolled_back_transaction(
    layer: Any, group: str, message: dict[str, Any], hold: float
) -> dict[str, Any]:
    """group_send inside transaction.atomic() on Django's PostgreSQL connection, keep the
    transaction open for ``hold`` seconds, then roll it back."""
    from asgiref.sync import async_to_sync
    from django.db import connection, transaction

    class Rollback(Exception):
        pass

    status: dict[str, Any] = {}
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SELECT txid_current()")  # the transaction really started
                status["txid"] = cursor.fetchone()[0]
            status["in_transaction"] = connection.in_atomic_block
            async_to_sync(layer.group_send)(group, message)
            time.sleep(hold)
            raise Rollback
    except Rollback:
        status["rolled_back"] = True
    connection.close()
    return status


def operations(layer: Any) -> dict[str, Callable[..., Any]]:
    """The commands an agent answers, each a coroutine function over ``layer``."""

    async def stats() -> dict[str, Any]:
        result: dict[str, Any] = layer.stats()
        return result

    async def reports() -> list[dict[str, Any]]:
        # Run as __main__, this module is not the tests.agent that CONFIG's on_error
        # names: read the list the hook appends to.
        import tests.agent

        return list(tests.agent._REPORTS)

    async def atomic_group_send(group: str, message: dict[str, Any], hold: float) -> Any:
        return await asyncio.to_thread(
            _group_send_in_rolled_back_transaction, layer, group, message, hold
        )

    async def send_many(pairs: list[list[Any]]) -> None:
        await layer.send_many((channel, message) for channel, message in pairs)

    async def group_query(group: str, channels: bool, timeout: float) -> dict[str, Any]:
        ask = layer.group_channels if channels else layer.group_size
        snapshot = await ask(group, timeout=timeout)
        return {
            "size": snapshot.size,
            "instances": snapshot.instances,
            "channels": sorted(snapshot.channels),
            "complete": snapshot.complete,
        }

    return {
        "new_channel": layer.new_channel,
        "send_many": send_many,
        "group_send_many": layer.group_send_many,
        "group_query": group_query,
        "send": layer.send,
        "group_add": layer.group_add,
        "group_discard": layer.group_discard,
        "group_send": layer.group_send,
        "flush": layer.flush,
        "stats": stats,
        "receive": lambda *args: _receive(layer, *args),
        "drain": lambda *args: _drain(layer, *args),
        "send_blob": lambda *args: _send_blob(layer, *args),
        "group_burst": lambda *args: _group_burst(layer, *args),
        "send_burst": lambda *args: _send_burst(layer, *args),
        "collect": lambda *args: _collect(layer, *args),
        "lag": _lag,
        "reports": reports,
        "receive_blob": lambda *args: _receive_blob(layer, *args),
        "atomic_group_send": atomic_group_send,
    }


async def _serve(config: dict[str, Any]) -> None:
    from crossws_channels.layer import BackplaneChannelLayer

    layer = BackplaneChannelLayer(**config)
    await layer.new_channel()  # returns once the backplane subscription is in place
    _write({"ready": True, "instance_id": layer.instance_id, "pid": os.getpid()})
    table = operations(layer)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def handle(command: dict[str, Any]) -> None:
        try:
            operation = table[command["op"]]
            result = await operation(*from_json(command.get("args", [])))
        except Exception as exc:
            error = {"error": type(exc).__name__, "message": str(exc)}
            _write({"id": command["id"], "ok": False, **error})
        else:
            _write({"id": command["id"], "ok": True, "result": result})

    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if not line.strip():
            break
        task = loop.create_task(handle(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await layer.close()


def _serve_sync(config: dict[str, Any]) -> None:
    from asgiref.sync import async_to_sync

    from crossws_channels.layer import BackplaneChannelLayer

    layer = BackplaneChannelLayer(**config)
    _write({"ready": True, "instance_id": layer.instance_id, "pid": os.getpid()})
    group_send = async_to_sync(layer.group_send)
    for line in sys.stdin:
        if not line.strip():
            break
        group, count = line.split()
        started = time.monotonic()
        for i in range(int(count)):
            group_send(group, {"type": "sync.message", "n": i})
        _write({"done": int(count), "seconds": time.monotonic() - started})
    async_to_sync(layer.close)()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("config", type=json.loads)
    parser.add_argument("--sync", action="store_true")
    parser.add_argument("--database")
    options = parser.parse_args(argv)
    _setup_django(options.database)
    if options.sync:
        _serve_sync(options.config)
    else:
        asyncio.run(_serve(options.config))


# The test side


class AgentError(Exception):
    """A command failed in the agent; ``name`` is the exception's class name there."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


class Agent:
    """One agent process: submit commands, collect their answers (in any order)."""

    def __init__(
        self, config: dict[str, Any], *, sync: bool = False, database: str | None = None
    ) -> None:
        descriptor, name = tempfile.mkstemp(prefix="crossws-agent-", suffix=".log")
        os.close(descriptor)
        self.log = Path(name)
        command = [sys.executable, "-m", MODULE, json.dumps(config)]
        if sync:
            command.append("--sync")
        if database is not None:
            command += ["--database", database]
        with self.log.open("wb") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=child_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self._answers: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.instance_id = ""

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            answer = json.loads(line)
            with self._changed:
                if "id" in answer:
                    self._answers[answer["id"]] = answer
                else:
                    self._events.append(answer)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _wait(self, found: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while (value := found()) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise AssertionError(f"agent: no {what} within {timeout} s\n{self.stderr()}")
                self._changed.wait(remaining)
            return value

    def event(self, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        """The next line the agent wrote that answers no command."""
        event: dict[str, Any] = self._wait(
            lambda: self._events.pop(0) if self._events else None, timeout, "event"
        )
        return event

    def wait_ready(self) -> Agent:
        ready = self.event(START_TIMEOUT)
        assert ready["ready"]
        self.instance_id = ready["instance_id"]
        return self

    def write(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def submit(self, op: str, *args: Any) -> int:
        self._next_id += 1
        self.write(json.dumps({"id": self._next_id, "op": op, "args": to_json(list(args))}))
        return self._next_id

    def result(self, command: int, timeout: float = CALL_TIMEOUT) -> Any:
        answer = self._wait(lambda: self._answers.pop(command, None), timeout, f"answer {command}")
        if not answer["ok"]:
            raise AgentError(answer["error"], answer["message"])
        return from_json(answer["result"])

    def call(self, op: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return self.result(self.submit(op, *args), timeout)

    def sync_group_send(self, group: str, count: int, timeout: float = 120.0) -> dict[str, Any]:
        """In a ``sync=True`` agent: ``count`` group_sends through async_to_sync."""
        self.write(f"{group} {count}")
        return self.event(timeout)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """Kill the process at once (SIGKILL): an instance that is down, not closed."""
        self.process.kill()
        self.process.wait(5)

    def stop(self) -> None:
        """Ask the agent to close its layer and exit; kill it if it does not."""
        if self.process.poll() is None:
            try:
                self.write("")
                self.process.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(5)
        self._reader.join(5)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.log.unlink(missing_ok=True)


if __name__ == "__main__":
    main(sys.argv[1:])
