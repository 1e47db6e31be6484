"""Keeping other work on the machine out of the numbers.

Numbers measured while something else runs (a test suite, a build) are worthless. Before
each trial the run waits until the machine is quiet: no test run (a process whose command
line mentions ``pytest``) and the CPUs mostly idle. After each trial it looks again: a
trial during which a test run started is discarded and repeated.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

BUSY_THRESHOLD = 0.25
"""Busy fraction of all CPUs, between trials, above which the machine is not quiet."""
SAMPLE_SECONDS = 0.5
WAIT_LIMIT = 1800.0


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return idle, sum(fields)


def busy_fraction(seconds: float = SAMPLE_SECONDS) -> float:
    """How busy all CPUs were over the next ``seconds`` (0 when it can't be read)."""
    try:
        idle0, total0 = _cpu_times()
        time.sleep(seconds)
        idle1, total1 = _cpu_times()
    except OSError:
        return 0.0
    total = total1 - total0
    return 0.0 if total <= 0 else 1.0 - (idle1 - idle0) / total


def test_runs() -> list[int]:
    """Process ids of running test suites (``pytest`` in the command line)."""
    found: list[int] = []
    mine = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == mine:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if b"pytest" in cmdline.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def wait_until_quiet(progress: Callable[[str], None], sample: float = SAMPLE_SECONDS) -> float:
    """Block until no test run is going and the CPUs are idle; return the seconds waited.

    ``sample`` is how long the CPUs are watched each time (0: only look for test runs).
    """
    started = time.monotonic()
    told = False
    while time.monotonic() - started < WAIT_LIMIT:
        runs = test_runs()
        busy = busy_fraction(sample) if sample > 0 else 0.0
        if not runs and busy < BUSY_THRESHOLD:
            return time.monotonic() - started
        if not told:
            why = f"test run(s) {runs[:3]}" if runs else f"CPUs {busy:.0%} busy"
            progress(f"waiting for the machine to be quiet ({why})")
            told = True
        time.sleep(2.0)
    progress("the machine did not get quiet; measuring anyway")
    return time.monotonic() - started
