"""The redis driver against a real Redis: options, relay, malformed traffic, ownership."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import valkey
import valkey.asyncio

from crossws_channels.drivers import (
    SupportsBatch,
    SupportsDirect,
    SupportsFlush,
    SupportsWorkerQueue,
)
from crossws_channels.drivers.redis import RedisDriver, WireNames
from crossws_channels.drivers.redis.connection import bounded_compat
from crossws_channels.envelope import SyncMessage, decode_envelope, encode_envelope
from crossws_channels.errors import ConfigurationError
from tests.drivers.collector import Collector
from tests.drivers.listening import listen
from tests.drivers.redis.support import (
    client_list,
    named,
    pubsub_messages,
    raw_client,
    subscribed,
    unique,
)
from tests.servers import RedisServer, free_port, wait_for_port

pytestmark = pytest.mark.redis

URL = "redis://127.0.0.1:6379/0"


_FACTORY_CLIENT_NAME = unique("factory-client")


def _make_client() -> redis.asyncio.Redis:
    """Factory used by the dotted-path option tests."""
    return redis.asyncio.Redis.from_url(
        os.environ.get("CROSSWS_REDIS_URL", URL), client_name=_FACTORY_CLIENT_NAME
    )


def _not_a_client() -> object:
    return object()


# Options


def test_url_or_client_is_required() -> None:
    """Without url or client the driver refuses to start and names the url key."""
    with pytest.raises(ConfigurationError) as info:
        RedisDriver("i", {"channel": "c"})
    assert info.value.key == "url"
    assert "client" in info.value.message


def test_url_and_client_together_are_refused() -> None:
    """Giving both url and client is a configuration error."""
    with pytest.raises(ConfigurationError) as info:
        RedisDriver("i", {"channel": "c", "url": URL, "client": redis.asyncio.Redis()})
    assert info.value.key == "url"


def test_unknown_option_is_refused_by_name() -> None:
    """A typo in an option name raises ConfigurationError naming that key."""
    with pytest.raises(ConfigurationError) as info:
        RedisDriver("i", {"channel": "c", "url": URL, "prefx": "x"})
    assert info.value.key == "prefx"


@pytest.mark.parametrize("channel", [None, "", 3])
def test_channel_must_be_a_non_empty_string(channel: object) -> None:
    """A missing, empty or non-string channel is refused at construction."""
    options: dict[str, Any] = {"url": URL}
    if channel is not None:
        options["channel"] = channel
    with pytest.raises(ConfigurationError) as info:
        RedisDriver("i", options)
    assert info.value.key == "channel"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379",
        "127.0.0.1:6379",
        "",
        "redis://h:notaport",
        "redis://h/0?socket_timeout=soon",
    ],
)
def test_bad_url_is_refused(url: str) -> None:
    """A URL redis-py can't use is refused at construction, naming the url key."""
    with pytest.raises(ConfigurationError) as info:
        RedisDriver("i", {"channel": "c", "url": url})
    assert info.value.key == "url"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://h/0?bogus_opt=1", "bogus_opt: not an option of a redis connection"),
        ("redis://h/0?socket_timeout=-5", "socket_timeout=-5.0 is out of range"),
        ("redis://h/0?socket_connect_timeout=inf", "socket_connect_timeout=inf is out of range"),
        ("redis://h/0?health_check_interval=-1", "health_check_interval=-1 is out of range"),
        ("redis://h/abc", "the database in the path must be a number, not 'abc'"),
    ],
)
def test_a_url_that_would_fail_every_connection_is_refused_at_start_up(url: str, says: str) -> None:
    """What redis-py's from_url takes but fails on at every connect (an unknown option, a
    negative timeout), or ignores (a database that is not a number), is refused when the
    layer is built, naming the setting."""
    from django.core.exceptions import ImproperlyConfigured

    from crossws_channels.layer import BackplaneChannelLayer

    with pytest.raises(ImproperlyConfigured, match=re.escape(says)) as info:
        BackplaneChannelLayer(driver="redis", channel="c", url=url)
    assert "['url']" in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/3?socket_timeout=2.5&max_connections=10&health_check_interval=2",
        "rediss://h:6380/0?ssl_check_hostname=false",
        "unix:///tmp/redis.sock?db=2",
        "redis://user:secret@h/",
        "redis://h?client_name=web",
    ],
)
def test_urls_redis_py_takes_are_still_accepted(url: str) -> None:
    """The checks refuse only what could never work."""
    RedisDriver("i", {"channel": "c", "url": url})


