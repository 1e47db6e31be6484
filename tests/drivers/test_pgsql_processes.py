"""BackplaneChannelLayer with the pgsql driver across real OS processes.

Each test starts agent processes, each holding one layer, and drives them with JSON lines
over stdin/stdout; the assertions run here. The agent is this module run as a program
(``python -m tests.drivers.test_pgsql_processes '<CONFIG as JSON>'``): it configures
Django with the test PostgreSQL database as its ``default`` database, so a test can open a
real Django transaction around a ``group_send``.
"""

from __future__ import annotations

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
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.pgsql, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
CALL_TIMEOUT = 20.0
MODULE = "tests.drivers.test_pgsql_processes"


# Messages cross the JSON lines with their bytes values tagged.


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_json(item) for item in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return base64.b64decode(value["$bytes"])
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


def blob(size: int, seed: int = 0) -> bytes:
    """``size`` bytes holding every byte value, the same for the same seed."""
    block = bytes((seed + i) % 256 for i in range(256))
    return (block * (size // 256 + 1))[:size]


# The agent (runs in the child process)


def _django_database(dsn: str) -> dict[str, Any]:
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(dsn)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.get("dbname", "test"),
        "USER": parts.get("user", "postgres"),
        "PASSWORD": parts.get("password", ""),
        "HOST": parts.get("host", "127.0.0.1"),
        "PORT": parts.get("port", "5432"),
    }


def agent_main(config: dict[str, Any]) -> None:
    import django
    from django.conf import settings

    dsn = os.environ.get("CROSSWS_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    settings.configure(DATABASES={"default": _django_database(dsn)}, INSTALLED_APPS=[], USE_TZ=True)
    django.setup()
    asyncio.run(_serve(config))


def _write(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def _receive(layer: Any, channel: str, timeout: float) -> Any:
    try:
        return await asyncio.wait_for(layer.receive(channel), timeout)
    except asyncio.TimeoutError:
        return None


async def _drain(layer: Any, channel: str, idle: float) -> list[Any]:
    received = []
    while (message := await _receive(layer, channel, idle)) is not None:
        received.append(message)
    return received


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


async def _run(layer: Any, op: str, args: list[Any]) -> Any:
    if op == "new_channel":
        return await layer.new_channel()
    if op == "group_add":
        return await layer.group_add(*args)
    if op == "group_discard":
        return await layer.group_discard(*args)
    if op == "group_send":
        return await layer.group_send(args[0], _from_json(args[1]))
    if op == "send":
        return await layer.send(args[0], _from_json(args[1]))
    if op == "receive":
        return _to_json(await _receive(layer, *args))
    if op == "drain":
        return _to_json(await _drain(layer, *args))
    if op == "send_blob":
        channel, size, seed, group = args
        message = {"type": "blob", "data": blob(size, seed), "seed": seed}
        if group:
            await layer.group_send(channel, message)
        else:
            await layer.send(channel, message)
        return hashlib.sha256(message["data"]).hexdigest()
    if op == "receive_blob":
        message = await _receive(layer, *args)
        if message is None:
            return None
        return {"sha256": hashlib.sha256(message["data"]).hexdigest(), "size": len(message["data"])}
    if op == "atomic_group_send":
        return await asyncio.to_thread(
            _group_send_in_rolled_back_transaction, layer, args[0], _from_json(args[1]), args[2]
        )
    if op == "stats":
        return layer.stats()
    raise ValueError(f"unknown op {op!r}")


async def _serve(config: dict[str, Any]) -> None:
    from crossws_channels.layer import BackplaneChannelLayer

    layer = BackplaneChannelLayer(**config)
    await layer.new_channel()  # returns once the backplane subscription is in place
    _write({"ready": True, "instance_id": layer.instance_id, "pid": os.getpid()})
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def handle(command: dict[str, Any]) -> None:
        try:
            result = await _run(layer, command["op"], command.get("args", []))
        except Exception as exc:
            _write(
                {"id": command["id"], "ok": False, "error": type(exc).__name__, "message": str(exc)}
            )
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


# The test side


class AgentError(Exception):
    """A command failed in the agent; ``name`` is the exception's class name there."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


class Agent:
    """One agent process: submit commands, collect their answers (in any order)."""

    def __init__(self, config: dict[str, Any], dsn: str) -> None:
        descriptor, name = tempfile.mkstemp(prefix="crossws-pgsql-agent-", suffix=".log")
        os.close(descriptor)
        self.log = Path(name)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CROSSWS_PG_DSN": dsn}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", MODULE, json.dumps(config)],
                cwd=ROOT,
                env=env,
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

    def _wait(self, found: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while (value := found()) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise AssertionError(f"agent: no {what} within {timeout} s\n{self.stderr()}")
                self._changed.wait(remaining)
            return value

    def wait_ready(self) -> Agent:
        ready = self._wait(
            lambda: self._events.pop(0) if self._events else None, START_TIMEOUT, "ready line"
        )
        assert ready["ready"]
        self.instance_id = ready["instance_id"]
        return self

    def submit(self, op: str, *args: Any) -> int:
        self._next_id += 1
        assert self.process.stdin is not None
        self.process.stdin.write(
            json.dumps({"id": self._next_id, "op": op, "args": _to_json(list(args))}) + "\n"
        )
        self.process.stdin.flush()
        return self._next_id

    def result(self, command: int, timeout: float = CALL_TIMEOUT) -> Any:
        answer = self._wait(lambda: self._answers.pop(command, None), timeout, f"answer {command}")
        if not answer["ok"]:
            raise AgentError(answer["error"], answer["message"])
        return _from_json(answer["result"])

    def call(self, op: str, *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        return self.result(self.submit(op, *args), timeout)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """Ask the agent to close its layer and exit; kill it if it does not."""
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write("\n")
                self.process.stdin.flush()
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


@pytest.fixture
def agents(pg_dsn: str) -> Iterator[Any]:
    """``agents(n, **config)`` starts n agents of one pgsql cluster and returns them ready;
    afterwards it stops them and drops the tables of every channel used."""
    from tests.drivers.test_pgsql_support import drop_tables

    started: list[Agent] = []
    channels: set[str] = set()

    def start(count: int, **config: Any) -> list[Agent]:
        config = {"driver": "pgsql", "dsn": pg_dsn, **config}
        channels.add(config["channel"])
        batch = [Agent(config, pg_dsn) for _ in range(count)]
        started.extend(batch)
        return [agent.wait_ready() for agent in batch]

    try:
        yield start
    finally:
        for agent in started:
            agent.stop()
        for channel in channels:
            drop_tables(pg_dsn, channel)


def unique(prefix: str) -> str:
    from tests.drivers.test_pgsql_support import unique as make

    return make(prefix)


def test_group_send_reaches_members_in_other_processes_once(agents: Any) -> None:
    """group_send reaches every member in the other processes exactly once; a process of
    another channel on the same database sees nothing."""
    channel = unique("proc")
    sender, b, c = agents(3, channel=channel)
    (stranger,) = agents(1, channel=unique("other"))
    members = [(b, b.call("new_channel")), (b, b.call("new_channel")), (c, c.call("new_channel"))]
    stranger_channel = stranger.call("new_channel")
    for agent, name in members:
        agent.call("group_add", "room", name)
    stranger.call("group_add", "room", stranger_channel)
    sender.call("group_send", "room", {"type": "chat.message", "text": "hi"})
    for agent, name in members:
        assert agent.call("receive", name, 5) == {"type": "chat.message", "text": "hi"}
    for agent, name in members:
        assert agent.call("receive", name, 0.5) is None  # once, never twice
    assert stranger.call("receive", stranger_channel, 0.5) is None


def test_send_to_another_process_channel_reaches_only_that_process(agents: Any) -> None:
    """send() to another process's new_channel() is routed to that process alone."""
    sender, owner, bystander = agents(3, channel=unique("proc"))
    target = owner.call("new_channel")
    before = bystander.call("stats").get("relayed_in", 0)
    for i in range(20):
        sender.call("send", target, {"type": "direct", "n": i})
    assert owner.call("drain", target, 1.0) == [{"type": "direct", "n": i} for i in range(20)]
    assert bystander.call("stats").get("relayed_in", 0) == before


def test_group_add_of_another_process_channel_takes_effect_there(agents: Any) -> None:
    """group_add(group, channel) in one process adds a channel another process owns; a
    group_send from a third process reaches it, and group_discard removes it again."""
    adder, owner, sender = agents(3, channel=unique("proc"))
    member = owner.call("new_channel")
    adder.call("group_add", "remote-room", member)
    deadline = time.monotonic() + 5
    while True:  # the membership travels to the owner asynchronously
        sender.call("group_send", "remote-room", {"type": "probe"})
        if owner.call("receive", member, 0.3) == {"type": "probe"}:
            break
        assert time.monotonic() < deadline, "group_add never took effect in the owner"
    owner.call("drain", member, 0.3)
    adder.call("group_discard", "remote-room", member)
    time.sleep(0.5)
    sender.call("group_send", "remote-room", {"type": "after discard"})
    assert owner.call("receive", member, 0.7) is None


def test_worker_channel_is_received_exactly_once_across_processes(agents: Any) -> None:
    """Messages on a worker channel reach exactly one of two receiver processes each."""
    sender, one, two = agents(3, channel=unique("proc"))
    total = 60
    waiting = [agent.submit("drain", "thumbnails", 2.0) for agent in (one, two)]
    for i in range(total):
        sender.call("send", "thumbnails", {"type": "job", "n": i})
    got = [one.result(waiting[0], 60), two.result(waiting[1], 60)]
    numbers = Counter(message["n"] for batch in got for message in batch)
    assert numbers == Counter(range(total))


def test_worker_messages_wait_up_to_expiry(agents: Any) -> None:
    """A worker message waits for a receiver while younger than expiry, and not after."""
    sender, receiver = agents(2, channel=unique("proc"), expiry=2)
    sender.call("send", "jobs", {"type": "early"})
    time.sleep(1.0)
    assert receiver.call("receive", "jobs", 3) == {"type": "early"}
    sender.call("send", "jobs", {"type": "late"})
    time.sleep(2.5)
    assert receiver.call("receive", "jobs", 1) is None


def test_worker_channel_capacity_raises_channel_full(agents: Any) -> None:
    """Past capacity, send() to a worker channel raises ChannelFull, from any process."""
    one, two = agents(2, channel=unique("proc"), capacity=3)
    for i in range(3):
        (one if i % 2 else two).call("send", "jobs", {"type": "job", "n": i})
    for agent in (one, two):
        with pytest.raises(AgentError) as info:
            agent.call("send", "jobs", {"type": "job", "n": 99})
        assert info.value.name == "ChannelFull"
    assert len(one.call("drain", "jobs", 1.0)) == 3


def test_a_near_max_size_binary_message_relays_intact(agents: Any) -> None:
    """A message of ~1 MiB of binary data (just under max_message_size) crosses intact,
    to a group member and to a process-specific channel."""
    sender, receiver = agents(2, channel=unique("proc"))
    member = receiver.call("new_channel")
    receiver.call("group_add", "big", member)
    size = 1024 * 1024 - 512  # with the message's own keys: just under 1 MiB serialized
    digest = sender.call("send_blob", "big", size, 3, True)
    got = receiver.call("receive_blob", member, 15, timeout=30)
    assert got == {"sha256": digest, "size": size}
    digest = sender.call("send_blob", member, size, 5, False)
    got = receiver.call("receive_blob", member, 15, timeout=30)
    assert got == {"sha256": digest, "size": size}


def test_message_over_max_message_size_is_refused(agents: Any) -> None:
    """A message larger than max_message_size is refused at the call, not relayed."""
    sender, receiver = agents(2, channel=unique("proc"))
    member = receiver.call("new_channel")
    with pytest.raises(AgentError) as info:
        sender.call("send_blob", member, 1024 * 1024 + 1, 0, False)
    assert info.value.name == "MessageTooLarge"


def test_group_send_inside_a_rolled_back_django_transaction_is_relayed(agents: Any) -> None:
    """group_send inside transaction.atomic() on PostgreSQL is relayed at once (before the
    transaction ends) and stays relayed when the transaction rolls back."""
    sender, receiver = agents(2, channel=unique("proc"))
    member = receiver.call("new_channel")
    receiver.call("group_add", "tx-room", member)
    started = time.monotonic()
    pending = sender.submit("atomic_group_send", "tx-room", {"type": "in.tx"}, 4.0)
    assert receiver.call("receive", member, 3) == {"type": "in.tx"}
    assert time.monotonic() - started < 3.5  # while the transaction is still open
    status = sender.result(pending)
    assert status["in_transaction"] and status["rolled_back"] and status["txid"]
    assert receiver.call("receive", member, 0.5) is None


if __name__ == "__main__":
    agent_main(json.loads(sys.argv[1]))
