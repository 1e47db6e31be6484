"""``signing_keys`` and ``encryption_keys`` against a rogue publisher on the cluster's own
Redis channel and PostgreSQL notification channel: what it forges, replays or mangles is
refused, counted and reported a bounded number of times, while the cluster's own signed
traffic flows, through key rotation too."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
import redis.asyncio as redis_py

from crossws_channels import serialize
from crossws_channels._frames import Frames
from crossws_channels._reporting import REPORT_INTERVAL
from crossws_channels._sealing import (
    NUMBER_WINDOW,
    Opened,
    ReplayGuard,
    Sealer,
    Unauthenticated,
    derive_keys,
)
from crossws_channels.envelope import SyncMessage, encode_frame
from crossws_channels.errors import ConfigurationError, UnauthenticatedMessage
from tests.conftest import ErrorLog
from tests.waiting import eventually_async

OLD = "the-old-cluster-secret-0123456789"
NEW = "the-new-cluster-secret-9876543210"
ROGUE_KEY = "a-secret-the-cluster-never-had-000"


def forged(
    sender: str, topic: str, data: str, *, seq: int | None = 1, key: str | None = None
) -> str:
    """An envelope as a rogue would write it: plain, or sealed with a key of its own."""
    if key is None:
        return encode_frame(sender, SyncMessage("", topic, data), seq=seq)
    sealer = Sealer(derive_keys([key.encode()], encrypt=False), encrypt=False)
    return Frames(sender, "", sealer).frame(topic, data, seq=seq)


class Tap:
    """Everything published on one cluster's Redis channels, as a rogue reads it."""

    def __init__(self, redis_url: str, channel: str) -> None:
        self._client = redis_py.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub()
        self._channel = channel
        self.seen: list[bytes] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Tap:
        await self._pubsub.subscribe(self._channel)
        await self._pubsub.psubscribe(f"crossws_channels:{quote(self._channel, safe='')}:*")
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for item in self._pubsub.listen():
            if item["type"] in ("message", "pmessage"):
                self.seen.append(item["data"])

    def topics(self) -> list[str]:
        found = []
        for raw in self.seen:
            try:
                found.append(json.loads(raw)["msg"]["topic"])
            except (ValueError, KeyError, TypeError):
                pass
        return found

    async def publish(self, *envelopes: str | bytes, channel: str | None = None) -> None:
        for envelope in envelopes:
            await self._client.publish(channel or self._channel, envelope)

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._pubsub.aclose()
        await self._client.aclose()


async def member(layer: Any, group: str = "room") -> str:
    channel: str = await layer.new_channel()
    await layer.group_add(group, channel)
    return channel


async def receive_nothing(layer: Any, channel: str, seconds: float = 0.5) -> None:
    try:
        message = await asyncio.wait_for(layer.receive(channel), seconds)
    except asyncio.TimeoutError:
        return
    pytest.fail(f"received {message!r}")


@pytest.fixture(params=["signing_keys", "encryption_keys"])
async def signed_pair(
    request: pytest.FixtureRequest, make_layer: Any, redis_url: str, errors: ErrorLog
) -> Any:
    """Two layers on Redis sealing with ``OLD`` (signed, or encrypted); the second one's
    channel is in group ``room``."""
    config = {"driver": "redis", "url": redis_url, request.param: [OLD]}
    sender = make_layer(**config)
    receiver = make_layer(**config, on_error=errors)
    channel = await member(receiver)
    await member(sender, "warmup")
    return sender, receiver, channel


# Forgeries


@pytest.mark.redis
async def test_forged_group_messages_are_refused_and_reported_a_bounded_number_of_times(
    signed_pair: Any, redis_url: str, errors: ErrorLog
) -> None:
    sender, receiver, channel = signed_pair
    text = serialize.dumps({"type": "chat.message", "text": "forged"})
    unsigned = [forged("rogue1234567", "room", text, seq=n) for n in range(1, 301)]
    wrong_key = [forged("rogue1234567", "room", text, seq=n, key=ROGUE_KEY) for n in range(1, 201)]
    # A real envelope of the cluster's, changed (its number: the data may be encrypted)
    # with its signature kept.
    genuine = Frames("rogue1234567", "", sender._frames.sealer).broadcast("room", text)
    tampered = genuine.replace('"seq":1,', '"seq":2,')
    assert tampered != genuine
    async with Tap(redis_url, sender.config.channel) as tap:
        await tap.publish(*unsigned, *wrong_key, tampered)
    await sender.group_send("room", {"type": "chat.message", "text": "genuine"})
    received = await asyncio.wait_for(receiver.receive(channel), 5)
    assert received == {"type": "chat.message", "text": "genuine"}
    await receive_nothing(receiver, channel)
    await eventually_async(
        lambda: receiver.stats().get("dropped.unauthenticated") == 501, what="every forgery counted"
    )
    receiver._reporter.flush_due(everything=True)
    reports = errors.of(UnauthenticatedMessage, "delivery")
    assert 1 <= len(reports) <= 3, reports
    assert sum(int(str(r).split()[0]) for r in reports) == 501
    assert "unsigned" in " ".join(map(str, reports))
    assert "bad signature" in " ".join(map(str, reports))


