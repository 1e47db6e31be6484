"""A layer built before a fork (gunicorn --preload) becomes a new instance in each child."""

from __future__ import annotations

import asyncio
import json
import os
import uuid

import pytest

from crossws_channels.layer import BackplaneChannelLayer

pytestmark = [pytest.mark.redis, pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX")]


def _child(layer: BackplaneChannelLayer, ready_w: int, done_w: int) -> None:
    async def serve() -> dict[str, object]:
        channel = await layer.new_channel()
        await layer.group_add("everyone", channel)
        os.write(ready_w, (json.dumps({"id": layer.instance_id}) + "\n").encode())
        message = await asyncio.wait_for(layer.receive(channel), 10)
        await layer.close()
        return {"id": layer.instance_id, "message": message}

    try:
        result = asyncio.run(serve())
        os.write(done_w, (json.dumps(result) + "\n").encode())
    finally:
        os._exit(0)


def _read_lines(fd: int, count: int) -> list[dict[str, object]]:
    buffer = b""
    with os.fdopen(fd, "rb") as pipe:
        while buffer.count(b"\n") < count:
            chunk = pipe.read1(4096)
            if not chunk:
                break
            buffer += chunk
    return [json.loads(line) for line in buffer.splitlines()]


def test_forked_children_are_separate_instances(redis_url: str) -> None:
    """Each forked child gets its own instance id and state, and both receive group messages."""
    layer = BackplaneChannelLayer(
        driver="redis", channel=f"fork-{uuid.uuid4().hex[:8]}", url=redis_url
    )
    parent_id = layer.instance_id
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            os.close(done_r)
            _child(layer, ready_w, done_w)
        children.append(pid)
    os.close(ready_w)
    os.close(done_w)
    try:
        ready = _read_lines(ready_r, 2)
        ids = {str(entry["id"]) for entry in ready}
        assert len(ids) == 2
        assert parent_id not in ids

        async def announce() -> None:
            await layer.group_send("everyone", {"type": "hello", "from": "parent"})
            await layer.close()

        asyncio.run(announce())
        done = _read_lines(done_r, 2)
        assert {str(entry["id"]) for entry in done} == ids
        assert all(entry["message"] == {"type": "hello", "from": "parent"} for entry in done)
    finally:
        for pid in children:
            os.waitpid(pid, 0)