def test_valkey_scheme_selects_valkey_py() -> None:
    """A valkey:// URL is served by valkey-py; redis-py can't read that scheme."""
    assert (
        RedisDriver("i", {"channel": "c", "url": "valkey://127.0.0.1"}).options.connector
        == "valkey"
    )
    with pytest.raises(ConfigurationError) as info:
        RedisDriver("i", {"channel": "c", "url": "valkey://127.0.0.1", "connector": "redis"})
    assert info.value.key == "url"


def test_connector_must_be_known() -> None:
    """connector accepts only 'redis' and 'valkey'."""
    with pytest.raises(ConfigurationError) as info:
        RedisDriver("i", {"channel": "c", "url": URL, "connector": "ioredis"})
    assert info.value.key == "connector"


@pytest.mark.parametrize(
    "client",
    [redis.Redis(), valkey.Valkey()],
    ids=["redis.Redis", "valkey.Valkey"],
)
def test_sync_client_is_refused(client: Any) -> None:
    """A synchronous client is refused with a message pointing at the asyncio client."""
    with pytest.raises(ConfigurationError) as info:
        RedisDriver("i", {"channel": "c", "client": client})
    assert info.value.key == "client"
    assert "asyncio" in info.value.message


def test_cluster_client_is_refused() -> None:
    """A Redis Cluster client is refused at construction."""
    cluster = redis.asyncio.RedisCluster(host="127.0.0.1", port=6379)
    with pytest.raises(ConfigurationError) as info:
        RedisDriver("i", {"channel": "c", "client": cluster})
    assert "Cluster" in info.value.message


@pytest.mark.parametrize("client", [object(), "not.a.module.factory", 42])
def test_other_clients_are_refused(client: object) -> None:
    """Anything that is not an asyncio client (or a path to a factory of one) is refused."""
    with pytest.raises(ConfigurationError) as info:
        RedisDriver("i", {"channel": "c", "client": client})
    assert info.value.key == "client"


def test_factory_returning_something_else_is_refused() -> None:
    """A dotted-path factory must return an asyncio client."""
    with pytest.raises(ConfigurationError) as info:
        RedisDriver("i", {"channel": "c", "client": f"{__name__}._not_a_client"})
    assert info.value.key == "client"


def test_driver_offers_every_capability() -> None:
    """The layer finds direct sends, batches, worker queues and flush on the driver."""
    driver = RedisDriver("i", {"channel": "c", "url": URL})
    for capability in (SupportsDirect, SupportsBatch, SupportsWorkerQueue, SupportsFlush):
        assert isinstance(driver, capability)


def test_wire_names_are_scoped_by_channel() -> None:
    """Broadcasts use the channel name itself; keys and direct channels live under a
    prefix that no other channel's prefix can start with."""
    names = WireNames.for_channel("my-app")
    assert names.broadcast == "my-app"
    assert names.direct("abc") == "crossws_channels:my-app:instance:abc"
    assert names.queue("thumbnails") == "crossws_channels:my-app:queue:thumbnails"
    other = WireNames.for_channel("my-app:queue")
    assert not other.prefix.startswith(names.prefix)
    assert WireNames.for_channel("a*[b]").key_pattern == "crossws_channels:a%2A%5Bb%5D:*"


def test_construction_opens_nothing(redis_url: str) -> None:
    """Building the driver (outside any event loop) opens no connection."""
    instance = unique("noopen")
    RedisDriver(instance, {"channel": unique("c"), "url": redis_url})
    assert client_list(redis_url, named(instance)) == []


# Relay


