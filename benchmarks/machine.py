"""The machine a run measured: CPUs, Python and server versions, for the results table."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from .env import Env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _redis_version(env: Env) -> str:
    if env.redis_url is None:
        return "n/a"
    try:
        import redis

        client = redis.Redis.from_url(env.redis_url)
        version = str(client.info("server")["redis_version"])
        client.close()
        return version
    except Exception:
        return "unknown"


def _pg_version(env: Env) -> str:
    if env.pg_dsn is None:
        return "n/a"
    try:
        import psycopg

        with psycopg.connect(env.pg_dsn) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]).split()[0] if row else "unknown"
    except Exception:
        return "unknown"


def describe(env: Env) -> str:
    return (
        f"{os.cpu_count()} CPU(s), {_cpu_model()}; Python {platform.python_version()}; "
        f"Redis {_redis_version(env)}; PostgreSQL {_pg_version(env)}; {platform.system()} "
        f"{platform.release()}"
    )


def revision() -> str:
    """The checkout's commit, with ``+changes`` when the package has uncommitted edits."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown revision"
    dirty = git("status", "--porcelain", "--", "crossws_channels")
    return f"commit {commit}" + (" +changes" if dirty else "")
