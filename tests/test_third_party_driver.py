"""The driver shown in docs/writing-a-driver.md works as printed."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from tests.conftest import ErrorLog
from tests.servers import RedisServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "tests" / "typing" / "third_party_driver.py"
DRIVER = "tests.typing.third_party_driver.TinyRedisDriver"


def test_the_docs_show_exactly_the_tested_code() -> None:
    """The page's code block is this file, byte for byte."""
    page = (ROOT / "docs" / "writing-a-driver.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.DOTALL)
    assert EXAMPLE.read_text() in blocks


def test_its_options_are_validated_at_start_up() -> None:
    """A bad url or an unknown key fails when the layer is built."""
    from crossws_channels.layer import BackplaneChannelLayer

    with pytest.raises(ImproperlyConfigured, match=r"\['url'\] must be a redis:// URL"):
        BackplaneChannelLayer(driver=DRIVER, channel="x", url="http://nope")
    with pytest.raises(ImproperlyConfigured, match=r"\['host'\]: unknown key"):
        BackplaneChannelLayer(driver=DRIVER, channel="x", url="redis://127.0.0.1", host="x")


@pytest.mark.redis
async def test_it_relays_groups_and_direct_sends(make_layer: Any, redis_url: str) -> None:
    """Two instances relay groups and direct sends through the example driver."""
    a = make_layer(driver=DRIVER, url=redis_url)
    b = make_layer(driver=DRIVER, url=redis_url)
    theirs = await b.new_channel()
    await b.group_add("room", theirs)
    await a.new_channel()  # subscribe A as well
    await a.group_send("room", {"type": "hello", "blob": b"\x00\xff"})
    assert await asyncio.wait_for(b.receive(theirs), 2) == {"type": "hello", "blob": b"\x00\xff"}
    # Without publish_to, a direct send is broadcast and only the owner keeps it.
    await a.send(theirs, {"type": "direct"})
    assert await asyncio.wait_for(b.receive(theirs), 2) == {"type": "direct"}
    await asyncio.sleep(0.1)
    assert a.stats()["queued"] == 0


@pytest.mark.redis
@pytest.mark.slow
async def test_it_comes_back_after_a_redis_restart(
    make_layer: Any, redis_server: RedisServer, errors: ErrorLog
) -> None:
    """The page's driver has no reconnect code, and relays again after Redis restarted,
    as a built-in driver does: its listen() ends with the connection (or redis-py's own
    retries carry it over), and the layer listens again, reporting the outage once."""
    a = make_layer(driver=DRIVER, url=redis_server.url)
    b = make_layer(driver=DRIVER, url=redis_server.url, on_error=errors)
    theirs = await b.new_channel()
    await b.group_add("room", theirs)
    await a.group_send("room", {"type": "before"})
    assert await asyncio.wait_for(b.receive(theirs), 2) == {"type": "before"}
    redis_server.stop()
    await asyncio.sleep(1.0)  # down for a while: the subscription breaks
    await asyncio.to_thread(redis_server.start)

    async def relayed() -> bool:
        await a.group_send("room", {"type": "after"})
        try:
            return await asyncio.wait_for(b.receive(theirs), 0.2) == {"type": "after"}
        except asyncio.TimeoutError:
            return False

    deadline = asyncio.get_running_loop().time() + 15
    while not await relayed():
        assert asyncio.get_running_loop().time() < deadline, "not relaying after the restart"
    assert len([e for e, stage in errors.calls if stage == "subscribe"]) <= 1
