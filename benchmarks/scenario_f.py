"""F: what one message costs a cluster as it grows (N = 2, 4, 8, 16 instances).

N instance processes each host a group of their own, with one member channel that a
task keeps receiving on. A sender process sends ``scale_messages`` numbered messages, each
to one of the N groups in turn (kept at most ``window`` receipts ahead, so that CPU is
compared at equal work, not at equal backlog). Every process measures its own CPU time
from the start line to the end (once every message arrived), and the sender also reads
the backplane server's (redis-server, nats-server) from ``/proc``.

``µs/msg`` is all of it (instances, sender and server) divided by the messages delivered:
what a delivered message costs the whole cluster. With broadcast routing every instance
reads and decodes every message, so it grows with N; with ``"routing": "groups"`` only the
instance with the member hears it, so it should stay flat. ``instances µs`` is the
instance processes' part, where the difference is.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .cputime import server_cpu
from .env import Env
from .plan import Case, Layout, Sizes
from .procs import Role, Sync, run_roles
from .report import Metric
from .scenario_a import STALL_LIMIT
from .subjects import (
    SUBJECTS,
    close_layer,
    layer_stats,
    open_layer,
    reported_losses,
    short,
)
from .tally import Tally, message, throttle, wait_for_warm, wait_until_done

SCALE = (
    "crossws-redis",
    "crossws-redis-groups",
    "crossws-redis-cluster",
    "crossws-redis-cluster-groups",
    "crossws-nats",
    "crossws-nats-groups",
    "redis-pubsub",
)
# The largest cluster first: the one whose numbers matter most is measured on the
# quietest machine.
INSTANCES = (16, 8, 4, 2)


def label(instances: int) -> str:
    return f"N={instances} instances"


async def _instance(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    key, slot = spec["subject"], spec["slot"]
    layer = open_layer(key, env, spec["scope"], defaults=True)
    channel = await layer.new_channel()
    await layer.group_add(f"{spec['scope']}-g{slot}", channel)
    tally = Tally(1, spec["per_group"])

    async def pump() -> None:
        while True:
            received = await layer.receive(channel)
            tally.hit(0, received["seq"])

    task = asyncio.create_task(pump())
    await sync.line_up()
    warm = await wait_for_warm(tally, 1)
    await sync.line_up()
    cpu = time.process_time()
    await _until_all_arrived(tally, sync, slot, spec["idle"])
    # Stopped once the whole cluster has every message, not after the quiet time that
    # follows (which looks for duplicates): an instance keeps decoding the others'
    # broadcasts until then, and none of them works after it.
    cpu = time.process_time() - cpu
    await wait_until_done(tally, sync, slot, idle=spec["idle"], limit=spec["timeout"])
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    stats = layer_stats(key, layer)
    await close_layer(key, layer)
    return {
        "cpu": cpu,
        "unique": tally.unique,
        "duplicates": tally.duplicates,
        "last": tally.last,
        "warm": warm,
        "reported": reported_losses(stats),
    }


async def _until_all_arrived(tally: Tally, sync: Sync, slot: int, idle: float) -> None:
    last, since = -1, time.monotonic()
    while True:
        sync.progress[slot] = tally.unique
        sent = sync.sent.value
        if sent >= 0 and sync.received() >= sent:
            return
        now = time.monotonic()
        if tally.unique != last:
            last, since = tally.unique, now
        elif sent >= 0 and now - since > idle:
            return  # lost messages never arrive
        await asyncio.sleep(0.005)


async def _sender(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    key, instances = spec["subject"], spec["instances"]
    groups = [f"{spec['scope']}-g{slot}" for slot in range(instances)]
    layer = open_layer(key, env, spec["scope"], defaults=True)
    await layer.group_send(f"{spec['scope']}-idle", message(-1))  # connects
    await sync.line_up()
    for group in groups:
        await layer.group_send(group, message(-1))
    service = SUBJECTS[key].service
    start = await sync.line_up()
    cpu, server = time.process_time(), server_cpu(service)
    total = spec["per_group"] * instances
    for index in range(total):
        if index % 64 == 0:
            await throttle(sync, index, 1, spec["window"])
        await layer.group_send(groups[index % instances], message(index // instances))
    sync.sent.value = total
    await sync.wait_finished(spec["timeout"])
    cpu = time.process_time() - cpu
    server_end = server_cpu(service)
    stats = layer_stats(key, layer)
    await close_layer(key, layer)
    return {
        "start": start,
        "cpu": cpu,
        "server": None if server is None or server_end is None else server_end - server,
        "reported": reported_losses(stats),
    }


class ScenarioF:
    name = "F"
    title = "CPU per delivered message as the cluster grows"
    trials: int | None = None

    def cases(self, sizes: Sizes) -> list[Case]:
        return [Case(label(instances), {"instances": instances}, SCALE) for instances in INSTANCES]

    def layout(self, case: Case) -> Layout:
        return Layout(
            metrics=(
                Metric("us_per_msg", "µs/msg", better="lower"),
                Metric("instances_us", "instances µs", better="lower"),
                Metric("server_us", "server µs", better="lower"),
                Metric("rate", "msgs/s"),
            ),
            primary="us_per_msg",
            counts=("lost", "duplicates"),
            ratio_peers=("crossws-redis", "crossws-redis-cluster", "crossws-nats", "redis-pubsub"),
        )

    def run(self, case: Case, subject: str, env: Env, sizes: Sizes, trial: int) -> dict[str, float]:
        instances = case.params["instances"]
        per_group = max(1, sizes.scale_messages // instances)
        scope = env.scope("f", instances, short(subject), trial)
        spec = {
            "subject": subject,
            "scope": scope,
            "instances": instances,
            "per_group": per_group,
            "window": sizes.window,
            "idle": sizes.idle,
            "timeout": sizes.trial_timeout,
        }
        roles = [
            Role(f"instance-{slot}", _instance, {**spec, "slot": slot}) for slot in range(instances)
        ]
        roles.append(Role("sender", _sender, spec, lingers=True))
        results = run_roles(roles, env, sizes.trial_timeout, stall=STALL_LIMIT)
        sender = results["sender"]
        parts = [results[f"instance-{slot}"] for slot in range(instances)]
        delivered = sum(part["unique"] for part in parts)
        total = per_group * instances
        if not delivered:
            return {"lost": total}
        instance_cpu = sum(part["cpu"] for part in parts)
        server = sender["server"] or 0.0
        elapsed = max(part["last"] for part in parts) - sender["start"]
        return {
            "us_per_msg": (instance_cpu + sender["cpu"] + server) / delivered * 1e6,
            "instances_us": instance_cpu / delivered * 1e6,
            "server_us": server / delivered * 1e6,
            "rate": delivered / elapsed if elapsed > 0 else float("nan"),
            "lost": total - delivered,
            "duplicates": sum(part["duplicates"] for part in parts),
        }