@pytest.mark.redis
async def test_forged_membership_changes_are_refused(signed_pair: Any, redis_url: str) -> None:
    """``!add`` would put the receiver's channel in ``admins``; ``!discard`` would take it
    out of ``room``. Neither happens, signed with a foreign key or not at all."""
    sender, receiver, channel = signed_pair
    add = json.dumps(["admins", channel])
    discard = json.dumps(["room", channel])
    async with Tap(redis_url, sender.config.channel) as tap:
        await tap.publish(
            forged("rogue1234567", "!add", add, seq=None),
            forged("rogue1234567", "!add", add, seq=None, key=ROGUE_KEY),
            forged("rogue1234567", "!discard", discard, seq=None),
            forged("rogue1234567", "!discard", discard, seq=None, key=ROGUE_KEY),
            channel=f"crossws_channels:{quote(sender.config.channel, safe='')}:instance:"
            + receiver.instance_id,
        )
    await eventually_async(
        lambda: receiver.stats().get("dropped.unauthenticated") == 4, what="forgeries counted"
    )
    await sender.group_send("admins", {"type": "admin.secret"})
    await sender.group_send("room", {"type": "still.a.member"})
    assert (await asyncio.wait_for(receiver.receive(channel), 5))["type"] == "still.a.member"
    await receive_nothing(receiver, channel)


@pytest.mark.redis
async def test_a_forged_ping_gets_no_answer(signed_pair: Any, redis_url: str) -> None:
    sender, receiver, _ = signed_pair
    request = json.dumps({"token": "t0k3n", "stats": True})
    async with Tap(redis_url, sender.config.channel) as tap:
        await tap.publish(
            forged("rogue1234567", "!ping", request, seq=None),
            forged("rogue1234567", "!ping", request, seq=None, key=ROGUE_KEY),
        )
        await eventually_async(
            lambda: (
                receiver.stats().get("dropped.unauthenticated") == 2
                and sender.stats().get("dropped.unauthenticated") == 2
            ),
            what="both instances refusing both pings",
        )
        # The cluster's own ping is answered by both, over the same channels.
        pongs = await sender.ping(1.0)
        assert sorted(p.instance_id for p in pongs) == sorted(
            [sender.instance_id, receiver.instance_id]
        )
        assert tap.topics().count("!pong") == 2


@pytest.mark.redis
async def test_without_keys_a_flood_of_pings_gets_a_bounded_number_of_answers(
    make_layer: Any, redis_url: str
) -> None:
    """Without signing anyone can ping; a ping flood still makes each instance answer
    at most its burst plus its rate."""
    layer = make_layer(driver="redis", url=redis_url)
    await member(layer)
    request = json.dumps({"token": "t0k3n", "stats": True})
    async with Tap(redis_url, layer.config.channel) as tap:
        started = asyncio.get_running_loop().time()
        await tap.publish(*[forged("rogue1234567", "!ping", request, seq=None)] * 500)
        await eventually_async(
            lambda: layer.stats().get("dropped.pings", 0) + tap.topics().count("!pong") == 500,
            what="every ping answered or refused",
        )
        seconds = asyncio.get_running_loop().time() - started
    assert tap.topics().count("!pong") <= 20 + 10 * seconds + 1


# Replays


@pytest.mark.redis
async def test_a_replayed_envelope_is_delivered_once(
    signed_pair: Any, redis_url: str, errors: ErrorLog
) -> None:
    """Seconds later, within the window: the sender's number was seen."""
    sender, receiver, channel = signed_pair
    async with Tap(redis_url, sender.config.channel) as tap:
        await sender.group_send("room", {"type": "pay", "amount": 100})
        assert (await asyncio.wait_for(receiver.receive(channel), 5))["amount"] == 100
        await eventually_async(lambda: tap.topics().count("room") == 1, what="the tap")
        (captured,) = [raw for raw in tap.seen if b'"topic":"room"' in raw]
        await asyncio.sleep(2)
        await tap.publish(captured, captured)
    await receive_nothing(receiver, channel)
    await eventually_async(lambda: receiver.stats().get("dropped.replayed") == 2, what="counted")
    receiver._reporter.flush_due(everything=True)
    assert "replayed" in " ".join(map(str, errors.of(UnauthenticatedMessage)))


