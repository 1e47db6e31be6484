"""D: a worker channel (no ``!``) with two consumer processes.

A producer process ``send``\\ s numbered messages to one worker channel (waiting and
retrying on ``ChannelFull``; at most ``window`` messages ahead of the consumers); two
consumer processes loop on ``receive`` on it. Each message should be received exactly
once in total: a message received twice is a duplicate, one never received a loss.
``min share`` is the fraction of the work done by the less busy consumer (0.50: an even
split; 0: one consumer did nothing).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from channels.exceptions import ChannelFull

from .cputime import server_cpu
from .env import Env
from .plan import Case, Layout, Sizes
from .procs import Role, Sync, run_roles
from .report import Metric
from .scenario_a import STALL_LIMIT
from .subjects import SUBJECTS, close_layer, layer_stats, open_layer, reported_losses, short
from .tally import Tally, message, throttle, wait_until_done

MEASURED = (
    "crossws-redis",
    "crossws-pgsql",
    "crossws-mp",
    "crossws-nats",
    "redis-core",
    "redis-pubsub",
    "channels-postgres",
    "channels-nats",
)
CONSUMERS = 2
PRODUCER = CONSUMERS  # the producer's slot, after the consumers'


async def _consumer(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    key, slot = spec["subject"], spec["slot"]
    layer = open_layer(key, env, spec["scope"])
    tally = Tally(1, spec["messages"])

    async def pump() -> None:
        while True:
            received = await layer.receive(spec["worker"])
            tally.hit(0, received["seq"])

    task = asyncio.create_task(pump())
    await asyncio.sleep(0.05)
    await sync.line_up()
    cpu = time.process_time()
    await wait_until_done(tally, sync, slot, idle=spec["idle"])
    cpu = time.process_time() - cpu
    server = server_cpu(spec["service"])
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    stats = layer_stats(key, layer)
    await close_layer(key, layer)
    return {
        "counts": tally.counts(0, spec["messages"]),
        "last": tally.last,
        "unique": tally.unique,
        "reported": reported_losses(stats),
        "cpu": cpu,
        "server": server,
    }


async def _producer(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    key, worker = spec["subject"], spec["worker"]
    layer = open_layer(key, env, spec["scope"])
    server = server_cpu(spec["service"])
    start = await sync.line_up()
    cpu = time.process_time()
    stop_at = start + spec["max_seconds"]
    full = sent = 0
    for seq in range(spec["messages"]):
        if seq % 16 == 0:
            if time.monotonic() > stop_at:
                break
            await throttle(sync, seq, 1, spec["window"])
        while True:
            try:
                await layer.send(worker, message(seq))
                break
            except ChannelFull:
                full += 1
                await asyncio.sleep(0.001)
        sent += 1
    sync.sent.value = sent
    done = time.monotonic()
    await sync.wait_finished(spec["timeout"])
    cpu = time.process_time() - cpu
    stats = layer_stats(key, layer)
    await close_layer(key, layer)
    return {
        "start": start,
        "done": done,
        "sent": sent,
        "full": full,
        "reported": reported_losses(stats),
        "cpu": cpu,
        "server": server,
    }


class ScenarioD:
    name = "D"
    title = "worker channel, one producer and two consumer processes"
    trials: int | None = None

    def cases(self, sizes: Sizes) -> list[Case]:
        return [Case("2 consumers", {"messages": sizes.worker_messages}, MEASURED)]

    def layout(self, case: Case) -> Layout:
        return Layout(
            metrics=(
                Metric("rate", "msgs/s", better="higher"),
                Metric("share", "min share", digits=2),
                Metric("send_cpu", "CPU µs/msg producer", digits=1, spread=False),
                Metric("recv_cpu", "consumers", digits=1, spread=False),
                Metric("server_cpu", "server", digits=1, spread=False),
            ),
            primary="rate",
            counts=("sent", "lost", "duplicates", "unreported"),
            ratio_peers=("redis-core", "redis-pubsub", "channels-postgres"),
        )

    def run(self, case: Case, subject: str, env: Env, sizes: Sizes, trial: int) -> dict[str, float]:
        messages = case.params["messages"]
        scope = env.scope("d", short(subject), trial)
        base = {
            "subject": subject,
            "service": SUBJECTS[subject].service,
            "scope": scope,
            "worker": f"{scope}-work",
            "messages": messages,
            "window": sizes.worker_window,
            "max_seconds": sizes.max_seconds,
            "idle": sizes.idle,
            "timeout": sizes.trial_timeout,
        }
        roles = [Role(f"consumer{i}", _consumer, {**base, "slot": i}) for i in range(CONSUMERS)]
        roles.append(Role("producer", _producer, base, lingers=True))
        results = run_roles(roles, env, sizes.trial_timeout, stall=STALL_LIMIT)
        consumers = [results[f"consumer{i}"] for i in range(CONSUMERS)]
        producer = results["producer"]
        sent = producer["sent"]
        counts = [c["counts"][:sent] for c in consumers]
        totals = [sum(column) for column in zip(*counts, strict=True)]
        lost = sum(1 for n in totals if n == 0)
        duplicates = sum(n - 1 for n in totals if n > 1)
        received = [sum(c) for c in counts]
        last = max(c["last"] for c in consumers)
        unique = sent - lost
        elapsed = last - producer["start"]
        reported = producer["reported"] + sum(c["reported"] for c in consumers)
        per_message = 1e6 / sent if sent else float("nan")
        values = {
            "send_cpu": producer["cpu"] * per_message,
            "recv_cpu": sum(c["cpu"] for c in consumers) * per_message,
            "rate": unique / elapsed if elapsed > 0 else float("nan"),
            "share": min(received) / sum(received) if sum(received) else 0.0,
            "lost": lost,
            "duplicates": duplicates,
            "unreported": max(0, lost - reported),
            "sent": sent,
            "full": producer["full"],
        }
        ends = [c["server"] for c in consumers]
        if producer["server"] is not None and None not in ends:
            values["server_cpu"] = (max(ends) - producer["server"]) * per_message
        return values
