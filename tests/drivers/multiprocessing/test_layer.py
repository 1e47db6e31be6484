"""BackplaneChannelLayer on the multiprocessing driver, across real OS processes.

Each test runs a standalone relay, one layer in the test process and agent processes
(see :mod:`tests.drivers.multiprocessing.support`) each holding a layer of the same
cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from crossws_channels.errors import RelayUnavailable
from tests.conftest import ErrorLog
from tests.drivers.multiprocessing.support import Agent, RelayProcess

pytestmark = pytest.mark.slow

MakeAgent = Callable[..., Awaitable[Agent]]


@pytest.fixture
def config(channel: str, socket_dir: Path) -> dict[str, Any]:
    """The CONFIG of every layer of the test's cluster."""
    return {"driver": "multiprocessing", "channel": channel, "socket_dir": str(socket_dir)}


@pytest.fixture
async def make_agent(config: dict[str, Any], tmp_path: Path) -> AsyncIterator[MakeAgent]:
    """Starts agent processes (CONFIG overrides as keywords); stops them after the test."""
    agents: list[Agent] = []

    async def make(**overrides: Any) -> Agent:
        agent = await Agent.start({**config, **overrides}, tmp_path, f"{len(agents)}")
        agents.append(agent)
        return agent

    yield make
    await asyncio.gather(*(agent.close() for agent in agents))


async def receive(layer: Any, channel: str, timeout: float = 5.0) -> dict[str, Any]:
    message: dict[str, Any] = await asyncio.wait_for(layer.receive(channel), timeout)
    return message


async def nothing_on(layer: Any, channel: str, timeout: float = 0.3) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), timeout)


async def test_missing_relay_is_reported_and_local_delivery_works(
    make_layer: Any, config: dict[str, Any], errors: ErrorLog, channel: str
) -> None:
    """With no relay, on_error gets a RelayUnavailable at subscribe; local groups still work."""
    layer = make_layer(**config, on_error=errors)
    here = await layer.new_channel()
    await layer.group_add("room", here)
    await layer.group_send("room", {"type": "chat", "text": "local"})
    assert (await receive(layer, here))["text"] == "local"
    reported = errors.of(RelayUnavailable, "subscribe")
    assert reported
    assert "setup_primary()" in str(reported[0])
    assert f"python -m crossws_channels.relay --channel {channel}" in str(reported[0])


async def test_relay_restart_is_reported_once_and_groups_resume(
    relay: RelayProcess,
    make_layer: Any,
    make_agent: MakeAgent,
    config: dict[str, Any],
    errors: ErrorLog,
) -> None:
    """A relay restart is one on_error report; groups work across processes again within 2 s."""
    layer = make_layer(**config, on_error=errors)
    agent = await make_agent()
    here = await layer.new_channel()
    remote = await agent.call("new_channel")
    await layer.group_add("room", here)
    await agent.call("group_add", "room", remote)
    await asyncio.to_thread(relay.stop)
    await asyncio.sleep(1.0)
    ready_at = await asyncio.to_thread(relay.start)
    while layer.stats().get("reconnects", 0) < 1:
        assert time.monotonic() - ready_at < 2.0, "the layer did not rejoin within 2 s"
        await asyncio.sleep(0.02)
    rejoined = time.monotonic() - ready_at
    print(f"layer rejoined {rejoined:.3f} s after the relay listened again")
    deadline = time.monotonic() + 2.0
    while (await agent.call("stats")).get("reconnects", 0) < 1:
        assert time.monotonic() < deadline, "the agent did not rejoin within 2 s"
        await asyncio.sleep(0.05)
    await agent.call("group_send", "room", {"type": "chat", "text": "back"})
    assert (await receive(layer, here))["text"] == "back"
    assert (await agent.call("receive", remote, 5))["text"] == "back"
    assert len(errors.of(RelayUnavailable, "subscribe")) == 1


async def test_killed_process_does_not_disturb_the_cluster(
    relay: RelayProcess, make_layer: Any, make_agent: MakeAgent, config: dict[str, Any]
) -> None:
    """A SIGKILLed process's receives and memberships vanish; the others carry on."""
    layer = make_layer(**config)
    doomed, survivor = await make_agent(), await make_agent()
    doomed_channel = await doomed.call("new_channel")
    survivor_channel = await survivor.call("new_channel")
    await doomed.call("group_add", "room", doomed_channel)
    await survivor.call("group_add", "room", survivor_channel)
    # The doomed process waits on the worker channel first, then the survivor.
    doomed_wait = asyncio.ensure_future(doomed.call("receive", "jobs", 30, timeout=60))
    await asyncio.sleep(0.3)
    survivor_wait = asyncio.ensure_future(survivor.call("receive", "jobs", 10, timeout=20))
    await asyncio.sleep(0.3)
    await doomed.kill()
    with pytest.raises(RuntimeError):
        await doomed_wait
    await asyncio.sleep(0.2)
    await layer.send("jobs", {"type": "job", "n": 1})
    assert (await survivor_wait)["n"] == 1
    await layer.group_send("room", {"type": "chat", "text": "still here"})
    assert (await survivor.call("receive", survivor_channel, 5))["text"] == "still here"
    await layer.send(doomed_channel, {"type": "into the void"})  # dropped, never raises
