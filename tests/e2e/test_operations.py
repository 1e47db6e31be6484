"""The operator commands against a running cluster of real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.e2e.harness import MANAGE_PY, Processes, WSClient, project_env
from tests.servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(MANAGE_PY), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_check_sees_every_server_process(processes: Processes, redis_url: str) -> None:
    """backplane_check, run as its own process, is answered by both daphne processes."""
    env = project_env("redis", redis_url=redis_url)
    servers = processes.daphnes(2, env)
    for server in servers:  # a WebSocket makes each server build its layer and subscribe
        client = await WSClient.connect(server.room_url("ops"))
        await client.receive_type("welcome")
        await client.close()
    result = manage(env, "backplane_check", "--json", "--timeout", "1")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["usable"] is True
    pids = {row["pid"] for row in report["instances"] if not row["this_command"]}
    assert pids == {server.pid for server in servers}

    stats = json.loads(manage(env, "backplane_stats", "--json", "--timeout", "1").stdout)
    by_pid = {row["pid"]: row["stats"] for row in stats["instances"]}
    for server in servers:
        assert by_pid[server.pid]["subscribed"] >= 1
        assert by_pid[server.pid]["driver"] == "redis"


def test_check_fails_when_redis_is_unreachable() -> None:
    """With nothing listening at the URL, the health probe exits non-zero and says why."""
    env = project_env("redis", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    result = manage(env, "backplane_check", "--timeout", "0.5")
    assert result.returncode != 0
    assert "unusable" in result.stderr
