"""The heartbeat over each real driver: it comes back, so a healthy relay is never
reported deaf, and a silenced one is."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crossws_channels.errors import DeafSubscription
from tests.conftest import ErrorLog
from tests.drivers.multiprocessing.support import RelayProcess, short_socket_dir
from tests.drivers.pgsql.support import drop_tables


@pytest.fixture(params=["local", "redis", "pgsql", "multiprocessing", "nats"])
def driver_config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """CONFIG for a fresh cluster on each driver (with a relay for multiprocessing)."""
    channel = f"hb-{uuid.uuid4().hex[:10]}"
    if request.param == "local":
        yield {"driver": "local", "channel": channel}
    elif request.param == "redis":
        yield {"driver": "redis", "channel": channel, "url": request.getfixturevalue("redis_url")}
    elif request.param == "pgsql":
        dsn = request.getfixturevalue("pg_dsn")
        yield {"driver": "pgsql", "channel": channel, "dsn": dsn}
        drop_tables(dsn, channel)
    elif request.param == "nats":
        yield {"driver": "nats", "channel": channel, "url": request.getfixturevalue("nats_url")}
    else:
        with short_socket_dir() as directory, RelayProcess(channel, directory, tmp_path):
            yield {"driver": "multiprocessing", "channel": channel, "socket_dir": str(directory)}


async def test_a_healthy_relay_is_never_reported_deaf(
    make_layer: Any, driver_config: dict[str, Any], errors: ErrorLog
) -> None:
    """With heartbeats every 0.1 s for a second, no deafness is reported."""
    layer = make_layer(heartbeat=0.1, on_error=errors, **driver_config)
    other = make_layer(**driver_config)
    theirs = await other.new_channel()
    await other.group_add("room", theirs)
    await layer.new_channel()
    await asyncio.sleep(1.0)
    await layer.group_send("room", {"type": "still-works"})
    assert await asyncio.wait_for(other.receive(theirs), 2) == {"type": "still-works"}
    assert errors.of(DeafSubscription) == []
    assert layer.stats().get("deaf", 0) == 0
    assert errors.calls == []
