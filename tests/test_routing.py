"""``"routing": "groups"``: a group_send reaches only the instances with members of the
group, on every driver with topics (local, redis, nats), over the real servers.

Each selective-delivery test runs the same scenario with broadcast routing too, where the
instance without members does hear everything: the difference is what is tested.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from typing import Any

import nats
import pytest
import redis.asyncio as redis_py

from crossws_channels import _routing
from crossws_channels._monitor import SequenceGaps
from crossws_channels.envelope import SyncMessage, encode_envelope
from crossws_channels.errors import ConfigurationError
from tests.cluster import server_options
from tests.drivers.redis.support import kill_subscriber
from tests.servers import NatsServer, RedisServer
from tests.waiting import eventually_async

ROUTED = ("local", "redis", "nats")


@pytest.fixture(params=ROUTED)
def routed(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The CONFIG of a driver with topics (its shared server), heartbeat off so that
    ``relayed_in`` counts group messages only."""
    driver = str(request.param)
    return {"driver": driver, **server_options(request, driver), "heartbeat": 0}


@pytest.fixture
def short_linger(monkeypatch: pytest.MonkeyPatch) -> float:
    """Topics let go 0.3 s after their last group left, looked at every 0.1 s."""
    monkeypatch.setattr(_routing, "LINGER", 0.3)
    monkeypatch.setattr(_routing, "SWEEP_EVERY", 0.1)
    return 0.3


async def _next(layer: Any, channel: str, *others: Any) -> dict[str, Any]:
    try:
        return dict(await asyncio.wait_for(layer.receive(channel), 5))
    except asyncio.TimeoutError:
        raise AssertionError(
            f"nothing arrived within 5 s: {layer.stats()} {[o.stats() for o in others]}"
        ) from None


async def _drain(layer: Any, channel: str, count: int) -> list[dict[str, Any]]:
    return [await _next(layer, channel) for _ in range(count)]


async def _pair(make_layer: Any, routed: dict[str, Any]) -> tuple[Any, Any]:
    """A sender and a member-to-be of one cluster with groups routing, both connected."""
    sender = make_layer(**routed, routing="groups")
    member = make_layer(**routed, routing="groups")
    await sender.new_channel()
    return sender, member


def heard(layer: Any) -> int:
    return int(layer.stats().get("relayed_in", 0))


@pytest.mark.parametrize("routing", ["groups", "broadcast"])
async def test_only_instances_with_members_hear_a_group_send(
    make_layer: Any, routed: dict[str, Any], routing: str
) -> None:
    sender = make_layer(**routed, routing=routing)
    member = make_layer(**routed, routing=routing)
    bystander = make_layer(**routed, routing=routing)
    channel = await member.new_channel()
    await member.group_add("room-a", channel)
    elsewhere = await bystander.new_channel()
    await bystander.group_add("room-b", elsewhere)
    await sender.new_channel()
    for i in range(50):
        await sender.group_send("room-a", {"type": "m", "i": i})
    assert [m["i"] for m in await _drain(member, channel, 50)] == list(range(50))
    await sender.group_send("room-b", {"type": "m", "i": -1})
    assert (await _drain(bystander, elsewhere, 1))[0]["i"] == -1
    # The bystander has read the last message, sent after the 50: what it heard of
    # room-a is all in.
    if routing == "groups":
        assert heard(bystander) == 1
        assert heard(member) == 50
        assert member.stats()["topics"] == 1
    else:
        assert heard(bystander) == 51
        await eventually_async(lambda: heard(member) == 51, what="room-b heard by the member")
    assert member.stats().get("lost", 0) == 0


async def test_a_send_right_after_group_add_is_delivered(
    make_layer: Any, routed: dict[str, Any]
) -> None:
    """group_add returns once the subscription is confirmed: a message sent at once, by
    another instance, reaches the new member (20 new groups in a row, no waiting)."""
    sender, member = await _pair(make_layer, routed)
    channel = await member.new_channel()
    for n in range(20):
        await member.group_add(f"fresh-{n}", channel)
        await sender.group_send(f"fresh-{n}", {"type": "m", "n": n})
        message = await _next(member, channel, sender)
        assert message["n"] == n
    assert member.stats()["topics"] == 20


