"""Prometheus metrics of crossws_channels layers (``pip install 'crossws_channels[prometheus]'``).

Every counter and size of ``layer.stats()`` becomes a ``crossws_channels_*`` metric
labelled by the layer's alias, its driver and its instance id, and its histograms (relay
lag, group fan-out) Prometheus histograms. Two ways to serve them, both in
:func:`metrics_view` (a Django view):

* this process's layers (the default): what ``prometheus_client`` does everywhere, for
  servers that each have an address Prometheus can scrape;
* ``?scope=cluster``: every live instance of the cluster, asked over the backplane by
  this process (the ping ``backplane_stats`` uses), each labelled by its instance id,
  host and pid: one scrape target for a cluster whose processes sit behind one port
  (several daphne or gunicorn workers) or come and go.

``register()`` adds this process's collector to a ``prometheus_client`` registry, for
projects that already serve one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from .layer import BackplaneChannelLayer, layer_named, live_layers

__all__ = ["LayerCollector", "cluster_metrics", "families", "metrics_view", "register"]

PREFIX = "crossws_channels"
# Sizes (what an instance holds now); every other number of stats() is a counter.
GAUGES = frozenset(
    {"channels", "queued", "receivers", "groups", "memberships", "topics", "lingering"}
)
# Counters named "<family>.<kind>": one metric per family, the kind as a label.
KIND_LABELS = {"dropped": "reason", "refused": "reason", "errors": "stage"}
# Shown as the instance's info metric, not as numbers.
INFO = ("channel", "routing")
HELP = {
    "published": "Messages relayed out (group envelopes, direct sends, worker-queue pushes).",
    "relayed_in": "Envelopes received from other instances.",
    "delivered": "Messages put into a channel of this instance.",
    "dropped": "Messages lost, by reason.",
    "refused": "Messages refused at the call, by reason.",
    "errors": "Backplane failures, by stage.",
    "lost": "Messages from other instances that never arrived (sequence gaps).",
    "instance": "The instance's cluster channel and routing.",
    "connected": "1 when the relay works (no subscribe or publish outage), else 0.",
    "subscribed": "Times the backplane subscription came up.",
    "disconnects": "Times an established subscription broke.",
    "reconnects": "Outages that ended.",
    "deaf": "Times the heartbeat found the subscription deaf (and renewed it).",
    "paused": "Times relaying paused for a full channel whose consumer reads.",
    "stalled": "Full channels that did not drain within a pause.",
    "implausible_seq": "Relayed messages with a sequence number no real sender reaches.",
    "channels": "Channels this instance holds.",
    "queued": "Messages waiting in this instance's channels.",
    "receivers": "receive() calls waiting.",
    "groups": "Groups with members on this instance.",
    "memberships": "Group memberships on this instance.",
    "topics": 'Topics listened to ("routing": "groups").',
    "lingering": "Topics no longer needed, still listened to for a few seconds.",
    "heartbeat_rtt_seconds": "Seconds the last heartbeat took to come back.",
    "relay_lag_seconds": "Seconds from a send in one process to its arrival in another.",
    "group_fanout": "Members a group message reached on an instance where it reached any.",
}

Labels = dict[str, str]


def _metric(name: str) -> str:
    return f"{PREFIX}_{name.replace('.', '_').replace('-', '_')}"


def families(instances: Iterable[tuple[Labels, Mapping[str, Any]]]) -> list[Any]:
    """Metric families for ``(labels, stats)`` pairs, one pair per instance.

    Every instance gets the same label names, so that one family holds them all.
    """
    found: dict[str, Any] = {}

    def family(key: str, kind: type[Any], names: list[str]) -> Any:
        metric = found.get(key)
        if metric is None:
            base = key.split(".", 1)[0]
            text = HELP.get(base, f"crossws_channels stats()[{base!r}].")
            metric = found[key] = kind(_metric(base), text, labels=names)
        return metric

    for labels, stats in instances:
        names = list(labels)
        values = [labels[name] for name in names]
        info = {name: str(stats[name]) for name in INFO if isinstance(stats.get(name), str)}
        family("instance", InfoMetricFamily, names).add_metric(values, info)
        connected = stats.get("connected")
        if isinstance(connected, bool):
            family("connected", GaugeMetricFamily, names).add_metric(values, float(connected))
        rtt = stats.get("heartbeat_rtt_seconds")
        if isinstance(rtt, float):
            family("heartbeat_rtt_seconds", GaugeMetricFamily, names).add_metric(values, rtt)
        for name, value in stats.items():
            if type(value) is not int:
                continue
            base, _, kind = name.partition(".")
            if name in GAUGES:
                family(name, GaugeMetricFamily, names).add_metric(values, value)
            elif kind:
                label = KIND_LABELS.get(base, "kind")
                metric = family(f"{base}.", CounterMetricFamily, [*names, label])
                metric.add_metric([*values, kind], value)
            else:
                family(name, CounterMetricFamily, names).add_metric(values, value)
        histograms = stats.get("histograms")
        for name, histogram in (histograms if isinstance(histograms, dict) else {}).items():
            try:
                buckets = [(_bound(bound), int(count)) for bound, count in histogram["buckets"]]
                total = float(histogram["sum"])
            except (KeyError, TypeError, ValueError):
                # Another instance's answer (cluster scope): its shape is not ours to trust.
                continue
            family(name, HistogramMetricFamily, names).add_metric(values, buckets, total)
    return list(found.values())


def _bound(bound: float | str) -> str:
    return "+Inf" if bound == "+Inf" else repr(float(bound))


def _labels(layer: BackplaneChannelLayer) -> Labels:
    return {
        "alias": layer.alias or "",
        "driver": layer.config.driver_name,
        "instance": layer.instance_id,
    }


class LayerCollector(Collector):
    """Collects the ``stats()`` of this process's layers at every scrape."""

    def collect(self) -> Iterator[Any]:
        layers = sorted(live_layers(), key=lambda layer: (layer.alias or "", layer.instance_id))
        yield from families((_labels(layer), layer.stats()) for layer in layers)

    def describe(self) -> Iterator[Any]:
        return iter(())  # nothing to check at registration: layers come and go