@pytest.mark.redis
async def test_an_envelope_older_than_the_window_is_refused_by_a_receiver_that_never_saw_it(
    make_layer: Any, redis_url: str, errors: ErrorLog
) -> None:
    config = {"driver": "redis", "url": redis_url, "signing_keys": [OLD], "replay_window": 1}
    sender = make_layer(**config)
    await member(sender, "warmup")
    async with Tap(redis_url, sender.config.channel) as tap:
        await sender.group_send("room", {"type": "pay", "amount": 100})
        await eventually_async(lambda: "room" in tap.topics(), what="the tap")
        (captured,) = [raw for raw in tap.seen if b'"topic":"room"' in raw]
        await asyncio.sleep(1.5)
        late = make_layer(**config, on_error=errors)
        channel = await member(late)
        await tap.publish(captured)
        await receive_nothing(late, channel)
    assert late.stats()["dropped.replayed"] == 1
    late._reporter.flush_due(everything=True)
    assert "outside the replay window" in str(errors.of(UnauthenticatedMessage)[0])


@pytest.mark.redis
async def test_a_worker_channel_item_pushed_again_is_delivered_once(
    signed_pair: Any, redis_url: str
) -> None:
    sender, receiver, _ = signed_pair
    key = f"crossws_channels:{quote(sender.config.channel, safe='')}:queue:jobs"
    client = redis_py.Redis.from_url(redis_url)
    try:
        await sender.send("jobs", {"type": "job", "n": 1})
        (stored,) = await client.lrange(key, 0, -1)
        assert (await asyncio.wait_for(receiver.receive("jobs"), 5))["n"] == 1
        await client.rpush(key, stored)
        tampered = stored.replace(b'"ts":', b'"ts":1')  # the data may be encrypted
        assert tampered != stored
        await client.rpush(key, tampered)
        await sender.send("jobs", {"type": "job", "n": 3})
        assert (await asyncio.wait_for(receiver.receive("jobs"), 5))["n"] == 3
        assert receiver.stats()["dropped.replayed"] == 1
        assert receiver.stats()["dropped.unauthenticated"] == 1
    finally:
        await client.aclose()


# Rotation and encryption


@pytest.mark.redis
@pytest.mark.parametrize("sealing", ["signing_keys", "encryption_keys"])
async def test_key_rotation_step_by_step_loses_nothing(
    make_layer: Any, redis_url: str, sealing: str
) -> None:
    """[old] everywhere, then [old, new] (new verifies), then [new, old] (new signs),
    then [new]: at each step every instance still hears every other."""
    base = {"driver": "redis", "url": redis_url}
    steps = [[OLD], [OLD, NEW], [NEW, OLD], [NEW]]
    # Neighbouring steps coexist during a rolling restart; each pair must interoperate.
    for before, after in itertools.pairwise(steps):
        a = make_layer(**base, **{sealing: before})
        b = make_layer(**base, **{sealing: after})
        in_a, in_b = await member(a, "both"), await member(b, "both")
        for n in range(50):
            await a.group_send("both", {"type": "m", "n": n, "from": "a"})
            await b.group_send("both", {"type": "m", "n": n, "from": "b"})
        for layer, channel in ((a, in_a), (b, in_b)):
            got = [await asyncio.wait_for(layer.receive(channel), 5) for _ in range(100)]
            assert sorted((m["from"], m["n"]) for m in got) == sorted(
                (f, n) for f in "ab" for n in range(50)
            )
            assert "dropped.unauthenticated" not in layer.stats()
        await a.close()
        await b.close()


@pytest.mark.redis
async def test_encrypted_messages_are_unreadable_on_the_wire(
    make_layer: Any, redis_url: str
) -> None:
    base = {"driver": "redis", "url": redis_url, "encryption_keys": [OLD]}
    sender = make_layer(**base)
    receiver = make_layer(**base)
    channel = await member(receiver)
    async with Tap(redis_url, sender.config.channel) as tap:
        await sender.group_send("room", {"type": "secret", "text": "attack at dawn"})
        await sender.send(channel, {"type": "secret", "bytes": b"attack at dusk"})
        await sender.send("jobs", {"type": "secret", "text": "attack at noon"})
        assert (await asyncio.wait_for(receiver.receive(channel), 5))["text"] == "attack at dawn"
        assert (await asyncio.wait_for(receiver.receive(channel), 5))["bytes"] == b"attack at dusk"
        assert (await asyncio.wait_for(receiver.receive("jobs"), 5))["text"] == "attack at noon"
        await eventually_async(lambda: len(tap.seen) >= 2, what="the tap")
    assert not any(b"attack" in raw for raw in tap.seen)
    assert "room" in tap.topics()  # names stay readable: the backplane routes on them


