"""Interleaved trials: every subject once per round, rounds repeated.

Trial ``t`` runs the subjects in the order rotated by ``t`` (ABC, BCA, CAB, ...), so a
slow drift of the machine (another process, thermal throttling) spreads over all subjects
instead of penalizing whichever ran last.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from .env import Env, reset_channels_postgres
from .plan import Case, Progress, Scenario, Sizes
from .procs import TrialFailed
from .quiet import test_runs, wait_until_quiet
from .subjects import available

RETRIES = 5

Samples = dict[str, list[float]]


@dataclass
class CaseResult:
    case: Case
    samples: dict[str, Samples] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    skipped: dict[str, str] = field(default_factory=dict)
    subjects: list[str] = field(default_factory=list)


@dataclass
class ScenarioResult:
    scenario: Scenario
    cases: list[CaseResult]
    seconds: float


def rotate(items: list[str], by: int) -> list[str]:
    if not items:
        return items
    by %= len(items)
    return items[by:] + items[:by]


def _measure(
    scenario: Scenario,
    case: Case,
    key: str,
    env: Env,
    sizes: Sizes,
    trial: int,
    quiet_sample: float | None,
    progress: Progress,
) -> dict[str, float]:
    """One trial; with ``quiet_sample`` (not None), on a quiet machine only."""
    for _ in range(RETRIES):
        if quiet_sample is not None:
            wait_until_quiet(progress, quiet_sample)
        if key == "channels-postgres":
            reset_channels_postgres(env)
        values = scenario.run(case, key, env, sizes, trial)
        if quiet_sample is None or not test_runs():
            return values
        progress("a test run started during the trial: measuring it again")
    values["contended"] = 1
    return values


def run_scenario(
    scenario: Scenario,
    env: Env,
    sizes: Sizes,
    selected: set[str] | None,
    progress: Progress,
    quiet_sample: float | None = None,
) -> ScenarioResult:
    started = time.monotonic()
    results: list[CaseResult] = []
    trials = scenario.trials or sizes.trials
    for case in scenario.cases(sizes):
        result = CaseResult(case)
        results.append(result)
        for key in case.subjects:
            if selected is not None and key not in selected:
                continue
            reason = available(key, env)
            if reason is not None:
                result.skipped[key] = reason
            else:
                result.subjects.append(key)
        for trial in range(trials):
            for key in rotate(result.subjects, trial):
                where = f"{scenario.name} {case.label} trial {trial + 1}/{trials} {key}"
                t0 = time.monotonic()
                try:
                    values = _measure(
                        scenario, case, key, env, sizes, trial, quiet_sample, progress
                    )
                except TrialFailed as exc:
                    result.errors[key].append(f"{exc}\n{exc.details}".strip())
                    progress(f"{where}: FAILED {exc}")
                    continue
                for metric, value in values.items():
                    result.samples[key][metric].append(value)
                shown = ", ".join(f"{m}={v:,.4g}" for m, v in values.items())
                progress(f"{where}: {shown} [{time.monotonic() - t0:.1f} s]")
    return ScenarioResult(scenario, results, time.monotonic() - started)