async def test_concurrent_joins_of_one_group_all_wait_for_its_subscription(
    make_layer: Any, routed: dict[str, Any]
) -> None:
    sender, member = await _pair(make_layer, routed)
    channels = [await member.new_channel() for _ in range(10)]
    await asyncio.gather(*(member.group_add("crowd", channel) for channel in channels))
    await sender.group_send("crowd", {"type": "m"})
    for channel in channels:
        assert (await asyncio.wait_for(member.receive(channel), 5))["type"] == "m"


async def test_a_group_add_from_another_instance_subscribes_the_owner(
    make_layer: Any, routed: dict[str, Any]
) -> None:
    """The owner of the channel listens to the group's topic once the membership
    reached it (asynchronously, as the membership itself does)."""
    sender = make_layer(**routed, routing="groups")
    owner = make_layer(**routed, routing="groups")
    channel = await owner.new_channel()
    await sender.group_add("remote", channel)
    await eventually_async(lambda: owner.stats().get("topics") == 1, what="the owner subscribed")
    # The subscription is confirmed a round trip later at most.
    await asyncio.sleep(0.2)
    await sender.group_send("remote", {"type": "m"})
    assert (await asyncio.wait_for(owner.receive(channel), 5))["type"] == "m"


async def test_a_topic_is_let_go_after_its_last_member_left(
    make_layer: Any, routed: dict[str, Any], short_linger: float
) -> None:
    sender, member = await _pair(make_layer, routed)
    channel = await member.new_channel()
    await member.group_add("brief", channel)
    await sender.group_send("brief", {"type": "m"})
    await _drain(member, channel, 1)
    await member.group_discard("brief", channel)
    # Still listened to while it lingers: a member back at once costs no churn.
    assert member.stats()["topics"] == 1
    await eventually_async(lambda: member.stats()["topics"] == 0, what="the topic let go")
    probe = await member.new_channel()
    await member.group_add("probe", probe)
    before = heard(member)
    for _ in range(20):
        await sender.group_send("brief", {"type": "m"})
    # Sent on one connection after the 20: once it is here, they are past the server.
    await sender.group_send("probe", {"type": "probe"})
    await _drain(member, probe, 1)
    before += 1
    # Joined again (a new subscription): the 20 sent meanwhile were not heard, and the
    # sender's numbering, which went on, is not counted as lost.
    await member.group_add("brief", channel)
    await sender.group_send("brief", {"type": "after"})
    assert (await asyncio.wait_for(member.receive(channel), 5))["type"] == "after"
    assert heard(member) == before + 1
    assert member.stats().get("lost", 0) == 0


async def test_a_member_back_within_the_linger_keeps_the_subscription(
    make_layer: Any, routed: dict[str, Any]
) -> None:
    sender, member = await _pair(make_layer, routed)
    for n in range(5):
        channel = await member.new_channel()
        await member.group_add("page", channel)
        await sender.group_send("page", {"type": "m", "n": n})
        assert (await _next(member, channel, sender))["n"] == n
        await member.group_discard("page", channel)
    await eventually_async(lambda: member.stats()["lingering"] == 1, what="the topic lingering")
    assert member.stats()["topics"] == 1


async def test_flush_and_expiry_let_topics_go_too(
    make_layer: Any, routed: dict[str, Any], short_linger: float
) -> None:
    member = make_layer(**routed, routing="groups", group_expiry=0.2)
    channel = await member.new_channel()
    for n in range(3):
        await member.group_add(f"g{n}", channel)
    assert member.stats()["topics"] == 3
    await eventually_async(lambda: member.stats()["topics"] == 0, what="expired groups let go")
    await member.group_add("again", channel)
    await member.flush()
    await eventually_async(lambda: member.stats()["topics"] == 0, what="flushed groups let go")


