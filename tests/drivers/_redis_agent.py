"""A process holding one BackplaneChannelLayer, driven by JSON lines, for cross-process tests.

Run as ``python -m tests.drivers._redis_agent '<CONFIG as JSON>' [async|sync]``.

``async`` mode runs the layer on the process's event loop and answers one JSON line per
command read from stdin: ``{"id": 1, "op": "send", "args": [...]}`` gets
``{"id": 1, "ok": true, "result": ...}`` or ``{"id": 1, "ok": false, "error": "ChannelFull",
"message": "..."}``. Commands run concurrently, so a blocking ``receive`` does not hold up
the next command. The first line written is ``{"ready": true, "instance_id": ...}``, once
the layer's subscription is in place.

``sync`` mode has no event loop of its own: like a management command or a WSGI view, it
calls the layer through ``async_to_sync`` only. It reads ``<group> <count>`` lines and
answers ``{"done": count}`` after that many ``group_send`` calls; an empty line ends it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
django.setup()

from asgiref.sync import async_to_sync  # noqa: E402

from crossws_channels.layer import BackplaneChannelLayer  # noqa: E402


def _write(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def _receive(layer: BackplaneChannelLayer, channel: str, timeout: float) -> Any:
    try:
        return await asyncio.wait_for(layer.receive(channel), timeout)
    except asyncio.TimeoutError:
        return None


async def _drain(layer: BackplaneChannelLayer, channel: str, idle: float) -> list[Any]:
    """Receive until nothing came for ``idle`` seconds."""
    received = []
    while (message := await _receive(layer, channel, idle)) is not None:
        received.append(message)
    return received


async def _run(layer: BackplaneChannelLayer, op: str, args: list[Any]) -> Any:
    if op == "new_channel":
        return await layer.new_channel()
    if op == "group_add":
        return await layer.group_add(*args)
    if op == "group_discard":
        return await layer.group_discard(*args)
    if op == "group_send":
        return await layer.group_send(*args)
    if op == "send":
        return await layer.send(*args)
    if op == "receive":
        return await _receive(layer, *args)
    if op == "drain":
        return await _drain(layer, *args)
    if op == "flush":
        return await layer.flush()
    if op == "stats":
        return layer.stats()
    raise ValueError(f"unknown op {op!r}")


async def serve(config: dict[str, Any]) -> None:
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


def serve_sync(config: dict[str, Any]) -> None:
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


if __name__ == "__main__":
    parsed = json.loads(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "sync":
        serve_sync(parsed)
    else:
        asyncio.run(serve(parsed))