async def test_broadcast_reaches_every_instance_of_the_channel_only(redis_url: str) -> None:
    """A publish reaches each subscribed instance of the channel once, and no other channel."""
    channel = unique("c")
    async with (
        subscribed(redis_url, channel) as (a, got_a),
        subscribed(redis_url, channel) as (_b, got_b),
        subscribed(redis_url, unique("other")) as (_c, got_c),
    ):
        envelope = encode_envelope(a.instance_id, SyncMessage("", "room", "hello"))
        await a.publish(envelope)
        await got_b.wait_for(lambda c: len(c.raw) == 1)
        await got_a.wait_for(lambda c: len(c.raw) == 1)
        await asyncio.sleep(0.1)
        assert got_b.raw == [envelope.encode()]
        assert got_a.raw == [envelope.encode()]  # its own echo: the layer drops it
        assert got_c.raw == []


async def test_broadcast_uses_the_channel_name_on_the_wire(redis_url: str) -> None:
    """A plain PUBLISH on the channel name (what crossws does) is delivered, and the
    driver's broadcasts are what a plain SUBSCRIBE on that name receives."""
    channel = unique("c")
    async with raw_client(redis_url) as raw, subscribed(redis_url, channel) as (driver, got):
        pubsub = raw.pubsub()
        await pubsub.subscribe(channel)
        await raw.publish(channel, "from-crossws")
        await got.wait_for(lambda c: c.raw == [b"from-crossws"])
        await driver.publish("from-django")
        assert await pubsub_messages(pubsub, 2) == [b"from-crossws", b"from-django"]
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def test_direct_send_reaches_only_its_target(redis_url: str) -> None:
    """publish_to reaches the named instance and no other instance."""
    channel = unique("c")
    async with (
        subscribed(redis_url, channel) as (a, got_a),
        subscribed(redis_url, channel) as (b, got_b),
        subscribed(redis_url, channel) as (_c, got_c),
    ):
        await a.publish_to(b.instance_id, "for-b")
        await got_b.wait_for(lambda c: c.raw == [b"for-b"])
        await asyncio.sleep(0.1)
        assert got_a.raw == []
        assert got_c.raw == []


async def test_subscribe_returns_once_listening(redis_url: str) -> None:
    """A message published right after subscribe() returns is received."""
    channel = unique("c")
    async with (
        subscribed(redis_url, channel) as (a, _),
        subscribed(redis_url, channel) as (_b, got),
    ):
        await a.publish("first")
        await got.wait_for(lambda c: c.raw == [b"first"])


async def test_batch_keeps_order_and_targets(redis_url: str) -> None:
    """publish_batch delivers broadcasts and direct sends in the order given."""
    channel = unique("c")
    async with (
        subscribed(redis_url, channel) as (a, got_a),
        subscribed(redis_url, channel) as (b, got_b),
    ):
        batch = [(None if i % 3 else b.instance_id, f"m{i}") for i in range(300)]
        await a.publish_batch(batch)
        await a.publish_batch([])
        await got_b.wait_for(lambda c: len(c.raw) == 300)
        assert got_b.raw == [f"m{i}".encode() for i in range(300)]
        await got_a.wait_for(lambda c: len(c.raw) == 200)
        assert got_a.raw == [f"m{i}".encode() for i in range(300) if i % 3]


class _CountingConnection(redis.asyncio.Connection):
    """A real connection that counts the writes it makes to the socket."""

    writes = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).writes += 1
        await super().send_packed_command(command, check_health)


async def test_batch_is_one_round_trip(redis_url: str) -> None:
    """publish_batch writes a whole batch with one network write, not one per message."""
    pool = redis.asyncio.ConnectionPool.from_url(redis_url, connection_class=_CountingConnection)
    client = redis.asyncio.Redis(connection_pool=pool)
    channel = unique("c")
    driver = RedisDriver(unique("i"), {"channel": channel, "client": client})
    try:
        await driver.publish("warm-up")  # connects: the handshake's writes don't count
        before = _CountingConnection.writes
        await driver.publish_batch([(None, f"m{i}") for i in range(100)])
        assert _CountingConnection.writes - before == 1
    finally:
        await driver.close()
        await client.aclose()
        await pool.disconnect()


