"""Bulk sends and cluster-wide group queries, on every driver, across instances.

``group_send_many`` must do what a ``group_send`` to each group does (each member of each
group once per group it is in, local and remote, routed or broadcast), ``send_many`` what
a ``send`` of each pair does; ``group_size``/``group_channels`` must add up what every
live instance holds, and say which instances answered when one is down.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tests.agent import AgentError
from tests.cluster import DRIVERS, Cluster

# Every driver, and the variants that change how these travel: sealed (the envelope of
# several groups is encrypted like any other), and each routing of groups to topics.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize(
        "cluster",
        [
            *DRIVERS,
            "redis+encrypted",
            "redis+groups",
            "nats+groups",
            "redis+partitions",
            "redis+cluster",
        ],
        indirect=True,
    ),
]

# Long enough for every instance's answer on any backplane, short enough for the suite.
QUERY_TIMEOUT = 0.75


def received(agent: Any, channel: str) -> list[Any]:
    return [message["n"] for message in agent.call("drain", channel, 0.5)]


def test_group_send_many_delivers_what_a_group_send_to_each_group_would(
    cluster: Cluster,
) -> None:
    """Every member of each group, on every instance, gets the message once per group it
    is in; a group nobody joined costs nothing; nothing reaches other channels; and one
    sender's group_send and group_send_many keep their order."""
    a, b, c = cluster.start(3)
    a1, b1, b2 = a.call("new_channel"), b.call("new_channel"), b.call("new_channel")
    c1 = c.call("new_channel")
    loner = c.call("new_channel")
    for agent, group, channel in [
        (a, "red", a1),
        (b, "red", b1),
        (b, "blue", b1),  # in both groups: two messages, as with two group_sends
        (b, "blue", b2),
        (c, "blue", c1),
        (c, "other", loner),
    ]:
        agent.call("group_add", group, channel)
    a.call("group_send_many", ["red", "blue", "empty", "red"], {"type": "t", "n": 1})
    c.call("group_send_many", ["blue"], {"type": "t", "n": 2, "blob": b"\x00\xff"})
    assert received(a, a1) == [1]
    assert Counter(received(b, b1)) == Counter({1: 2, 2: 1})
    # Messages of different senders have no order between them.
    assert sorted(received(b, b2)) == [1, 2]
    assert sorted(received(c, c1)) == [1, 2]
    assert received(c, loner) == []

    # A sender's group_send and group_send_many to a group arrive in the order sent.
    for n in range(3, 30):
        if n % 3:
            a.call("group_send", "blue", {"type": "t", "n": n})
        else:
            a.call("group_send_many", ["blue", "elsewhere"], {"type": "t", "n": n})
    assert received(c, c1) == list(range(3, 30))


def test_send_many_sends_each_pair_and_names_the_full_channels(cluster: Cluster) -> None:
    """Pairs for channels of this instance and of others arrive, in order per channel;
    a full channel does not stop the others and is named by MessagesDropped after; a bad
    pair sends nothing."""
    a, b = cluster.start(2, channel_capacity={"tiny.*": 1})
    mine, theirs = a.call("new_channel"), b.call("new_channel")
    tiny = a.call("new_channel", "tiny.")
    pairs = []
    for n in range(5):
        pairs += [[mine, {"type": "t", "n": n}], [theirs, {"type": "t", "n": n}]]
    a.call("send_many", pairs)
    assert received(a, mine) == list(range(5))
    assert received(b, theirs) == list(range(5))
    full = [[tiny, {"type": "t", "n": n}] for n in range(2)] + [[mine, {"type": "t", "n": 9}]]
    with pytest.raises(AgentError) as raised:
        a.call("send_many", full)
    assert raised.value.name == "MessagesDropped"
    assert tiny in str(raised.value)
    assert received(a, mine) == [9]
    assert received(a, tiny) == [0]

    # An invalid name or message anywhere in the pairs raises before any is sent.
    with pytest.raises(AgentError) as raised:
        a.call("send_many", [[mine, {"type": "t", "n": 0}], ["bad name!", {"type": "t"}]])
    assert raised.value.name == "TypeError"
    assert received(a, mine) == []


def test_group_queries_add_up_every_live_instance_and_say_who_answered(
    cluster: Cluster,
) -> None:
    """group_size and group_channels count and list the members of every instance;
    with one instance down, the others still answer, and the answer says who did."""
    a, b, c = cluster.start(3)
    members = {a: [a.call("new_channel")], b: [b.call("new_channel"), b.call("new_channel")]}
    for agent, channels in members.items():
        for channel in channels:
            agent.call("group_add", "room", channel)
    c.call("group_add", "elsewhere", c.call("new_channel"))
    everyone = sorted(members[a] + members[b])

    size = c.call("group_query", "room", False, QUERY_TIMEOUT)
    assert size["size"] == 3
    assert size["instances"] == {a.instance_id: 1, b.instance_id: 2, c.instance_id: 0}
    assert size["channels"] == []
    listed = a.call("group_query", "room", True, QUERY_TIMEOUT)
    assert (listed["size"], listed["channels"], listed["complete"]) == (3, everyone, True)
    assert c.call("group_query", "nobody", True, QUERY_TIMEOUT)["size"] == 0

    b.kill()
    after = a.call("group_query", "room", True, QUERY_TIMEOUT)
    assert after["instances"] == {a.instance_id: 1, c.instance_id: 0}
    assert (after["size"], after["channels"]) == (1, members[a])