@pytest.mark.redis
async def test_a_signing_only_or_wrongly_keyed_instance_cannot_read_an_encrypted_cluster(
    make_layer: Any, redis_url: str
) -> None:
    sender = make_layer(driver="redis", url=redis_url, encryption_keys=[OLD])
    same_text_as_signing = make_layer(driver="redis", url=redis_url, signing_keys=[OLD])
    other_key = make_layer(driver="redis", url=redis_url, encryption_keys=[NEW])
    channels = [await member(same_text_as_signing), await member(other_key)]
    await sender.group_send("room", {"type": "secret"})
    for layer, channel in zip((same_text_as_signing, other_key), channels, strict=True):
        await receive_nothing(layer, channel)
        assert layer.stats()["dropped.unauthenticated"] >= 1


# PostgreSQL: any role that can connect can NOTIFY


@pytest.mark.pgsql
async def test_forged_notifications_are_refused_on_pgsql(
    make_layer: Any, pg_dsn: str, errors: ErrorLog
) -> None:
    base = {"driver": "pgsql", "dsn": pg_dsn, "encryption_keys": [OLD]}
    sender = make_layer(**base)
    receiver = make_layer(**base, on_error=errors)
    channel = await member(receiver)
    text = serialize.dumps({"type": "chat.message", "text": "forged"})
    with psycopg.connect(pg_dsn, autocommit=True) as rogue:
        for n in range(1, 101):
            rogue.execute(
                "SELECT pg_notify(%s, %s)",
                (sender.config.channel, forged("rogue1234567", "room", text, seq=n)),
            )
        rogue.execute(
            "SELECT pg_notify(%s, %s)",
            (
                sender.config.channel,
                forged("rogue1234567", "!add", json.dumps(["admins", channel]), seq=None),
            ),
        )
    await sender.group_send("room", {"type": "chat.message", "text": "genuine"})
    assert (await asyncio.wait_for(receiver.receive(channel), 5))["text"] == "genuine"
    await sender.group_send("admins", {"type": "admin.secret"})
    await receive_nothing(receiver, channel)
    assert receiver.stats()["dropped.unauthenticated"] == 101
    receiver._reporter.flush_due(everything=True)
    assert len(errors.of(UnauthenticatedMessage)) <= 2


# Fuzz: garbage and mutations of real sealed envelopes


def mutations(genuine: str, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    raw = genuine.encode()
    out: list[bytes] = []
    for n in range(count):
        kind = n % 6
        if kind == 0:
            out.append(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 400))))
        elif kind == 1:  # one byte changed
            at = rng.randrange(len(raw))
            out.append(raw[:at] + bytes([raw[at] ^ (1 << rng.randrange(8))]) + raw[at + 1 :])
        elif kind == 2:  # cut short
            out.append(raw[: rng.randrange(len(raw))])
        elif kind == 3:  # a signature moved onto other content
            out.append(raw.replace(b'"topic":"room"', b'"topic":"r%03d"' % rng.randrange(1000)))
        elif kind == 4:  # bytes inserted
            at = rng.randrange(len(raw))
            out.append(raw[:at] + rng.choice([b'"', b"\\", b",", b"}", b'"sig":"']) + raw[at:])
        else:  # JSON that is not an envelope, or a plain one
            out.append(
                rng.choice([b"[]", b"{}", b'{"id":1}', b"null", b'"x"', genuine[:-70].encode()])
            )
    return out