async def test_non_ascii_and_binary_envelopes_survive(redis_url: str) -> None:
    """Envelope text arrives byte for byte, whatever characters and binary data it holds."""
    channel = unique("c")
    async with (
        subscribed(redis_url, channel) as (a, _),
        subscribed(redis_url, channel) as (_b, got),
    ):
        text = encode_envelope("x", SyncMessage("ns", "tópico", "žluťoučký 🐎 \u2028"))
        binary = encode_envelope("x", SyncMessage("", "t", bytes(range(256))))
        await a.publish(text)
        await a.publish(binary)
        await got.wait_for(lambda c: len(c.raw) == 2)
        assert [decode_envelope(raw) for raw in got.raw] == [
            decode_envelope(text),
            decode_envelope(binary),
        ]


async def test_refused_publishes_raise_and_the_rest_go_through(redis_server: RedisServer) -> None:
    """A PUBLISH Redis refuses (here an ACL without the channel) raises out of publish_to
    and publish_batch, the other messages of the batch are relayed, and the connection
    keeps working."""
    async with raw_client(redis_server.url) as raw:
        rules = ["on", "nopass", "resetchannels", "&allowed-*", "~*", "+@all"]
        await raw.execute_command("ACL", "SETUSER", "limited", *rules)  # type: ignore[no-untyped-call]
        channel = unique("allowed")
        url = f"redis://limited:x@127.0.0.1:{redis_server.port}/0"
        driver = RedisDriver(unique("i"), {"channel": channel, "url": url})
        pubsub = raw.pubsub()
        await pubsub.subscribe(channel)
        try:
            with pytest.raises(redis.exceptions.NoPermissionError, match="channels"):
                await driver.publish_to("elsewhere", "refused")
            with pytest.raises(redis.exceptions.NoPermissionError, match="channels"):
                await driver.publish_batch([(None, "a"), ("elsewhere", "b"), (None, "c")])
            await driver.publish("d")
            assert await pubsub_messages(pubsub, 3) == [b"a", b"c", b"d"]
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await driver.close()


