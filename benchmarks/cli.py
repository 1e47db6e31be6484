"""The entry point: ``python -m benchmarks [--quick] [--scenarios A,B] [--drivers redis]``.

Runs the chosen scenarios over interleaved trials, prints one table per case and a
summary against the targets, and optionally writes every sample as JSON (``--json``).
Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import env as environment
from .machine import describe, revision
from .plan import FULL, QUICK, Scenario, Sizes
from .redis_cluster import start_private_cluster
from .scenario_a import ScenarioA
from .scenario_b import ScenarioB
from .scenario_c import ScenarioC
from .scenario_d import ScenarioD
from .scenario_e import ScenarioE
from .scenario_f import ScenarioF
from .scenario_g import ScenarioG
from .subjects import DRIVER_SERVICES, ON_CLUSTER, SUBJECTS
from .tables import case_table
from .targets import summary_table
from .trials import ScenarioResult, run_scenario

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        ScenarioA(),
        ScenarioB(),
        ScenarioC(),
        ScenarioD(),
        ScenarioE(),
        ScenarioF(),
        ScenarioG(),
    )
}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Benchmark crossws_channels against channels_redis, channels-postgres, "
            "Channels' in-memory layer and the raw transports. See docs/benchmarks.md."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 trials (~2 min)")
    parser.add_argument(
        "--scenarios",
        default="A,B,C,D,E,G",
        help="comma-separated subset of A,B,C,D,E,F,G (F, the cluster-size scan, is not run "
        "unless named)",
    )
    parser.add_argument(
        "--drivers",
        default="redis,pgsql,multiprocessing,local,nats",
        help=(
            "backends to measure: redis, pgsql, multiprocessing, local, nats; each brings this "
            "layer's driver and the peers and raw transport of that backend"
        ),
    )
    parser.add_argument(
        "--subjects",
        default=None,
        help=f"exact subjects instead of --drivers, from: {', '.join(SUBJECTS)}",
    )
    parser.add_argument("--trials", type=int, default=None, help="trials per case")
    parser.add_argument(
        "--messages", type=int, default=None, help="A: group messages per trial at K=1"
    )
    parser.add_argument("--relayed", type=int, default=None, help="E: relayed messages")
    parser.add_argument("--churn", type=int, default=None, help="E: consumer lifecycles")
    parser.add_argument(
        "--quiet-sample",
        type=float,
        default=None,
        metavar="SECONDS",
        help=(
            "before each trial, wait until no test run (pytest) is going and the CPUs "
            "stayed idle for SECONDS (default 0.5; with --quick 0: only look for test "
            "runs); a trial during which a test run started is measured again"
        ),
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="measure even while the machine is busy"
    )
    parser.add_argument(
        "--redis-url",
        default=environment.default_redis_url(),
        help="Redis to use (default: $CROSSWS_REDIS_URL or the local server)",
    )
    parser.add_argument(
        "--redis-cluster-url",
        default=os.environ.get("CROSSWS_REDIS_CLUSTER_URL"),
        help=(
            "one node of a Redis Cluster for the cluster subjects (default: "
            "$CROSSWS_REDIS_CLUSTER_URL, or a private 3-primary cluster on free ports, "
            "started for the run and removed after it)"
        ),
    )
    parser.add_argument(
        "--nats-url",
        default=environment.default_nats_url(),
        help="NATS (with JetStream) to use (default: $CROSSWS_NATS_URL or the local server)",
    )
    parser.add_argument(
        "--pg-dsn",
        default=environment.default_pg_dsn(),
        help=(
            "PostgreSQL to use (default: $CROSSWS_PG_DSN or the local server); the run "
            "creates a scratch database there and drops it at the end"
        ),
    )
    parser.add_argument("--json", dest="json_path", default=None, help="write samples here")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="run every benchmark process under cProfile and save its stats in DIR",
    )
    return parser


def _sizes(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else FULL
    if args.trials is not None:
        sizes = sizes.scaled(trials=max(1, args.trials))
    if args.messages is not None:
        messages = tuple((k, args.messages if k == 1 else n) for k, n in sizes.messages)
        sizes = sizes.scaled(messages=messages)
    if args.relayed is not None:
        sizes = sizes.scaled(relayed=args.relayed)
    if args.churn is not None:
        sizes = sizes.scaled(churn=args.churn)
    return sizes


def _selected(args: argparse.Namespace) -> set[str]:
    if args.subjects:
        chosen = set(_csv(args.subjects))
        unknown = chosen - set(SUBJECTS)
        if unknown:
            raise SystemExit(f"unknown subject(s): {', '.join(sorted(unknown))}")
        return chosen
    services = set()
    for name in _csv(args.drivers):
        if name not in DRIVER_SERVICES:
            raise SystemExit(f"unknown driver {name!r}; use {', '.join(DRIVER_SERVICES)}")
        services.add(DRIVER_SERVICES[name])
    return {key for key, subject in SUBJECTS.items() if subject.service in services}


def _nothing() -> None:
    pass


def _runs_any(names: list[str], sizes: Sizes, selected: set[str], subjects: Sequence[str]) -> bool:
    """Whether one of ``subjects`` is measured by the chosen scenarios."""
    wanted = selected & set(subjects)
    return any(
        wanted & set(case.subjects) for name in names for case in SCENARIOS[name].cases(sizes)
    )


def _progress(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _dump(path: str, results: list[ScenarioResult], meta: dict[str, Any]) -> None:
    data: dict[str, Any] = {"meta": meta, "scenarios": {}}
    for result in results:
        cases = data["scenarios"].setdefault(result.scenario.name, {})
        for case in result.cases:
            cases[case.case.label] = {
                "samples": {k: dict(v) for k, v in case.samples.items()},
                "errors": dict(case.errors),
                "skipped": case.skipped,
            }
    with open(path, "w") as out:
        json.dump(data, out, indent=1)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sizes = _sizes(args)
    selected = _selected(args)
    names = [name.upper() for name in _csv(args.scenarios)]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; use A, B, C, D, E, F, G")
    services = {SUBJECTS[key].service for key in selected}
    cluster_url: str | None = args.redis_cluster_url
    stop_cluster: Callable[[], None] = _nothing
    cluster_notes: list[str] = []
    if cluster_url is None and _runs_any(names, sizes, selected, ON_CLUSTER):
        cluster_url, stop_cluster = start_private_cluster(cluster_notes)
    try:
        env = environment.prepare(
            args.redis_url,
            args.pg_dsn,
            want_pg="pgsql" in services,
            want_mp="multiprocessing" in services,
            nats_url=args.nats_url if "nats" in services else None,
            redis_cluster_url=cluster_url if selected & set(ON_CLUSTER) else None,
        )
    except BaseException:
        stop_cluster()
        raise
    env = dataclasses.replace(env, notes=(*cluster_notes, *env.notes))
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        env = dataclasses.replace(env, profile_dir=os.path.abspath(args.profile))
    # Ctrl-C or a kill still removes the scratch database and the run's Redis keys.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    quiet: float | None = None
    if not args.no_wait:
        quiet = args.quiet_sample if args.quiet_sample is not None else (0 if args.quick else 0.5)
    started = time.monotonic()
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command.strip(),
        "machine": describe(env),
        "revision": revision(),
        "sizes": sizes.__dict__,
        "python": platform.python_version(),
        "pid": os.getpid(),
    }
    for note in env.notes:
        _progress(f"note: {note}")
    results: list[ScenarioResult] = []
    try:
        print(f"# crossws_channels benchmarks, {meta['date']}\n")
        print(f"`{meta['command']}` at {meta['revision']} on {meta['machine']}\n")
        for name in names:
            result = run_scenario(SCENARIOS[name], env, sizes, selected, _progress, quiet)
            results.append(result)
            for case in result.cases:
                if case.subjects or case.skipped:
                    print(case_table(result, case) + "\n", flush=True)
        print(summary_table(results))
        print(f"\nTotal time: {time.monotonic() - started:.0f} s")
        if args.json_path:
            _dump(args.json_path, results, meta)
    finally:
        environment.cleanup(env, args.pg_dsn)
        stop_cluster()
    return 0
