"""E: memory of a long-running process.

*relayed*: a receiving process with one member channel gets ``relayed`` group messages
from a sending process (kept at most ``window`` messages ahead, so that a backlog is not
mistaken for a leak). *churn*: one process runs ``churn`` consumer lifecycles, 100 at a
time, as a WebSocket consumer does: ``new_channel``, ``group_add``, a ``receive`` that is
cancelled (the client went away), ``group_discard``.

The resident set size is sampled after warm-up (a tenth of the work) and at twenty
checkpoints up to the end. ``growth`` is the end minus the warm-up RSS; the run counts
as flat when growth stays within :data:`FLAT_MIB`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .env import Env
from .plan import Case, Layout, Sizes
from .procs import Role, Sync, run_roles
from .report import Metric
from .scenario_a import STALL_LIMIT
from .subjects import close_layer, layer_stats, open_layer, reported_losses, short
from .tally import Tally, message, rss_bytes, throttle, wait_for_warm, wait_until_done

RELAYED = ("crossws-redis", "crossws-pgsql", "crossws-mp", "redis-pubsub")
CHURN = (
    "crossws-redis",
    "crossws-pgsql",
    "crossws-mp",
    "crossws-local",
    "redis-pubsub",
    "redis-core",
    "inmemory",
)
CHECKPOINTS = 20
WARM_FRACTION = 0.1
CONCURRENT = 100
MIB = 1024 * 1024
FLAT_MIB = 2.0
"""How much the RSS may grow from warm-up to the end and still count as flat."""


class _Sampler:
    """RSS after warm-up and at evenly spaced checkpoints of ``total`` units of work."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.warm_at = max(1, int(total * WARM_FRACTION))
        self.step = max(1, (total - self.warm_at) // CHECKPOINTS)
        self.next = self.warm_at
        self.samples: list[tuple[int, int]] = []

    def observe(self, done: int) -> None:
        if done >= self.next:
            self.samples.append((done, rss_bytes()))
            self.next = done + self.step

    def finish(self, done: int) -> None:
        if not self.samples or self.samples[-1][0] != done:
            self.samples.append((done, rss_bytes()))


async def _relay_receiver(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    key, total = spec["subject"], spec["total"]
    layer = open_layer(key, env, spec["scope"])
    channel = await layer.new_channel()
    await layer.group_add(spec["group"], channel)
    tally = Tally(1, total)
    sampler = _Sampler(total)

    async def pump() -> None:
        while True:
            received = await layer.receive(channel)
            tally.hit(0, received["seq"])
            sampler.observe(tally.unique)

    task = asyncio.create_task(pump())
    await sync.line_up()
    warm = await wait_for_warm(tally, 1)
    await sync.line_up()
    await wait_until_done(tally, sync, 0, idle=spec["idle"], limit=spec["timeout"])
    sampler.finish(tally.unique)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    stats = layer_stats(key, layer)
    await close_layer(key, layer)
    return {
        "samples": sampler.samples,
        "unique": tally.unique,
        "duplicates": tally.duplicates,
        "first": tally.first,
        "last": tally.last,
        "warm": warm,
        "reported": reported_losses(stats),
    }


async def _relay_sender(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    key, group = spec["subject"], spec["group"]
    layer = open_layer(key, env, spec["scope"])
    await layer.group_send(f"{group}-idle", message(-1))
    await sync.line_up()
    await layer.group_send(group, message(-1))
    start = await sync.line_up()
    for seq in range(spec["total"]):
        if seq % 64 == 0:
            await throttle(sync, seq, 1, spec["window"])
        await layer.group_send(group, message(seq))
    sync.sent.value = spec["total"]
    await sync.wait_finished(spec["timeout"])
    stats = layer_stats(key, layer)
    await close_layer(key, layer)
    return {"start": start, "reported": reported_losses(stats)}


async def _churner(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    key, total = spec["subject"], spec["total"]
    group = f"{spec['scope']}-group"
    layer = open_layer(key, env, spec["scope"])
    sampler = _Sampler(total)

    async def lifecycle() -> None:
        channel = await layer.new_channel()
        await layer.group_add(group, channel)
        receiving = asyncio.create_task(layer.receive(channel))
        await asyncio.sleep(0)
        receiving.cancel()
        await asyncio.gather(receiving, return_exceptions=True)
        await layer.group_discard(group, channel)

    await lifecycle()  # connects
    start = time.monotonic()
    done = 0
    while done < total:
        batch = min(CONCURRENT, total - done)
        await asyncio.gather(*(lifecycle() for _ in range(batch)))
        done += batch
        sampler.observe(done)
    elapsed = time.monotonic() - start
    sampler.finish(done)
    await asyncio.sleep(0.2)
    sizes = {
        k: v
        for k, v in layer_stats(key, layer).items()
        if k in ("channels", "receivers", "groups", "memberships", "queued")
    }
    await close_layer(key, layer)
    return {"samples": sampler.samples, "elapsed": elapsed, "sizes": sizes}


def _memory(samples: list[tuple[int, int]]) -> dict[str, float]:
    warm, end = samples[0][1], samples[-1][1]
    peak = max(rss for _, rss in samples)
    return {
        "rss_warm": warm / MIB,
        "rss_end": end / MIB,
        "rss_peak": peak / MIB,
        "growth": (end - warm) / MIB,
    }


class ScenarioE:
    name = "E"
    title = "memory (RSS) of a long-running process"
    trials: int | None = 1

    def cases(self, sizes: Sizes) -> list[Case]:
        return [
            Case(
                f"relayed {sizes.relayed:,}", {"kind": "relayed", "total": sizes.relayed}, RELAYED
            ),
            Case(f"churn {sizes.churn:,}", {"kind": "churn", "total": sizes.churn}, CHURN),
        ]

    def layout(self, case: Case) -> Layout:
        relayed = case.params["kind"] == "relayed"
        return Layout(
            metrics=(
                Metric("rss_warm", "RSS after warm-up MiB", digits=1),
                Metric("rss_end", "RSS at end MiB", digits=1),
                Metric("rss_peak", "peak MiB", digits=1),
                Metric("growth", "growth MiB", digits=1, better="lower"),
                Metric("rate", "msgs/s" if relayed else "lifecycles/s"),
            ),
            primary="growth",
            counts=("lost", "duplicates", "unreported") if relayed else ("left",),
        )

    def run(self, case: Case, subject: str, env: Env, sizes: Sizes, trial: int) -> dict[str, float]:
        total = case.params["total"]
        scope = env.scope("e", case.params["kind"][0], short(subject), trial)
        spec = {
            "subject": subject,
            "scope": scope,
            "group": f"{scope}-group",
            "total": total,
            "window": sizes.window,
            "idle": sizes.idle,
            "timeout": sizes.trial_timeout * 5,
        }
        if case.params["kind"] == "churn":
            result = run_roles([Role("churner", _churner, spec)], env, spec["timeout"])["churner"]
            values = {**_memory(result["samples"]), "rate": total / result["elapsed"]}
            left = result["sizes"]
            if left:  # what this layer still holds: its own count, where it has one
                values["left"] = sum(
                    left.get(k, 0) for k in ("channels", "receivers", "memberships")
                )
            return values
        roles = [
            Role("receiver", _relay_receiver, spec),
            Role("sender", _relay_sender, spec, lingers=True),
        ]
        results = run_roles(roles, env, spec["timeout"], stall=STALL_LIMIT)
        receiver, sender = results["receiver"], results["sender"]
        lost = total - receiver["unique"]
        elapsed = receiver["last"] - sender["start"]
        return {
            **_memory(receiver["samples"]),
            "rate": receiver["unique"] / elapsed if elapsed > 0 else float("nan"),
            "lost": lost,
            "duplicates": receiver["duplicates"],
            "unreported": max(0, lost - receiver["reported"] - sender["reported"]),
        }