async def test_relays_the_same_without_hiredis(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without hiredis every connection is read reply by reply through the client
    library, with the same results."""
    monkeypatch.setattr("crossws_channels.drivers.redis.resp._hiredis_reader", lambda _error: None)
    channel = unique("c")
    async with (
        subscribed(redis_url, channel) as (a, _),
        subscribed(redis_url, channel) as (_b, got),
    ):
        await a.publish_batch([(None, f"m{i}") for i in range(500)])
        await got.wait_for(lambda c: len(c.raw) == 500)
        assert got.raw == [f"m{i}".encode() for i in range(500)]
        assert await a.queue_push("w", "job", 5, time.time() + 5)
        assert await a.queue_pop("w", 1) == "job"
        await a.flush()


# Malformed traffic


async def test_malformed_traffic_is_handed_over_and_the_subscriber_lives_on(redis_url: str) -> None:
    """Random bytes, truncated JSON, wrong types and a 20 MB payload are delivered as they
    came (the layer drops them), and a valid envelope published after them still arrives."""
    channel = unique("c")
    garbage = [
        os.urandom(512),
        b"\xff\xfe\x00\x80 not utf-8",
        b'{"id":"x","msg":{"namespace":"","topic":"t","binary":false,"da',
        b'{"id":5,"msg":[]}',
        b"",
        b"\r\n*3\r\n$7\r\nmessage\r\n",
        b"x" * (20 * 1024 * 1024),
    ]
    async with raw_client(redis_url) as raw, subscribed(redis_url, channel) as (_driver, got):
        for payload in garbage:
            await raw.publish(channel, payload)
        valid = encode_envelope("other", SyncMessage("", "t", "still alive"))
        await raw.publish(channel, valid)
        await got.wait_for(lambda c: len(c.raw) == len(garbage) + 1, timeout=20)
        assert got.raw == [*garbage, valid.encode()]
        assert got.lost == []


async def test_a_raising_deliver_does_not_stop_the_listener(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Even a deliver that breaks its promise and raises leaves the subscription running."""

    class Exploding(Collector):
        def __call__(self, raw: str | bytes, /) -> None:
            super().__call__(raw)
            if raw == b"boom":
                raise RuntimeError("boom")

    channel = unique("c")
    driver = RedisDriver(unique("i"), {"channel": channel, "url": redis_url})
    got = Exploding()
    try:
        await listen(driver, got)
        await driver.publish("boom")
        await driver.publish("after")
        await got.wait_for(lambda c: c.raw == [b"boom", b"after"])
    finally:
        await driver.close()
    assert "deliver raised" in caplog.text


# Clients and connectors


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"decode_responses": True}, {"protocol": 3}, {"socket_timeout": None}],
    ids=["default", "decode_responses", "resp3", "no-timeouts"],
)
async def test_passed_client_works_and_stays_open(redis_url: str, kwargs: dict[str, Any]) -> None:
    """A client object the user passes relays both ways, whatever its decoding or protocol
    settings, and is still usable after the driver closed."""
    channel = unique("c")
    client = redis.asyncio.Redis.from_url(redis_url, **kwargs)
    instance = unique("passed")
    driver = RedisDriver(instance, {"channel": channel, "client": client})
    try:
        async with subscribed(redis_url, channel) as (_other, got_other):
            got = Collector()
            await listen(driver, got)
            await driver.publish("from-passed")
            await got_other.wait_for(lambda c: c.raw == [b"from-passed"])
            await client.publish(channel, b"\xff garbage")
            await driver.publish("after-garbage")
            await got.wait_for(
                lambda c: c.raw == [b"from-passed", b"\xff garbage", b"after-garbage"]
            )
        await driver.close()
        assert await client.ping()
        assert client_list(redis_url, named(f"crossws_channels:sub:{instance}")) == []
    finally:
        await driver.close()
        await client.aclose()


async def test_factory_client_settings_are_used_and_closed(redis_url: str) -> None:
    """A dotted-path factory's client belongs to the driver; its settings (here its
    client name) shape the driver's connections, and close() leaves none open."""
    channel = unique("c")
    instance = unique("factory")
    driver = RedisDriver(instance, {"channel": channel, "client": f"{__name__}._make_client"})
    assert driver.options.owns_client
    got = Collector()
    try:
        await listen(driver, got)
        await driver.publish("via-factory")
        await got.wait_for(lambda c: c.raw == [b"via-factory"])
        assert len(client_list(redis_url, named(_FACTORY_CLIENT_NAME))) == 1
    finally:
        await driver.close()
    assert client_list(redis_url, named(_FACTORY_CLIENT_NAME)) == []
    assert client_list(redis_url, named(instance)) == []


async def test_valkey_client_works(redis_url: str) -> None:
    """A valkey-py asyncio client is detected and relays like a redis-py one."""
    channel = unique("c")
    client = valkey.asyncio.Valkey.from_url(redis_url)
    driver = RedisDriver(unique("i"), {"channel": channel, "client": client})
    assert driver.options.connector == "valkey"
    try:
        async with subscribed(redis_url, channel) as (other, got_other):
            got = Collector()
            await listen(driver, got)
            await driver.publish("from-valkey")
            await other.publish_to(driver.instance_id, "to-valkey")
            await got_other.wait_for(lambda c: c.raw == [b"from-valkey"])
            await got.wait_for(lambda c: c.raw == [b"from-valkey", b"to-valkey"])
            assert await driver.queue_push("w", "job", 5, time.time() + 5)
            assert await driver.queue_pop("w", 1) == "job"
    finally:
        await driver.close()
        await client.aclose()


async def test_valkey_connector_from_url(redis_url: str) -> None:
    """connector='valkey' builds the driver's own client with valkey-py."""
    channel = unique("c")
    driver = RedisDriver(unique("i"), {"channel": channel, "url": redis_url, "connector": "valkey"})
    assert type(driver._client).__module__.startswith("valkey")
    got = Collector()
    try:
        await listen(driver, got)
        await driver.publish("hi")
        await got.wait_for(lambda c: c.raw == [b"hi"])
    finally:
        await driver.close()


