"""A: group_send throughput from a sending process to a receiving process.

The receiver holds K member channels of one group, each with a task looping on
``receive``. After both processes line up, the sender ``group_send``\\ s numbered ~100-byte
messages as fast as it can, for at most ``max_seconds``. The rate is receipts per second
from the start to the last receipt; the per-group-message rate divides it by K.

Two settings, each a case of its own:

* *default settings, unpaced*: every layer as it comes (its default ``capacity``), and a
  sender that never waits for the receiver, as a management command or a Celery task
  sends. What a user gets, losses included.
* *transport*: ``capacity`` 1,000,000 and the sender kept at most ``window`` receipts
  ahead of the receiver: no bound and no backlog get in the way, so this measures the
  transport. Raw subjects, which publish the same JSON text to a pub/sub channel the
  receiver listens on (K=1 only), run here.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from .cputime import server_cpu
from .env import Env
from .plan import Case, Layout, Sizes
from .procs import Role, Sync, run_roles
from .raw import open_link, pipelined
from .report import Metric
from .subjects import (
    CROSS_PROCESS_LAYERS,
    ROUTED,
    SEALED_REDIS,
    SUBJECTS,
    close_layer,
    layer_stats,
    open_layer,
    reported_losses,
    short,
    start_receivers,
)
from .tally import Tally, message, raw_payload, throttle, wait_for_warm, wait_until_done

RAW = (
    "raw-redis",
    "raw-redis-pipe",
    "raw-pg",
    "raw-pg-pipe",
    "raw-pg-batch",
    "raw-nats",
    "raw-nats-pipe",
)
PIPELINE_CHUNK = 256
# A trial whose receiver has received nothing new for this long has hung.
STALL_LIMIT = 60.0


DEFAULTS = "default settings, unpaced"
SEALED = "redis, signed and encrypted vs plain, default settings, unpaced"
TRANSPORT = "transport: capacity 1,000,000, paced"


def label(members: int, settings: str) -> str:
    """The label of the case with K=``members`` under ``settings``."""
    return f"K={members}, {settings}"


async def _layer_receiver(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    key, members = spec["subject"], spec["members"]
    layer = open_layer(key, env, spec["scope"], spec["defaults"])
    channels = [await layer.new_channel() for _ in range(members)]
    for channel in channels:
        await layer.group_add(spec["group"], channel)
    tally = Tally(members, spec["messages"])

    async def pump(member: int, channel: str) -> None:
        while True:
            received = await layer.receive(channel)
            tally.hit(member, received["seq"])

    tasks = await start_receivers(key, layer, [pump(i, ch) for i, ch in enumerate(channels)])
    await asyncio.sleep(0.05)
    await sync.line_up()  # the sender now sends a warm-up message
    warm = await wait_for_warm(tally, members)
    await sync.line_up()
    cpu = time.process_time()
    await wait_until_done(tally, sync, 0, per_message=members, idle=spec["idle"])
    cpu = time.process_time() - cpu
    server = server_cpu(spec["service"])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    stats = layer_stats(key, layer)
    await close_layer(key, layer)
    return _receipts(tally, warm, stats, cpu, server)


async def _raw_receiver(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    link = open_link(spec["subject"], env)
    tally = Tally(1, spec["messages"])
    await link.listen(spec["group"], lambda raw: tally.hit(0, json.loads(raw)["seq"]))
    await sync.line_up()
    warm = await wait_for_warm(tally, 1)
    await sync.line_up()
    cpu = time.process_time()
    await wait_until_done(tally, sync, 0, idle=spec["idle"])
    cpu = time.process_time() - cpu
    server = server_cpu(spec["service"])
    await link.close()
    return _receipts(tally, warm, {}, cpu, server)


def _receipts(
    tally: Tally, warm: bool, stats: dict[str, Any], cpu: float, server: float | None
) -> dict[str, Any]:
    return {
        "cpu": cpu,
        "server": server,
        "first": tally.first,
        "last": tally.last,
        "unique": tally.unique,
        "duplicates": tally.duplicates,
        "warm": warm,
        "reported": reported_losses(stats),
    }


async def _layer_sender(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    key, group, members = spec["subject"], spec["group"], spec["members"]
    layer = open_layer(key, env, spec["scope"], spec["defaults"])
    paced = not spec["defaults"]
    await layer.group_send(f"{group}-idle", message(-1))  # connects
    await sync.line_up()
    await layer.group_send(group, message(-1))
    server = server_cpu(spec["service"])
    start = await sync.line_up()
    cpu = time.process_time()
    stop_at = start + spec["max_seconds"]
    sent = 0
    for seq in range(spec["messages"]):
        if seq % 64 == 0:
            if time.monotonic() > stop_at:
                break
            if paced:
                await throttle(sync, seq, members, spec["window"])
        await layer.group_send(group, message(seq))
        sent += 1
    done = time.monotonic()
    sync.sent.value = sent
    await sync.wait_finished(spec["timeout"])
    cpu = time.process_time() - cpu
    stats = layer_stats(key, layer)
    await close_layer(key, layer)
    return {
        "start": start,
        "done": done,
        "sent": sent,
        "reported": reported_losses(stats),
        "cpu": cpu,
        "server": server,
    }


async def _raw_sender(spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    key, name = spec["subject"], spec["group"]
    link = open_link(key, env)
    await link.send(f"{name}-idle", raw_payload(-1))
    await sync.line_up()
    await link.send(name, raw_payload(-1))
    server = server_cpu(spec["service"])
    start = await sync.line_up()
    cpu = time.process_time()
    stop_at = start + spec["max_seconds"]
    total = spec["messages"]
    sent = 0
    step = PIPELINE_CHUNK if pipelined(key) else 64
    while sent < total and time.monotonic() <= stop_at:
        await throttle(sync, sent, 1, spec["window"])
        upto = min(total, sent + step)
        if pipelined(key):
            await link.send_many(name, [raw_payload(seq) for seq in range(sent, upto)])
        else:
            for seq in range(sent, upto):
                await link.send(name, raw_payload(seq))
        sent = upto
    done = time.monotonic()
    sync.sent.value = sent
    await sync.wait_finished(spec["timeout"])
    cpu = time.process_time() - cpu
    await link.close()
    return {
        "start": start,
        "done": done,
        "sent": sent,
        "reported": 0,
        "cpu": cpu,
        "server": server,
    }


class ScenarioA:
    name = "A"
    title = "group_send throughput, one sending process to one receiving process"
    trials: int | None = None

    def cases(self, sizes: Sizes) -> list[Case]:
        return [
            *(
                Case(
                    label(members, DEFAULTS),
                    {"members": members, "messages": messages, "defaults": True},
                    CROSS_PROCESS_LAYERS + ROUTED,
                )
                for members, messages in sizes.messages
            ),
            *(
                Case(
                    label(members, TRANSPORT),
                    {"members": members, "messages": messages, "defaults": False},
                    CROSS_PROCESS_LAYERS + (RAW if members == 1 else ()),
                )
                for members, messages in sizes.messages
            ),
            Case(
                label(1, SEALED),
                {"members": 1, "messages": sizes.messages[0][1], "defaults": True},
                SEALED_REDIS,
            ),
        ]

    def layout(self, case: Case) -> Layout:
        return Layout(
            metrics=(
                Metric("rate", "receipts/s", better="higher"),
                Metric("group_rate", "group msgs/s", better="higher"),
                Metric("send_cpu", "CPU µs/msg sender", digits=1, spread=False),
                Metric("recv_cpu", "receiver", digits=1, spread=False),
                Metric("server_cpu", "server", digits=1, spread=False),
            ),
            primary="rate",
            counts=("sent", "lost", "duplicates", "unreported"),
            ratio_peers=(
                ("crossws-redis",)
                if case.subjects == SEALED_REDIS
                else ("redis-pubsub", "redis-core", "channels-postgres", *RAW)
            ),
        )

    def run(self, case: Case, subject: str, env: Env, sizes: Sizes, trial: int) -> dict[str, float]:
        members = case.params["members"]
        settings = "d" if case.params["defaults"] else "t"
        scope = env.scope(f"a{settings}", members, short(subject), trial)
        spec = {
            "subject": subject,
            "service": SUBJECTS[subject].service,
            "scope": scope,
            "group": f"{scope}-group",
            "members": members,
            "messages": case.params["messages"],
            "defaults": case.params["defaults"],
            "max_seconds": sizes.max_seconds,
            "window": sizes.window,
            "idle": sizes.idle,
            "timeout": sizes.trial_timeout,
        }
        raw = subject.startswith("raw-")
        roles = [
            Role("receiver", _raw_receiver if raw else _layer_receiver, spec),
            Role("sender", _raw_sender if raw else _layer_sender, spec, lingers=True),
        ]
        results = run_roles(roles, env, sizes.trial_timeout, stall=STALL_LIMIT)
        receiver, sender = results["receiver"], results["sender"]
        expected = sender["sent"] * members
        lost = expected - receiver["unique"]
        elapsed = receiver["last"] - sender["start"]
        rate = receiver["unique"] / elapsed if elapsed > 0 else float("nan")
        per_message = 1e6 / sender["sent"] if sender["sent"] else float("nan")
        values = {
            "rate": rate,
            "group_rate": rate / members,
            "send_cpu": sender["cpu"] * per_message,
            "recv_cpu": receiver["cpu"] * per_message,
            "sent": sender["sent"],
            "lost": lost,
            "duplicates": receiver["duplicates"],
            "unreported": max(0, lost - receiver["reported"] - sender["reported"]),
            "warm_missing": 0 if receiver["warm"] else 1,
        }
        if sender["server"] is not None and receiver["server"] is not None:
            values["server_cpu"] = (receiver["server"] - sender["server"]) * per_message
        return values