_registered: set[int] = set()


def register(registry: CollectorRegistry = REGISTRY) -> LayerCollector | None:
    """Add a :class:`LayerCollector` to ``registry`` once; the collector, if it was added."""
    if id(registry) in _registered:
        return None
    collector = LayerCollector()
    registry.register(collector)
    _registered.add(id(registry))
    return collector


async def cluster_metrics(layer: BackplaneChannelLayer, timeout: float = 1.0) -> bytes:
    """The metrics of every instance of ``layer``'s cluster that answers within
    ``timeout`` seconds, in Prometheus' text format."""
    pongs = await layer.cluster_stats(timeout)
    instances: list[tuple[Labels, Mapping[str, Any]]] = []
    for pong in pongs:
        stats = pong.info.get("stats")
        if not isinstance(stats, dict):
            continue
        labels = {
            "alias": layer.alias or "",
            "driver": str(pong.info.get("driver", "")),
            "instance": pong.instance_id,
            "host": str(pong.info.get("host", "")),
            "pid": str(pong.info.get("pid", "")),
        }
        instances.append((labels, stats))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families(instances)))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, metrics: list[Any]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        yield from self._metrics


def metrics_view(request: Any) -> Any:
    """A Django view: this process's metrics, or with ``?scope=cluster`` the cluster's
    (``&layer=ALIAS``, default ``default``; ``&timeout=SECONDS``, default 1)."""
    from asgiref.sync import async_to_sync
    from django.http import HttpResponse, HttpResponseBadRequest

    if request.GET.get("scope") == "cluster":
        alias = request.GET.get("layer", "default")
        try:
            timeout = min(10.0, max(0.1, float(request.GET.get("timeout", "1"))))
        except ValueError:
            return HttpResponseBadRequest("timeout: a number of seconds")
        layer = layer_named(alias)
        if layer is None:
            return HttpResponseBadRequest(f"no crossws_channels layer {alias!r}")
        body = async_to_sync(cluster_metrics)(layer, timeout)
    else:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(LayerCollector())
        body = generate_latest(registry)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
