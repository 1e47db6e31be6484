"""BackplaneChannelLayer with the pgsql driver across real OS processes.

Each test starts agent processes (:mod:`tests.agent`), each holding one layer, and drives
them with JSON lines over stdin/stdout; the assertions run here. The agents configure
Django with the test PostgreSQL database as its ``default`` database, so a test can open a
real Django transaction around a ``group_send``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.agent import Agent

pytestmark = [pytest.mark.pgsql, pytest.mark.slow]


@pytest.fixture
def agents(pg_dsn: str) -> Iterator[Any]:
    """``agents(n, **config)`` starts n agents of one pgsql cluster and returns them ready;
    afterwards it stops them and drops the tables of every channel used."""
    from tests.drivers.pgsql.support import drop_tables

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
    from tests.drivers.pgsql.support import unique as make

    return make(prefix)


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
