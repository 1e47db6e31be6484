"""C: fan-out inside one process to N members.

One process holds N member channels of a group, each with a task looping on ``receive``,
and ``group_send``\\ s M messages (N x M receipts per trial) as fast as it can; the cost is
the time from the first ``group_send`` to the last receipt, per receipt. ``send µs`` is
what the ``group_send`` calls themselves took per message, the part a sender waits for.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .env import Env
from .plan import Case, Layout, Sizes
from .procs import Role, Sync, run_roles
from .report import Metric
from .subjects import (
    open_layer,
    reported_losses,
    short,
    start_receivers,
    stop_and_close,
)
from .tally import Tally, message, wait_for_warm, wait_until_done

SUBJECTS = (
    "crossws-local",
    "crossws-redis",
    "crossws-pgsql",
    "crossws-mp",
    "inmemory",
    "redis-pubsub",
    "redis-core",
    "channels-postgres",
)


async def _fanout(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    key, members, messages = spec["subject"], spec["members"], spec["messages"]
    group = f"{spec['scope']}-group"
    layer = open_layer(key, env, spec["scope"])
    channels = [await layer.new_channel() for _ in range(members)]
    for channel in channels:
        await layer.group_add(group, channel)
    tally = Tally(members, messages)

    async def pump(member: int, channel: str) -> None:
        while True:
            received = await layer.receive(channel)
            tally.hit(member, received["seq"])

    tasks = await start_receivers(key, layer, [pump(i, ch) for i, ch in enumerate(channels)])
    await asyncio.sleep(0.05)
    await layer.group_send(group, message(-1))
    warm = await wait_for_warm(tally, members)
    start = time.monotonic()
    for seq in range(messages):
        await layer.group_send(group, message(seq))
    sent = time.monotonic()
    sync.sent.value = messages
    await wait_until_done(tally, sync, 0, per_message=members, idle=spec["idle"])
    stats = await stop_and_close(key, layer, tasks)
    return {
        "start": start,
        "sent": sent,
        "last": tally.last,
        "unique": tally.unique,
        "duplicates": tally.duplicates,
        "warm": warm,
        "reported": reported_losses(stats),
    }


class ScenarioC:
    name = "C"
    title = "fan-out inside one process"
    trials: int | None = None

    def cases(self, sizes: Sizes) -> list[Case]:
        return [
            Case(
                f"N={members}",
                {"members": members, "messages": max(1, sizes.fanout_deliveries // members)},
                SUBJECTS,
            )
            for members in sizes.fanout
        ]

    def layout(self, case: Case) -> Layout:
        return Layout(
            metrics=(
                Metric("us_per_delivery", "µs per receipt", digits=2, better="lower"),
                Metric("send_us", "group_send µs", digits=1, better="lower"),
            ),
            primary="us_per_delivery",
            counts=("lost", "duplicates", "unreported"),
            ratio_peers=("redis-pubsub", "redis-core", "inmemory", "channels-postgres"),
        )

    def run(self, case: Case, subject: str, env: Env, sizes: Sizes, trial: int) -> dict[str, float]:
        members, messages = case.params["members"], case.params["messages"]
        spec = {
            "subject": subject,
            "scope": env.scope("c", members, short(subject), trial),
            "members": members,
            "messages": messages,
            "idle": sizes.idle,
        }
        result = run_roles([Role("fanout", _fanout, spec)], env, sizes.trial_timeout)["fanout"]
        unique = result["unique"]
        lost = members * messages - unique
        elapsed = result["last"] - result["start"]
        return {
            "us_per_delivery": elapsed / unique * 1e6 if unique else float("nan"),
            "send_us": (result["sent"] - result["start"]) / messages * 1e6,
            "lost": lost,
            "duplicates": result["duplicates"],
            "unreported": max(0, lost - result["reported"]),
            "warm_missing": 0 if result["warm"] else 1,
        }