@pytest.fixture
def unix_socket_redis() -> Iterator[str]:
    """A private redis-server listening on a unix socket; yields its unix:// URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    directory = Path(tempfile.mkdtemp(prefix="crossws-redis-unix-"))
    socket_path = directory / "redis.sock"
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--unixsocket",
            str(socket_path),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"unix://{socket_path}?db=0"
    finally:
        process.kill()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


async def test_unix_socket_url(unix_socket_redis: str) -> None:
    """A unix:// URL works for relaying and worker queues."""
    channel = unique("c")
    async with subscribed(unix_socket_redis, channel) as (a, got):
        await a.publish("over-unix")
        await got.wait_for(lambda c: c.raw == [b"over-unix"])
        assert await a.queue_push("w", "job", 5, time.time() + 5)
        assert await a.queue_pop("w", 1) == "job"


# Internals


async def test_bounded_compat_times_out_and_lets_cancellation_through() -> None:
    """The Python 3.10 stand-in for asyncio.timeout raises TimeoutError when its block
    overruns, stays silent when it does not, and leaves a cancellation from outside a
    cancellation."""
    with pytest.raises(TimeoutError):
        async with bounded_compat(0.05):
            await asyncio.sleep(1)
    async with bounded_compat(1):
        await asyncio.sleep(0.01)

    async def wait_long() -> None:
        async with bounded_compat(5):
            await asyncio.sleep(10)

    task = asyncio.ensure_future(wait_long())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# Lifecycle


async def test_close_releases_every_connection_it_opened(redis_url: str) -> None:
    """After close() no connection the driver opened (subscribe, pops, commands) is left."""
    instance = unique("close")
    async with subscribed(redis_url, unique("c"), instance) as (driver, _):
        await driver.publish("x")
        await asyncio.gather(*(driver.queue_pop(f"w{i}", 0.2) for i in range(3)))
        assert len(client_list(redis_url, named(instance))) >= 5
    assert client_list(redis_url, named(instance)) == []


async def test_close_is_idempotent_and_final(redis_url: str) -> None:
    """close() may be called twice; the driver refuses work afterwards."""
    driver = RedisDriver(unique("i"), {"channel": unique("c"), "url": redis_url})
    await listen(driver, Collector())
    await driver.close()
    await driver.close()
    with pytest.raises(RuntimeError):
        await driver.publish("x")
    with pytest.raises(RuntimeError):
        await listen(driver, Collector())


async def test_a_closed_driver_refuses_to_listen(redis_url: str) -> None:
    """listen() after close() is a programming error, raised at once."""
    driver = RedisDriver(unique("closed"), {"channel": unique("c"), "url": redis_url})
    await driver.close()
    with pytest.raises(RuntimeError):
        await driver.listen(Collector(), lambda: None)


async def test_close_during_subscribe_leaves_nothing_open(redis_url: str) -> None:
    """Cancelling a listen() in progress and closing leaves no connection behind."""
    instance = unique("cancel")
    driver = RedisDriver(instance, {"channel": unique("c"), "url": redis_url})
    task = asyncio.ensure_future(listen(driver, Collector()))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await driver.close()
    assert client_list(redis_url, named(instance)) == []


async def test_unreachable_redis_fails_subscribe_and_publish() -> None:
    """With nothing listening, subscribe() and publish() raise (the layer retries/reports)."""
    url = f"redis://127.0.0.1:{free_port()}/0?socket_connect_timeout=1"
    driver = RedisDriver(unique("i"), {"channel": unique("c"), "url": url})
    try:
        with pytest.raises(Exception, match=r"(?i)connect"):
            await listen(driver, Collector())
        with pytest.raises(Exception, match=r"(?i)connect"):
            await driver.publish("x")
        with pytest.raises(Exception, match=r"(?i)connect"):
            await driver.publish_batch([(None, "a"), (None, "b")])
    finally:
        await driver.close()
