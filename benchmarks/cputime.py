"""CPU time of the servers a trial uses, to split "where the time goes" by process.

The benchmark processes measure their own CPU time (``time.process_time()``); this
module adds what the backplane's servers spent meanwhile: redis-server, the PostgreSQL
backends, nats-server, the multiprocessing relay. It reads ``/proc``, so it sees servers on this
machine only (elsewhere it reports nothing), and it counts whatever else those servers
did during the trial, which on a quiet machine is nothing.
"""

from __future__ import annotations

import os

# How each backplane's server processes are recognized: by name, or for the relay by its
# command line.
_SERVERS = {
    "redis": ("redis-server", None),
    "pgsql": ("postgres", None),
    "multiprocessing": (None, b"crossws_channels.relay"),
    "nats": ("nats-server", None),
}


def _ticks_per_second() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError):
        return 100


def _cpu_ticks(pid: str) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the line, 12 and 13 after the ")".
    return int(fields[11]) + int(fields[12])


def server_cpu(service: str) -> float | None:
    """CPU seconds used so far by the server processes of ``service`` on this machine."""
    name, cmdline = _SERVERS.get(service, (None, None))
    if name is None and cmdline is None:
        return None
    total = 0
    found = False
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            if name is not None:
                with open(f"/proc/{pid}/comm") as comm:
                    if comm.read().strip() != name:
                        continue
            else:
                with open(f"/proc/{pid}/cmdline", "rb") as cmd:
                    if cmdline is None or cmdline not in cmd.read():
                        continue
            total += _cpu_ticks(pid)
            found = True
        except (OSError, ValueError, IndexError):
            continue
    return total / _ticks_per_second() if found else None