async def test_partitions_share_a_topic_and_deliver_only_to_members(
    make_layer: Any, routed: dict[str, Any]
) -> None:
    config = {**routed, "routing": "groups", "routing_partitions": 2}
    sender, member, neighbour = make_layer(**config), make_layer(**config), make_layer(**config)
    # Two groups in one partition, two in the other.
    same = [g for g in (f"grp{n}" for n in range(20)) if zlib.crc32(g.encode()) % 2 == 0]
    channel = await member.new_channel()
    await member.group_add(same[0], channel)
    other = await neighbour.new_channel()
    await neighbour.group_add(same[1], other)
    await sender.new_channel()
    for _ in range(10):
        await sender.group_send(same[0], {"type": "m"})
    await sender.group_send(same[1], {"type": "last"})
    assert (await asyncio.wait_for(neighbour.receive(other), 5))["type"] == "last"
    await _drain(member, channel, 10)
    # The neighbour hears its partition (10 + 1) and delivers only its own group's.
    assert heard(neighbour) == 11
    assert neighbour.stats().get("delivered", 0) == 1
    assert neighbour.stats()["topics"] == 1


# Reaching a group's topic from outside the layer (documented names)


async def test_a_client_of_the_server_can_publish_to_a_group(
    make_layer: Any, request: pytest.FixtureRequest
) -> None:
    for driver in ("redis", "nats"):
        config = {"driver": driver, **server_options(request, driver), "routing": "groups"}
        member = make_layer(**config, channel=f"outside-{driver}-{time.time_ns()}")
        channel = await member.new_channel()
        await member.group_add("news.today", channel)
        text = encode_envelope("crossws-peer", SyncMessage("", "news.today", "hello"))
        cluster = member.config.channel
        if driver == "redis":
            async with redis_py.Redis.from_url(config["url"]) as client:
                await client.publish(f"crossws_channels:{cluster}:g.news.today", text)
        else:
            client = await nats.connect(config["url"])
            await client.publish(f"{cluster}.g.news.today", text.encode())
            await client.flush()
            await client.close()
        message = await asyncio.wait_for(member.receive(channel), 5)
        assert message["type"] == "crossws.message"
        assert message["text"] == "hello"


async def test_group_names_that_are_no_subject_are_routed_on_nats(
    make_layer: Any, nats_url: str
) -> None:
    config = {"driver": "nats", "url": nats_url, "routing": "groups"}
    sender, member = make_layer(**config), make_layer(**config)
    await sender.new_channel()
    channel = await member.new_channel()
    for group in ("trailing.", "..double", "-_ok-_"):
        await member.group_add(group, channel)
        await sender.group_send(group, {"type": "m", "g": group})
        assert (await asyncio.wait_for(member.receive(channel), 5))["g"] == group


# Outages


async def test_topics_are_subscribed_again_after_a_redis_reconnect(
    make_layer: Any, redis_server: RedisServer
) -> None:
    config = {"driver": "redis", "url": redis_server.url, "routing": "groups", "heartbeat": 0}
    sender, member = make_layer(**config), make_layer(**config)
    await sender.new_channel()
    channel = await member.new_channel()
    for n in range(30):
        await member.group_add(f"topic-{n}", channel)
    assert kill_subscriber(redis_server.url, member.instance_id) == 1
    await eventually_async(lambda: member.stats().get("reconnects") == 1, what="resubscribed")
    for n in range(30):
        await sender.group_send(f"topic-{n}", {"type": "m", "n": n})
    got = sorted(m["n"] for m in await _drain(member, channel, 30))
    assert got == list(range(30))
    async with redis_py.Redis.from_url(redis_server.url) as client:
        names = await client.pubsub_channels(f"crossws_channels:{member.config.channel}:g.*")
    assert len(names) == 30


