"""B: latency, ping-pong between two processes.

The pinger sends a message and waits for the answer before sending the next, ``pings``
times after ``warm_pings`` uncounted ones; one-way latency is half of each round trip.
Through ``group_send`` each process's channel is the single member of its own group;
through ``send`` each sends to the other's channel directly. Raw subjects do the same with
PUBLISH/NOTIFY on a name each process listens on. ``lost`` counts measured pings that got
no answer within ``REPLY_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from .env import Env
from .plan import Case, Layout, Sizes
from .procs import Role, Sync, run_roles
from .raw import RawLink, open_link
from .report import Metric, percentile
from .subjects import CROSS_PROCESS_LAYERS, ROUTED, close_layer, open_layer, short
from .tally import message, raw_payload

RAW = ("raw-redis", "raw-pg", "raw-nats")
PINGER, PONGER = 0, 1
REPLY_TIMEOUT = 5.0
# A warm-up ping may be lost while a layer is still subscribing: don't wait long for it.
WARM_REPLY_TIMEOUT = 1.0


class _LayerEnd:
    """One side of the ping-pong over a channel layer."""

    def __init__(self, spec: dict[str, Any], env: Env, slot: int) -> None:
        self.key = spec["subject"]
        self.mode = spec["mode"]
        self.scope = spec["scope"]
        self.slot = slot
        self.layer = open_layer(self.key, env, self.scope)
        self.channel = ""
        self.target = ""

    async def setup(self, sync: Sync) -> None:
        self.channel = await self.layer.new_channel()
        await self.layer.group_add(f"{self.scope}-g{self.slot}", self.channel)
        sync.publish_name(self.slot, self.channel)
        other = 1 - self.slot
        self.target = await sync.name_of(other)

    async def send(self, seq: int) -> None:
        if self.mode == "group_send":
            await self.layer.group_send(f"{self.scope}-g{1 - self.slot}", message(seq))
        else:
            await self.layer.send(self.target, message(seq))

    async def next(self) -> int:
        received = await self.layer.receive(self.channel)
        seq: int = received["seq"]
        return seq

    async def close(self) -> None:
        await close_layer(self.key, self.layer)


class _RawEnd:
    """One side of the ping-pong over the raw transport."""

    def __init__(self, spec: dict[str, Any], env: Env, slot: int) -> None:
        self.link: RawLink = open_link(spec["subject"], env)
        self.mine = f"{spec['scope']}-{slot}"
        self.target = f"{spec['scope']}-{1 - slot}"
        self.inbox: asyncio.Queue[int] = asyncio.Queue()

    async def setup(self, sync: Sync) -> None:
        await self.link.listen(self.mine, lambda raw: self.inbox.put_nowait(json.loads(raw)["seq"]))

    async def send(self, seq: int) -> None:
        await self.link.send(self.target, raw_payload(seq))

    async def next(self) -> int:
        return await self.inbox.get()

    async def close(self) -> None:
        await self.link.close()


def _end(spec: dict[str, Any], env: Env, slot: int) -> _LayerEnd | _RawEnd:
    if spec["subject"].startswith("raw-"):
        return _RawEnd(spec, env, slot)
    return _LayerEnd(spec, env, slot)


async def _pinger(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    end = _end(spec, env, PINGER)
    await end.setup(sync)
    await sync.line_up()
    warm, pings = spec["warm"], spec["pings"]
    trips: list[float] = []
    lost = 0
    for seq in range(warm + pings):
        began = time.monotonic()
        await end.send(seq)
        try:
            limit = WARM_REPLY_TIMEOUT if seq < warm else REPLY_TIMEOUT
            while await asyncio.wait_for(end.next(), limit) != seq:
                pass  # a late answer to a ping that timed out
        except asyncio.TimeoutError:
            if seq >= warm:
                lost += 1
            continue
        if seq >= warm:
            trips.append(time.monotonic() - began)
    sync.sent.value = warm + pings
    await end.close()
    return {"trips": trips, "lost": lost}


async def _ponger(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    end = _end(spec, env, PONGER)
    await end.setup(sync)

    async def answer() -> None:
        while True:
            await end.send(await end.next())

    task = asyncio.create_task(answer())
    await sync.line_up()
    while sync.sent.value < 0 and not task.done():  # noqa: ASYNC110 (shared memory)
        await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await end.close()
    return {}


class ScenarioB:
    name = "B"
    title = "latency, ping-pong between two processes (one-way = round trip / 2)"
    trials: int | None = None

    def cases(self, sizes: Sizes) -> list[Case]:
        return [
            Case("group_send", {"mode": "group_send"}, CROSS_PROCESS_LAYERS + ROUTED + RAW),
            Case("send", {"mode": "send"}, CROSS_PROCESS_LAYERS + RAW),
        ]

    def layout(self, case: Case) -> Layout:
        return Layout(
            metrics=(
                Metric("p50", "p50 µs", better="lower"),
                Metric("p99", "p99 µs", better="lower"),
            ),
            primary="p50",
            counts=("lost",),
            ratio_peers=(
                "raw-redis",
                "raw-pg",
                "raw-nats",
                "redis-pubsub",
                "redis-core",
                "channels-postgres",
                "channels-nats",
            ),
        )

    def run(self, case: Case, subject: str, env: Env, sizes: Sizes, trial: int) -> dict[str, float]:
        spec = {
            "subject": subject,
            "scope": env.scope("b", case.params["mode"][0], short(subject), trial),
            "mode": case.params["mode"],
            "warm": sizes.warm_pings,
            "pings": sizes.pings,
        }
        results = run_roles(
            [Role("pinger", _pinger, spec), Role("ponger", _ponger, spec, lingers=True)],
            env,
            sizes.trial_timeout,
        )
        trips = sorted(results["pinger"]["trips"])
        return {
            "p50": percentile(trips, 0.50) / 2 * 1e6,
            "p99": percentile(trips, 0.99) / 2 * 1e6,
            "lost": results["pinger"]["lost"],
        }
