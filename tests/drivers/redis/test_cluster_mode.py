"""The redis driver on a Redis Cluster of the test's own (``"cluster": true``): sharded
pub/sub spread over the primaries, one subscribe connection per primary, worker-channel
queues on the node of their slot, and failovers followed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import redis

from crossws_channels.errors import ConfigurationError
from tests.drivers.redis.failover import check_failover, through_a_failover
from tests.servers import RedisClusterDeployment, RedisServer


@pytest.fixture
def deployment() -> Iterator[RedisClusterDeployment]:
    """Three primaries, each with a replica."""
    with RedisClusterDeployment(replicas=1) as made:
        yield made


def cluster_config(deployment: RedisClusterDeployment, **more: Any) -> dict[str, Any]:
    return {"driver": "redis", "url": deployment.url, "cluster": True, **more}


def _live(deployment: RedisClusterDeployment) -> list[RedisServer]:
    return [server for server in deployment.servers if server.process is not None]


def _primaries(deployment: RedisClusterDeployment) -> list[RedisServer]:
    found = []
    for server in _live(deployment):
        with redis.Redis(port=server.port) as client:
            if client.execute_command("ROLE")[0] == b"master":
                found.append(server)
    return found


async def test_channels_and_queues_spread_over_the_primaries(
    make_layer: Any, redis_cluster: RedisClusterDeployment
) -> None:
    config = {"driver": "redis", "url": redis_cluster.url, "cluster": True, "routing": "groups"}
    sender, member = make_layer(**config), make_layer(**config)
    await sender.new_channel()
    channel = await member.new_channel()
    groups = [f"spread-{n}" for n in range(30)]
    for group in groups:
        await member.group_add(group, channel)
    for group in groups:
        await sender.group_send(group, {"type": "m", "g": group})
    got = [(await asyncio.wait_for(member.receive(channel), 5))["g"] for _ in groups]
    assert sorted(got) == sorted(groups)
    for n in range(12):
        await sender.send(f"spread-work-{n}", {"type": "w"})
    prefix = f"crossws_channels:{quote(member.config.channel, safe='')}:"
    per_node: dict[int, tuple[int, int, int]] = {}
    for server in _primaries(redis_cluster):
        with redis.Redis(port=server.port) as client:
            shard_channels = client.execute_command("PUBSUB", "SHARDCHANNELS", prefix + "g.*")
            subscribers = [
                entry
                for entry in client.client_list()
                if entry.get("name") == f"crossws_channels:sub:{member.instance_id}"
            ]
            queues = list(client.scan_iter(match=prefix + "queue:*"))
        per_node[server.port] = (len(shard_channels), len(subscribers), len(queues))
    print("per primary (topics, subscribe connections, queues):", per_node)
    assert sum(topics for topics, _, _ in per_node.values()) == 30
    assert all(topics > 0 for topics, _, _ in per_node.values()), "a primary has no topic"
    assert all(connections == 1 for _, connections, _ in per_node.values())
    assert sum(queues for _, _, queues in per_node.values()) == 12
    assert all(queues > 0 for _, _, queues in per_node.values()), "a primary has no queue"
    for n in range(12):
        assert (await asyncio.wait_for(member.receive(f"spread-work-{n}"), 5))["type"] == "w"


@pytest.mark.parametrize("routing", ["groups", "broadcast"])
async def test_a_killed_primary_is_replaced_by_its_replica(
    make_layer: Any, deployment: RedisClusterDeployment, routing: str
) -> None:
    from crossws_channels.drivers.redis.options import WireNames

    channel = f"failover-{uuid.uuid4().hex[:8]}"
    names = WireNames.for_channel(channel, hash_tags=True)

    def kill() -> None:
        # The primary of the group's topic (or of the broadcast channel).
        key = names.topic("g.stream") if routing == "groups" else names.broadcast
        primary = deployment.primary_for(key)
        primary.stop()
        deployment.wait_for_takeover(primary.port)

    config = cluster_config(deployment, routing=routing, channel=channel)
    stream, _, errors, started = await through_a_failover(make_layer, config, kill)
    check_failover(stream, errors, started, f"primary killed, {routing} routing")


async def test_a_manual_failover_moves_the_subscriptions(
    make_layer: Any, deployment: RedisClusterDeployment
) -> None:
    def fail_over() -> None:
        # Every replica takes over from its primary, gracefully: each old primary gives
        # its shard channels up (sunsubscribe) as it becomes a replica.
        for server in _live(deployment):
            with redis.Redis(port=server.port) as client:
                if client.execute_command("ROLE")[0] == b"slave":
                    client.execute_command("CLUSTER", "FAILOVER")
        deployment.wait_until_healthy()

    config = cluster_config(deployment, routing="groups")
    stream, _, errors, started = await through_a_failover(make_layer, config, fail_over)
    check_failover(stream, errors, started, "CLUSTER FAILOVER on every replica")


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"cluster": "yes", "url": "redis://127.0.0.1:7000"}, "cluster"),
        ({"cluster": True}, "url"),
        ({"cluster": True, "url": "unix:///tmp/redis.sock"}, "url"),
        ({"cluster": True, "client": "myproject.redis.make"}, "client"),
        ({"cluster": True, "sentinels": ["127.0.0.1:26379"], "master_name": "m"}, "sentinels"),
    ],
)
def test_bad_cluster_settings_are_refused_naming_the_key(options: dict[str, Any], key: str) -> None:
    from crossws_channels.layer import BackplaneChannelLayer

    with pytest.raises(ConfigurationError, match=rf"\['{key}'\]"):
        BackplaneChannelLayer(driver="redis", channel="bad-cluster", **options)
