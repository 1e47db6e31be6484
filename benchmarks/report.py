"""Statistics over trials and the tables that show them.

Tables are Markdown (GitHub) tables with padded columns, readable in a terminal and
pasteable into ``docs/benchmarks.md`` as they are.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Better = Literal["higher", "lower"]


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    digits: int = 0
    better: Better | None = None
    # False: the table shows the median only, not the min-max range.
    spread: bool = True


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    n: int


def summarize(values: Sequence[float]) -> Summary | None:
    if not values:
        return None
    return Summary(statistics.median(values), min(values), max(values), len(values))


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of the values lie (nearest rank)."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


def number(value: float, digits: int) -> str:
    if value != value:  # NaN
        return "n/a"
    if digits == 0 and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def cell(summary: Summary | None, digits: int, spread: bool = True) -> str:
    if summary is None:
        return "n/a"
    if not spread or summary.n == 1 or summary.low == summary.high:
        return number(summary.median, digits)
    return (
        f"{number(summary.median, digits)} "
        f"({number(summary.low, digits)}-{number(summary.high, digits)})"
    )


def ratio(mine: Summary | None, peer: Summary | None) -> str:
    if mine is None or peer is None or peer.median == 0:
        return ""
    value = mine.median / peer.median
    return f"{value:.2f}x"


def render(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))

    def line(cells: Sequence[str]) -> str:
        padded = (text.ljust(widths[i]) for i, text in enumerate(cells))
        return "| " + " | ".join(padded) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), separator, *(line(row) for row in rows)])
