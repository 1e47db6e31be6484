"""One table per case: medians (min-max) per subject, ratios to each peer, and counts."""

from __future__ import annotations

from .report import cell, ratio, render, summarize
from .subjects import SUBJECTS
from .trials import CaseResult, ScenarioResult

# Counts are added up over the trials, except these, which are typical values.
_TYPICAL = {"sent", "share"}


def case_table(scenario: ScenarioResult, result: CaseResult) -> str:
    layout = scenario.scenario.layout(result.case)
    primary = next(m for m in layout.metrics if m.key == layout.primary)
    peers = [
        p
        for p in layout.ratio_peers
        if p in result.subjects and result.samples[p].get(layout.primary)
    ]
    headers = [
        "subject",
        *(m.title for m in layout.metrics),
        *(f"vs {SUBJECTS[p].label}" for p in peers),
        *layout.counts,
    ]
    rows: list[list[str]] = []
    for key in result.subjects:
        samples = result.samples[key]
        row = [SUBJECTS[key].label]
        row += [cell(summarize(samples.get(m.key, [])), m.digits, m.spread) for m in layout.metrics]
        mine = summarize(samples.get(primary.key, []))
        row += [
            "" if p == key else ratio(mine, summarize(result.samples[p][primary.key]))
            for p in peers
        ]
        for name in layout.counts:
            values = samples.get(name, [])
            if not values:
                row.append("n/a")
            elif name in _TYPICAL:
                row.append(cell(summarize(values), 2 if name == "share" else 0))
            else:
                row.append(f"{sum(values):,.0f}")
        if result.errors.get(key):
            row[0] += f" ({len(result.errors[key])} failed)"
        rows.append(row)
    direction = "higher is better" if primary.better == "higher" else "lower is better"
    note = "Median (min-max) over trials. " if scenario.scenario.trials != 1 else ""
    if peers:
        note += f"`vs X`: ratio of medians of {primary.title} ({direction}). "
    if layout.counts:
        note += "Counts are totals over all trials."
    lines = [
        f"### {scenario.scenario.name}, {result.case.label}: {scenario.scenario.title}",
        "",
        render(headers, rows),
        "",
        note.strip(),
    ]
    for key in result.subjects:
        contended = sum(result.samples[key].get("contended", []))
        if contended:
            lines.append(
                f"{SUBJECTS[key].label}: {contended:.0f} trial(s) overlapped a test run "
                "even after retries."
            )
    for key, reason in result.skipped.items():
        lines.append(f"Skipped {SUBJECTS[key].label}: {reason}.")
    for key, errors in result.errors.items():
        lines.append(
            f"{SUBJECTS[key].label}: {len(errors)} trial(s) failed; first: "
            f"{errors[0].splitlines()[0]}"
        )
    return "\n".join(lines)
