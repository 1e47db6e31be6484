"""How big a run is: sizes for the full run and for ``--quick``, and the scenario shape."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .env import Env
from .report import Metric


@dataclass(frozen=True)
class Sizes:
    trials: int = 5
    # A: group messages per trial for K=1 and K=100 members, and a time cap per trial.
    messages: tuple[tuple[int, int], ...] = ((1, 50_000), (100, 5_000))
    max_seconds: float = 8.0
    # Receipts a sender may be ahead of its receivers (flow control; see tally.throttle).
    window: int = 20_000
    # B: round trips per trial, after `warm_pings` that are not counted.
    pings: int = 2_000
    warm_pings: int = 100
    # C: deliveries per trial, spread over N members.
    fanout: tuple[int, ...] = (10, 1000)
    fanout_deliveries: int = 50_000
    # D: messages to the worker channel per trial (at most `max_seconds` of sending), and
    # how many the producer may be ahead of the consumers.
    worker_messages: int = 20_000
    worker_window: int = 1_000
    # E: relayed messages, and consumer lifecycles.
    relayed: int = 1_000_000
    churn: int = 100_000
    # F: messages per trial, spread over the N groups of the cluster.
    scale_messages: int = 20_000
    # Receivers stop after this long without a message once the sender is done.
    idle: float = 2.0
    trial_timeout: float = 180.0

    def scaled(self, **changes: Any) -> Sizes:
        return replace(self, **changes)


FULL = Sizes()
QUICK = Sizes(
    trials=2,
    messages=((1, 5_000), (100, 300)),
    max_seconds=1.0,
    window=10_000,
    pings=300,
    warm_pings=30,
    fanout_deliveries=5_000,
    worker_messages=1_000,
    relayed=20_000,
    churn=4_000,
    scale_messages=2_000,
    idle=1.0,
    trial_timeout=60.0,
)


@dataclass(frozen=True)
class Case:
    """One table of a scenario: a label, its parameters, and who is measured."""

    label: str
    params: dict[str, Any]
    subjects: tuple[str, ...]


@dataclass(frozen=True)
class Layout:
    """How a scenario's table looks: its metrics, which one ratios compare, and counts."""

    metrics: tuple[Metric, ...]
    primary: str
    counts: tuple[str, ...] = ()
    ratio_peers: tuple[str, ...] = field(default=())


class Scenario(Protocol):
    name: str
    title: str
    trials: int | None  # None: as many as the run's --trials

    def cases(self, sizes: Sizes) -> list[Case]: ...

    def layout(self, case: Case) -> Layout: ...

    def run(self, case: Case, subject: str, env: Env, sizes: Sizes, trial: int) -> dict[str, float]:
        """Measure ``subject`` once; return metric values (counts included)."""


Progress = Callable[[str], None]
