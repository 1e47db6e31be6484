"""Benchmark processes: start them, line them up at a barrier, collect their results.

Every measurement runs in fresh OS processes, started from a fork server that has
imported the heavy modules once, so that a trial costs little more than its measurement.
The processes of one trial meet at a barrier once they are connected and ready; timing
starts after it, so process start-up is never measured. Timestamps are
``time.monotonic()``, which on Linux is one clock for every process of the machine.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerContext
from multiprocessing.sharedctypes import Synchronized, SynchronizedArray
from multiprocessing.synchronize import Barrier, Event
from typing import Any

from .env import Env, configure_django

_PRELOAD = [
    "asyncio",
    "json",
    "msgpack",
    "redis.asyncio",
    "psycopg",
    "channels.layers",
    "channels_redis.core",
    "channels_redis.pubsub",
    "crossws_channels.layer",
    # The drivers too: a run then measures the code as it was when it started, even if
    # the checkout changes meanwhile.
    "crossws_channels.drivers.local",
    "crossws_channels.drivers.multiprocessing",
    "crossws_channels.drivers.pgsql",
    "crossws_channels.drivers.redis",
    "crossws_channels.drivers.nats",
    "benchmarks.scenario_a",
    "benchmarks.scenario_b",
    "benchmarks.scenario_c",
    "benchmarks.scenario_d",
    "benchmarks.scenario_e",
    "benchmarks.scenario_f",
    "benchmarks.scenario_g",
]

_context: ForkServerContext | None = None

NAME_SIZE = 256


def context() -> ForkServerContext:
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        assert isinstance(ctx, ForkServerContext)
        ctx.set_forkserver_preload(_PRELOAD)
        _context = ctx
    return _context


class TrialFailed(RuntimeError):
    """A benchmark process failed or did not finish in time.

    ``str()`` is one line; ``details`` the failing process's traceback, if any.
    """

    def __init__(self, summary: str, details: str = "") -> None:
        super().__init__(summary)
        self.details = details


@dataclass
class Sync:
    """What the processes of one trial share.

    ``sent`` is -1 until the sending process is done, then the number it sent.
    ``progress[i]`` is what receiver ``i`` has received so far (for flow control and for
    knowing when every receiver is done). ``finished`` tells senders the receivers are
    done, so that nobody closes a connection while a message is still on its way.
    """

    barrier: Barrier
    sent: Synchronized[int]
    progress: SynchronizedArray[int]
    finished: Event
    names: SynchronizedArray[int]  # NAME_SIZE bytes per role: a name it publishes

    async def line_up(self, timeout: float = 60.0) -> float:
        """Wait at the barrier without blocking the event loop; return the time after it."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.barrier.wait, timeout)
        return time.monotonic()

    def received(self) -> int:
        return sum(self.progress[:])

    async def wait_finished(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.finished.wait, timeout)

    def publish_name(self, slot: int, name: str) -> None:
        """Tell the other processes a name (a channel) of role ``slot``."""
        data = name.encode("utf-8")
        if len(data) >= NAME_SIZE:
            raise ValueError(f"name too long to share: {name!r}")
        self.names[slot * NAME_SIZE : slot * NAME_SIZE + len(data)] = list(data)

    async def name_of(self, slot: int, timeout: float = 30.0) -> str:
        """The name role ``slot`` published, once it has."""
        deadline = time.monotonic() + timeout
        while True:
            raw = bytes(self.names[slot * NAME_SIZE : (slot + 1) * NAME_SIZE]).rstrip(b"\0")
            if raw:
                return raw.decode("utf-8")
            if time.monotonic() > deadline:
                raise TimeoutError(f"role {slot} published no name")
            await asyncio.sleep(0.005)


RoleMain = Callable[[dict[str, Any], Env, Sync], Coroutine[Any, Any, dict[str, Any]]]