async def test_topics_are_subscribed_again_after_a_nats_restart(make_layer: Any) -> None:
    with NatsServer() as server:
        config = {"driver": "nats", "url": server.url, "routing": "groups", "heartbeat": 0}
        sender, member = make_layer(**config), make_layer(**config)
        await sender.new_channel()
        channel = await member.new_channel()
        for n in range(10):
            await member.group_add(f"topic-{n}", channel)
        server.restart()
        await eventually_async(lambda: member.stats().get("reconnects") == 1, what="resubscribed")
        await eventually_async(lambda: sender.stats()["connected"], what="the sender back")
        await asyncio.sleep(0.5)  # the sender's client reconnects on its own schedule
        for n in range(10):
            await sender.group_send(f"topic-{n}", {"type": "m", "n": n})
        got = sorted(m["n"] for m in await _drain(member, channel, 10))
        assert got == list(range(10))


# Gap counting per topic


def test_gaps_are_counted_per_stream_and_added_up_per_sender() -> None:
    gaps = SequenceGaps()
    assert gaps.observe("a", 1, "a g.x 0") == 0
    assert gaps.observe("a", 1, "a g.y 0") == 0  # another topic: its own numbering
    assert gaps.observe("a", 2, "a g.x 0") == 0
    assert gaps.observe("a", 5, "a g.y 0") == 3
    assert gaps.observe("a", 4, "a g.x 0") == 1
    assert gaps.missing == {"a": 4}
    # Subscribed again (a new epoch): the numbering that went on is no gap.
    assert gaps.observe("a", 90, "a g.x 1") == 0


async def test_a_real_gap_on_a_topic_is_counted(make_layer: Any, redis_url: str) -> None:
    """Messages missing from one sender's numbering on a topic are counted as lost."""
    from crossws_channels._frames import Frames

    config = {"driver": "redis", "url": redis_url, "routing": "groups", "heartbeat": 0}
    member = make_layer(**config)
    channel = await member.new_channel()
    await member.group_add("numbered", channel)
    frames = Frames("rogueinst000", "")
    texts = [frames.routed("g.numbered", "numbered", json.dumps({"type": "m"})) for _ in range(10)]
    topic = f"crossws_channels:{member.config.channel}:g.numbered"
    async with redis_py.Redis.from_url(redis_url) as client:
        for index in (0, 1, 2, 6, 7, 9):  # 3, 4, 5 and 8 never sent
            await client.publish(topic, texts[index])
    await _drain(member, channel, 6)
    assert member.stats()["lost"] == 4


# Configuration


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"routing": "selective"}, "routing"),
        ({"routing": "groups", "routing_partitions": -1}, "routing_partitions"),
        ({"routing": "groups", "routing_partitions": "8"}, "routing_partitions"),
        ({"routing": "groups", "routing_partitions": 10**6}, "routing_partitions"),
        ({"routing_partitions": 8}, "routing_partitions"),
        ({"routing": "groups", "driver": "multiprocessing"}, "routing"),
        ({"routing": "groups", "driver": "pgsql", "dsn": "dbname=test"}, "routing"),
    ],
)
def test_bad_routing_settings_are_refused_naming_the_key(config: dict[str, Any], key: str) -> None:
    from crossws_channels.layer import BackplaneChannelLayer

    with pytest.raises(ConfigurationError, match=rf"\['{key}'\]"):
        BackplaneChannelLayer(**{"driver": "local", "channel": "bad-routing", **config})


async def test_a_topic_let_go_and_subscribed_again_numbers_afresh() -> None:
    """gap_key is remembered per sender and group, and changes once the group's topic
    was let go (its epoch), however often it was asked before."""
    from crossws_channels._home import Home
    from crossws_channels._registry import Registry
    from crossws_channels._reporting import Reporter, Stats
    from crossws_channels._routing import Routes

    registry = Registry(lambda channel: 100, False, 60.0, track_vanished=True)
    routes = Routes(0, registry, Reporter(None, Stats(), Home()))
    assert routes.topic_of("room") is routes.topic_of("room") == "g.room"
    routes.joined("room")
    first = routes.gap_key("sender", "room")
    assert routes.gap_key("sender", "room") == first
    assert routes.gap_key("other", "room") != first
    routes._left(["room"], now=0.0)
    await routes.sweep(now=_routing.LINGER + 1)
    assert routes.gap_key("sender", "room") != first
