"""Histograms in stats(), the envelope's send time, and the Prometheus export."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from crossws_channels._histograms import Histogram
from crossws_channels.envelope import SyncMessage, decode_envelope, encode_envelope, encode_frame
from crossws_channels.prometheus import LayerCollector, cluster_metrics, families


def test_a_histogram_counts_per_bucket_cumulatively() -> None:
    """Each observation lands in the first bucket whose bound is at least it; the
    snapshot is cumulative, as Prometheus has it, with +Inf last."""
    histogram = Histogram((1, 5))
    for value in (0, 1, 2, 5, 6, 100):
        histogram.observe(value)
    snapshot = histogram.snapshot()
    assert snapshot["buckets"] == [[1, 2], [5, 4], ["+Inf", 6]]
    assert (snapshot["count"], snapshot["sum"]) == (6, 114)


def test_the_send_time_is_a_key_crossws_ignores() -> None:
    """ "ts" is appended after the seed's keys, in microseconds, and read back in seconds;
    the envelope without it is what crossws encodes."""
    msg = SyncMessage("", "room", "{}")
    text = encode_frame("abcdefghijkl", msg, seq=3, sent=1_700_000_000_123_456)
    assert text.startswith(encode_envelope("abcdefghijkl", msg)[:-1])
    assert json.loads(text)["ts"] == 1_700_000_000_123_456
    envelope = decode_envelope(text)
    assert envelope is not None and envelope.sent == 1_700_000_000.123456
    for bad in ('"x"', "-5", "1.5", "true"):
        forged = decode_envelope(text.replace("1700000000123456", bad))
        assert forged is not None and forged.sent is None


async def test_relay_lag_and_fanout_are_observed(make_layer: Any) -> None:
    """A relayed group message and a direct send are each observed once in the
    receiver's lag histogram; the fan-out histogram counts the members reached."""
    sender, receiver = make_layer(), make_layer()
    members = [await receiver.new_channel() for _ in range(3)]
    for channel in members:
        await receiver.group_add("room", channel)
    await sender.group_send("room", {"type": "x"})
    await sender.send(members[0], {"type": "direct"})
    for channel in members:
        await asyncio.wait_for(receiver.receive(channel), 2)
    await asyncio.wait_for(receiver.receive(members[0]), 2)
    histograms = receiver.stats()["histograms"]
    lag = histograms["relay_lag_seconds"]
    assert lag["count"] == 2 and 0 <= lag["sum"] < 2
    fanout = {str(b): n for b, n in histograms["group_fanout"]["buckets"]}
    assert (fanout["2"], fanout["5"], fanout["+Inf"]) == (0, 1, 1)
    # The sender reached nobody locally: nothing observed there.
    assert sender.stats()["histograms"]["group_fanout"]["count"] == 0


def parse(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_counters_gauges_and_kinds_become_metric_families() -> None:
    """Plain counters, "family.kind" counters (a label), sizes, connected, info and
    histograms each become one family for every instance."""
    stats = {
        "instance_id": "x",
        "driver": "redis",
        "channel": "app",
        "routing": "broadcast",
        "connected": True,
        "published": 4,
        "dropped.full": 2,
        "errors.publish": 1,
        "channels": 3,
        "lost_by_sender": {"y": 1},
        "histograms": {"group_fanout": {"buckets": [[1, 1], ["+Inf", 2]], "sum": 3, "count": 2}},
    }
    other = {**stats, "published": 6, "connected": False}
    registry = CollectorRegistry(auto_describe=False)

    class Fixed:
        def collect(self) -> Any:
            return families([({"instance": "a"}, stats), ({"instance": "b"}, other)])

    registry.register(Fixed())  # type: ignore[arg-type]
    found = parse(generate_latest(registry).decode())
    published = {s.labels["instance"]: s.value for s in found["crossws_channels_published"].samples}
    assert published == {"a": 4, "b": 6}
    (dropped, *_) = found["crossws_channels_dropped"].samples
    assert dropped.labels == {"instance": "a", "reason": "full"} and dropped.value == 2
    assert found["crossws_channels_errors"].samples[0].labels["stage"] == "publish"
    assert found["crossws_channels_channels"].type == "gauge"
    assert [s.value for s in found["crossws_channels_connected"].samples] == [1.0, 0.0]
    info = found["crossws_channels_instance_info"].samples[0].labels
    assert (info["channel"], info["routing"]) == ("app", "broadcast")
    assert found["crossws_channels_group_fanout"].type == "histogram"
    assert not any("lost_by_sender" in name for name in found)
    # A malformed answer from another instance loses its histograms, not the scrape.
    odd = {**stats, "histograms": {"group_fanout": {"buckets": "no"}, "other": 3}}
    assert any(f.name == "crossws_channels_published" for f in families([({"i": "c"}, odd)]))
    assert families([({"i": "d"}, {**stats, "histograms": [1]})])


async def test_this_process_and_the_cluster_are_exported(make_layer: Any) -> None:
    """The collector shows every live layer of the process; cluster_metrics every
    instance that answers a ping, labelled by host and pid."""
    a, b = make_layer(), make_layer()
    await b.group_add("room", await b.new_channel())
    await a.group_send("room", {"type": "x"})
    await asyncio.sleep(0.1)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LayerCollector())
    local = parse(generate_latest(registry).decode())
    instances = {s.labels["instance"] for s in local["crossws_channels_connected"].samples}
    assert {a.instance_id, b.instance_id} <= instances
    cluster = parse((await cluster_metrics(a, 0.3)).decode())
    answered = {
        s.labels["instance"]: s.labels for s in cluster["crossws_channels_connected"].samples
    }
    assert set(answered) == {a.instance_id, b.instance_id}
    assert all(labels["pid"] and labels["host"] for labels in answered.values())


async def test_recent_reports_and_the_heartbeat_round_trip_are_in_stats(make_layer: Any) -> None:
    """What the status page shows beyond the counters: the last reports, by stage, and
    the last heartbeat's round trip."""
    layer = make_layer(capacity=1, heartbeat=0.05)
    member = await layer.new_channel()
    await layer.group_add("room", member)
    for n in range(3):  # nobody reads: the second and third are dropped and reported
        await layer.group_send("room", {"type": "x", "n": n})
    (report, *_) = layer.stats()["recent_reports"]
    assert (report["stage"], report["error"]) == ("delivery", "MessagesDropped")
    assert "room" in report["message"] and report["time"] > 0
    for _ in range(100):
        if "heartbeat_rtt_seconds" in layer.stats():
            break
        await asyncio.sleep(0.02)
    assert 0 <= layer.stats()["heartbeat_rtt_seconds"] < 1