def _run(role: str, main: RoleMain, spec: dict[str, Any], env: Env, sync: Sync) -> dict[str, Any]:
    if env.profile_dir is None:
        return asyncio.run(main(spec, env, sync))
    import cProfile

    # CPU time, not the default wall clock: the processes of a trial share the CPUs, and
    # a wall-clock profile charges the time a process waited for one to whatever call it
    # was in (typically the send() that woke its peer), hiding where the CPU really went.
    profiler = cProfile.Profile(time.process_time)
    try:
        return profiler.runcall(asyncio.run, main(spec, env, sync))
    finally:
        name = f"{spec.get('subject', 'process')}-{role}-{os.getpid()}.prof"
        profiler.dump_stats(os.path.join(env.profile_dir, name))


def _entry(
    role: str, main: RoleMain, spec: dict[str, Any], env: Env, sync: Sync, out: Connection
) -> None:
    try:
        # channels-postgres logs a warning per group_send to a group without members.
        logging.getLogger("channels_postgres").setLevel(logging.ERROR)
        configure_django(env)
        result = _run(role, main, spec, env, sync)
    except BaseException:
        out.send(("error", traceback.format_exc(limit=8)))
    else:
        out.send(("ok", result))
    finally:
        out.close()


@dataclass
class Role:
    """One process of a trial: its coroutine function and its parameters.

    A role that ``lingers`` (a sender) keeps its connections open until every other role
    is done: it waits for :attr:`Sync.finished`, which is set once the others returned.
    """

    name: str
    main: RoleMain
    spec: dict[str, Any]
    lingers: bool = False


def run_roles(
    roles: list[Role], env: Env, timeout: float, stall: float | None = None
) -> dict[str, dict[str, Any]]:
    """Run one trial's processes; return each role's result by name.

    Raises :class:`TrialFailed` if a process raises, dies, or is not done in ``timeout``
    seconds, or, with ``stall``, once the receivers' progress has not moved for that many
    seconds (a hung process); every process of the trial is then killed.
    """
    ctx = context()
    sync = Sync(
        barrier=ctx.Barrier(len(roles)),
        sent=ctx.Value("q", -1, lock=False),
        progress=ctx.Array("q", len(roles), lock=False),
        finished=ctx.Event(),
        names=ctx.Array("B", NAME_SIZE * len(roles), lock=False),
    )
    pending: dict[Connection, Role] = {}
    processes: list[multiprocessing.process.BaseProcess] = []
    for role in roles:
        receive_end, send_end = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_entry,
            args=(role.name, role.main, role.spec, env, sync, send_end),
            name=f"bench-{role.name}",
            daemon=True,
        )
        process.start()
        send_end.close()
        pending[receive_end] = role
        processes.append(process)
    results: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    failed = True
    try:
        progress, moved = -1, time.monotonic()
        while pending:
            ready = wait(list(pending), min(1.0, max(0.0, deadline - time.monotonic())))
            now = time.monotonic()
            if not ready:
                names = ", ".join(role.name for role in pending.values())
                if now >= deadline:
                    raise TrialFailed(f"no result from {names} within {timeout:.0f} s")
                if stall is not None:
                    current = sync.received() + sync.sent.value
                    if current != progress:
                        progress, moved = current, now
                    elif now - moved > stall:
                        raise TrialFailed(f"no progress for {stall:.0f} s, waiting for {names}")
                continue
            for pipe in ready:
                assert isinstance(pipe, Connection)
                role = pending.pop(pipe)
                try:
                    status, payload = pipe.recv()
                except EOFError:
                    raise TrialFailed(f"{role.name}: the process died") from None
                finally:
                    pipe.close()
                if status != "ok":
                    last = payload.strip().splitlines()[-1] if payload.strip() else "?"
                    raise TrialFailed(f"{role.name} failed: {last}", payload)
                results[role.name] = payload
            if all(role.lingers for role in pending.values()):
                sync.finished.set()
        failed = False
    finally:
        if failed:
            sync.barrier.abort()
        for child in processes:
            if failed:
                child.kill()
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join(1)
        for pipe in pending:
            pipe.close()
    return results
