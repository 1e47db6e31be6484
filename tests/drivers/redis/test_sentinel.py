"""The redis driver through Redis Sentinel: a master, a replica and three sentinels of
the test's own, on free ports. The driver asks the sentinels where the master is, and
follows a failover: relaying and worker channels go on on the new master."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import redis

from crossws_channels.errors import ConfigurationError
from tests.drivers.redis.failover import check_failover, through_a_failover
from tests.servers import SentinelDeployment

logger = logging.getLogger(__name__)


def sentinel_config(deployment: SentinelDeployment, **more: Any) -> dict[str, Any]:
    return {
        "driver": "redis",
        "sentinels": deployment.addresses,
        "master_name": deployment.MASTER_NAME,
        **more,
    }


@pytest.fixture
def deployment() -> Any:
    with SentinelDeployment() as made:
        yield made


async def test_the_layer_finds_the_master_through_the_sentinels(
    make_layer: Any, deployment: SentinelDeployment
) -> None:
    sender = make_layer(**sentinel_config(deployment))
    receiver = make_layer(**sentinel_config(deployment))
    channel = await receiver.new_channel()
    await receiver.group_add("room", channel)
    await sender.new_channel()
    await sender.group_send("room", {"type": "m"})
    assert (await asyncio.wait_for(receiver.receive(channel), 5))["type"] == "m"
    await sender.send("jobs", {"type": "job"})
    assert (await asyncio.wait_for(receiver.receive("jobs"), 5))["type"] == "job"
    port = deployment.master_port()
    assert port is not None
    with redis.Redis(port=port) as client:
        names = {entry.get("name", "") for entry in client.client_list()}
    assert f"crossws_channels:sub:{receiver.instance_id}" in names


async def test_a_killed_master_is_followed_to_the_promoted_replica(
    make_layer: Any, deployment: SentinelDeployment
) -> None:
    def kill() -> None:
        old = deployment.kill_master()
        deployment.wait_for_new_master(old)

    stream, sender_errors, receiver_errors, started = await through_a_failover(
        make_layer, sentinel_config(deployment), kill
    )
    check_failover(stream, receiver_errors, started, "master killed")
    # The sender's outages are one report each (relaying, and worker-channel pushes).
    assert len(sender_errors.of(Exception, "publish")) <= 2, sender_errors.calls


async def test_a_manual_failover_moves_every_connection_to_the_new_master(
    make_layer: Any, deployment: SentinelDeployment
) -> None:
    def fail_over() -> None:
        old = deployment.master_port()
        assert old is not None
        with redis.Redis(port=deployment.sentinels[0].port) as client:
            client.execute_command("SENTINEL", "FAILOVER", deployment.MASTER_NAME)
        deployment.wait_for_new_master(old)

    stream, sender_errors, receiver_errors, started = await through_a_failover(
        make_layer, sentinel_config(deployment), fail_over
    )
    check_failover(stream, receiver_errors, started, "manual failover")
    assert len(sender_errors.of(Exception, "publish")) <= 2, sender_errors.calls
    # Nothing of the layer's stays on the old master (which the sentinels turn into a
    # replica only some ten seconds later).
    port = deployment.master_port()
    old = next(server for server in deployment.servers if server.port != port)
    with redis.Redis(port=old.port) as client:
        names = [str(entry.get("name", "")) for entry in client.client_list()]
    assert not [name for name in names if name.startswith("crossws_channels:")], names


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"sentinels": []}, "sentinels"),
        ({"sentinels": ["nowhere"], "master_name": "m"}, "sentinels"),
        ({"sentinels": ["127.0.0.1:99999"], "master_name": "m"}, "sentinels"),
        ({"sentinels": ["127.0.0.1:26379"]}, "master_name"),
        ({"master_name": "m"}, "sentinels"),
        (
            {"sentinels": ["127.0.0.1:26379"], "master_name": "m", "url": "redis://x"},
            "url",
        ),
        (
            {"sentinels": ["127.0.0.1:26379"], "master_name": "m", "master_kwargs": {"port": 1}},
            "master_kwargs",
        ),
        (
            {"sentinels": ["127.0.0.1:26379"], "master_name": "m", "master_kwargs": {"bogus": 1}},
            "master_kwargs",
        ),
        ({"url": "redis://127.0.0.1", "sentinel_kwargs": {"password": "x"}}, "sentinel_kwargs"),
    ],
)
def test_bad_sentinel_settings_are_refused_naming_the_key(
    options: dict[str, Any], key: str
) -> None:
    from crossws_channels.layer import BackplaneChannelLayer

    with pytest.raises(ConfigurationError, match=rf"\['{key}'\]"):
        BackplaneChannelLayer(driver="redis", channel="bad-sentinel", **options)
