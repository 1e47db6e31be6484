"""G: bulk sends against a loop of single calls.

A receiver process holds ``BULK_FANOUT`` channels, each alone in a group of its own, and
keeps receiving on all of them. A sender process, with default settings and unpaced
within a round, sends ``scale_messages`` messages in rounds of one message to every
group (or channel): either a loop of ``group_send`` (``send``) per round, or one
``group_send_many`` (``send_many``) per round. Rounds are kept at most ``window`` receipts
ahead of the receiver, so that both forms are compared at equal backlog.

``msgs/s`` counts receipts from the start line to the last one; ``sender µs`` is the
sender's CPU time per message sent, where the bulk forms save their work.
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
from .subjects import close_layer, layer_stats, open_layer, reported_losses, short, stop_and_close
from .tally import Tally, message, throttle, wait_for_warm, wait_until_done

# Groups (channels) a round addresses.
BULK_FANOUT = 100
BULK = (
    "crossws-redis",
    "crossws-redis-groups",
    "crossws-pgsql",
    "crossws-mp",
    "crossws-nats",
    "crossws-nats-groups",
)
LOOP_GROUPS = "a loop of 100 group_send"
MANY_GROUPS = "group_send_many(100 groups)"
LOOP_SENDS = "a loop of 100 send"
MANY_SENDS = "send_many(100 pairs)"
FORMS = {
    LOOP_GROUPS: ("groups", False),
    MANY_GROUPS: ("groups", True),
    LOOP_SENDS: ("channels", False),
    MANY_SENDS: ("channels", True),
}


async def _receiver(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    key, scope = spec["subject"], spec["scope"]
    layer = open_layer(key, env, scope, defaults=True)
    first = await layer.new_channel()
    # Channels of this instance need not come from new_channel(): any name with its id
    # before the "!" is routed here. The sender builds them from this prefix.
    prefix = first[: first.index("!") + 1] + "b"
    channels = [f"{prefix}{index}" for index in range(BULK_FANOUT)]
    if spec["target"] == "groups":
        for index, channel in enumerate(channels):
            await layer.group_add(f"{scope}-g{index}", channel)
    tally = Tally(BULK_FANOUT, spec["rounds"])

    async def pump(index: int, channel: str) -> None:
        while True:
            received = await layer.receive(channel)
            tally.hit(index, received["seq"])

    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(channels)]
    sync.publish_name(0, prefix)
    await sync.line_up()
    warm = await wait_for_warm(tally, BULK_FANOUT)
    await sync.line_up()
    await wait_until_done(tally, sync, 0, idle=spec["idle"], limit=spec["timeout"])
    stats = await stop_and_close(key, layer, tasks)
    return {
        "unique": tally.unique,
        "duplicates": tally.duplicates,
        "last": tally.last,
        "warm": warm,
        "reported": reported_losses(stats),
    }


async def _sender(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    key, scope, rounds = spec["subject"], spec["scope"], spec["rounds"]
    layer = open_layer(key, env, scope, defaults=True)
    await layer.group_send(f"{scope}-idle", message(-1))  # connects
    prefix = await sync.name_of(0)
    groups = [f"{scope}-g{index}" for index in range(BULK_FANOUT)]
    channels = [f"{prefix}{index}" for index in range(BULK_FANOUT)]
    by_group = spec["target"] == "groups"
    bulk = spec["bulk"]

    async def one_round(seq: int) -> None:
        body = message(seq)
        if by_group and bulk:
            await layer.group_send_many(groups, body)
        elif by_group:
            for group in groups:
                await layer.group_send(group, body)
        elif bulk:
            await layer.send_many([(channel, body) for channel in channels])
        else:
            for channel in channels:
                await layer.send(channel, body)

    await sync.line_up()
    await one_round(-1)
    start = await sync.line_up()
    cpu = time.process_time()
    for seq in range(rounds):
        await throttle(sync, seq, BULK_FANOUT, spec["window"])
        await one_round(seq)
    cpu = time.process_time() - cpu
    sync.sent.value = rounds * BULK_FANOUT
    await sync.wait_finished(spec["timeout"])
    stats = layer_stats(key, layer)
    await close_layer(key, layer)
    return {"start": start, "cpu": cpu, "reported": reported_losses(stats)}


class ScenarioG:
    name = "G"
    title = "bulk sends against a loop of single calls"
    trials: int | None = None

    def cases(self, sizes: Sizes) -> list[Case]:
        return [Case(form, {"form": form}, BULK) for form in FORMS]

    def layout(self, case: Case) -> Layout:
        return Layout(
            metrics=(
                Metric("rate", "msgs/s", better="higher"),
                Metric("sender_us", "sender µs", better="lower"),
            ),
            primary="rate",
            counts=("lost", "duplicates"),
            ratio_peers=("crossws-redis",),
        )

    def run(self, case: Case, subject: str, env: Env, sizes: Sizes, trial: int) -> dict[str, float]:
        target, bulk = FORMS[case.params["form"]]
        rounds = max(1, sizes.scale_messages // BULK_FANOUT)
        spec = {
            "subject": subject,
            "scope": env.scope("g", target[0], int(bulk), short(subject), trial),
            "target": target,
            "bulk": bulk,
            "rounds": rounds,
            "window": sizes.window,
            "idle": sizes.idle,
            "timeout": sizes.trial_timeout,
        }
        roles = [
            Role("receiver", _receiver, spec),
            Role("sender", _sender, spec, lingers=True),
        ]
        results = run_roles(roles, env, sizes.trial_timeout, stall=STALL_LIMIT)
        sender, receiver = results["sender"], results["receiver"]
        total = rounds * BULK_FANOUT
        delivered = receiver["unique"]
        if not delivered:
            return {"lost": total}
        elapsed = receiver["last"] - sender["start"]
        return {
            "rate": delivered / elapsed if elapsed > 0 else float("nan"),
            "sender_us": sender["cpu"] / total * 1e6,
            "lost": total - delivered,
            "duplicates": receiver["duplicates"],
        }