@pytest.mark.redis
@pytest.mark.parametrize("sealing", ["signing_keys", "encryption_keys"])
async def test_three_thousand_mangled_payloads_deliver_nothing_and_break_nothing(
    make_layer: Any, redis_url: str, errors: ErrorLog, sealing: str
) -> None:
    base = {"driver": "redis", "url": redis_url, sealing: [OLD]}
    sender = make_layer(**base)
    receiver = make_layer(**base, on_error=errors)
    channel = await member(receiver)
    await member(sender, "warmup")
    genuine = Frames("rogue1234567", "", sender._frames.sealer).broadcast(
        "room", serialize.dumps({"type": "forged"})
    )
    payloads = mutations(genuine, 3000, seed=13)
    started = time.monotonic()
    async with Tap(redis_url, sender.config.channel) as tap:
        await tap.publish(*payloads)
    await sender.group_send("room", {"type": "after"})
    assert (await asyncio.wait_for(receiver.receive(channel), 10))["type"] == "after"
    await receive_nothing(receiver, channel)
    stats = receiver.stats()
    refused = sum(v for k, v in stats.items() if k.startswith("dropped."))
    assert refused == 3000, stats
    receiver._reporter.flush_due(everything=True)
    # Aggregated: per kind of refusal (unauthenticated, malformed, replayed), one report
    # at once, then at most one per REPORT_INTERVAL while they keep coming, and the last
    # at the flush; never one per message, however slowly a loaded machine reads them.
    elapsed = time.monotonic() - started
    assert len(errors.calls) <= 3 * (2 + elapsed / REPORT_INTERVAL), (elapsed, errors.calls)


# The parts, without a server


def test_the_replay_guard_takes_reordered_numbers_once() -> None:
    guard = ReplayGuard(60)
    key = derive_keys([OLD.encode()], encrypt=False)[0]

    def at(number: int, timestamp: float = 1000.0) -> str | None:
        return guard.admit("sender", Opened(key, timestamp, number), now=1000.0)

    assert [at(n) for n in (5, 3, 4, 1, 2, 6)] == [None] * 6
    assert at(3) == "replayed"
    assert at(6 + NUMBER_WINDOW) is None
    assert at(6) == "replayed (too old)"
    assert at(7 + NUMBER_WINDOW, timestamp=1000.0 - 61) == "outside the replay window"
    assert at(8 + NUMBER_WINDOW, timestamp=1000.0 + 61) == "outside the replay window"


def test_the_replay_guard_forgets_expired_senders_first_when_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("crossws_channels._sealing.MAX_SENDERS", 2)
    guard = ReplayGuard(60)
    key = derive_keys([OLD.encode()], encrypt=False)[0]

    def admit(sender: str, at: float) -> str | None:
        return guard.admit(sender, Opened(key, at, 1), now=at)

    assert admit("a", 1000.0) is None
    assert admit("b", 1090.0) is None
    assert admit("c", 1100.0) is None  # full: "a" is past the window, and goes
    assert sorted(guard._senders) == ["b", "c"]
    assert admit("d", 1100.0) is None  # full, none expired: the oldest goes
    assert sorted(guard._senders) == ["c", "d"]
    # What was forgotten can't be replayed either: its timestamp is out of the window.
    assert guard.admit("a", Opened(key, 1000.0, 1), now=1100.0) == "outside the replay window"


def test_sealing_refuses_every_kind_of_mangling() -> None:
    sealer = Sealer(derive_keys([OLD.encode()], encrypt=True), encrypt=True)
    frame = Frames("abcdefghijkl", "", sealer).broadcast("room", '{"type":"x"}')
    opened = sealer.open(frame)
    assert opened.number == 1
    for bad, why in (
        (frame.replace('"seq":1', '"seq":2'), "bad signature"),
        (frame[: frame.index(',"ts"')] + "}", "unsigned"),
        (frame[:-3] + '"}', "malformed signature"),
    ):
        with pytest.raises(Unauthenticated, match=why):
            sealer.open(bad)
    other = Sealer(derive_keys([NEW.encode()], encrypt=True), encrypt=True)
    with pytest.raises(Unauthenticated, match="unknown key"):
        other.open(frame)
    data = sealer.encrypt_data("abcdefghijkl", "room", "\ud800 lone surrogate")
    assert sealer.decrypt_data(opened, "abcdefghijkl", "room", data) == "\ud800 lone surrogate"
    with pytest.raises(Unauthenticated, match="decrypted"):
        sealer.decrypt_data(opened, "abcdefghijkl", "other", data)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"signing_keys": OLD}, "signing_keys"),
        ({"signing_keys": []}, "signing_keys"),
        ({"signing_keys": ["short"]}, "signing_keys"),
        ({"encryption_keys": [OLD, 5]}, "encryption_keys"),
        ({"signing_keys": [OLD], "encryption_keys": [NEW]}, "encryption_keys"),
        ({"signing_keys": [OLD], "replay_window": 0.5}, "replay_window"),
        ({"signing_keys": [OLD], "replay_window": float("inf")}, "replay_window"),
    ],
)
def test_bad_sealing_settings_fail_at_start_up_naming_the_key(
    make_layer: Any, config: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError, match=named):
        make_layer(**config)
