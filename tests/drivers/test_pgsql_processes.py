"""BackplaneChannelLayer with the pgsql driver across real OS processes.

Each test starts agent processes (:mod:`tests.agent`), each holding one layer, and drives
them with JSON lines over stdin/stdout; the assertions run here. The agents configure
Django with the test PostgreSQL database as its ``default`` database, so a test can open a
real Django transaction around a ``group_send``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.agent import Agent, AgentError

pytestmark = [pytest.mark.pgsql, pytest.mark.slow]


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
        batch = [Agent(config, database=pg_dsn) for _ in range(count)]
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
