"""Prometheus metrics scraped over HTTP from two real daphne processes on Redis."""

from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import DaphneServer, Processes, WSClient, http_get, project_env
from tests.waiting import eventually_async

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, by name and labels (the parser also checks the format)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in scraped.items() if n == name and wanted <= ls)


async def scrape(server: DaphneServer, query: str = "") -> str:
    response = await http_get(server.url("/metrics" + query))
    assert response.status == 200, response.body
    assert response.headers["Content-Type"].startswith("text/plain")
    return response.body


async def test_each_process_and_the_whole_cluster_are_scraped(
    processes: Processes, redis_url: str
) -> None:
    """/metrics shows the serving process's layer; ?scope=cluster every instance, each
    labelled by instance, host and pid; counters and the lag histogram move with
    traffic between the processes."""
    first, second = processes.daphnes(2, project_env("redis", redis_url=redis_url))
    alice = await WSClient.connect(first.room_url("metrics"))
    bob = await WSClient.connect(second.room_url("metrics"))
    try:
        for client in (alice, bob):
            await client.receive_type("welcome")
        own = samples(await scrape(first))
        (instance,) = {dict(ls)["instance"] for n, ls in own if n == "crossws_channels_connected"}
        assert value(own, "crossws_channels_connected", driver="redis") == 1
        assert value(own, "crossws_channels_memberships") >= 1

        def delivered(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> float:
            return value(scraped, "crossws_channels_delivered_total", instance=instance)

        before = delivered(own)
        lag_before = value(own, "crossws_channels_relay_lag_seconds_count", instance=instance)
        for n in range(10):
            await bob.send_json({"text": f"m{n}"})
        for _ in range(10):
            await alice.receive_type("message")

        async def moved() -> bool:
            now = samples(await scrape(first))
            return (
                delivered(now) >= before + 10
                and value(now, "crossws_channels_relay_lag_seconds_count", instance=instance)
                >= lag_before + 10
            )

        await eventually_async(moved, what="the counters to move", timeout=10)

        cluster = await scrape(second, "?scope=cluster&timeout=1")
        scraped = samples(cluster)
        pids = {dict(ls).get("pid") for n, ls in scraped if n == "crossws_channels_connected"}
        assert {str(first.pid), str(second.pid)} <= pids
        assert value(scraped, "crossws_channels_delivered_total", pid=str(first.pid)) >= 10
        assert re.search(r'crossws_channels_relay_lag_seconds_bucket\{[^}]*le="\+Inf"', cluster)
        bad = await http_get(second.url("/metrics?scope=cluster&layer=nope"))
        assert bad.status == 400
    finally:
        await alice.close()
        await bob.close()
