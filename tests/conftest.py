"""Shared fixtures: where the real servers are, and private ones for outage tests.

Tests reach Redis, PostgreSQL and NATS at the URLs in ``CROSSWS_REDIS_URL``,
``CROSSWS_PG_DSN`` and ``CROSSWS_NATS_URL`` (defaults: the local servers on their
standard ports). When a server
can't be reached the tests that need it are skipped, or fail when
``CROSSWS_REQUIRE_SERVICES=1`` (as in CI), so a missing service can't pass for green.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest

from tests.cluster import VARIANTS, Cluster, server_options, variant
from tests.servers import (
    PostgresServer,
    RedisClusterDeployment,
    RedisServer,
    SentinelDeployment,
)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REDIS_URL = os.environ.get("CROSSWS_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("CROSSWS_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("CROSSWS_NATS_URL", "nats://127.0.0.1:4222")
REQUIRE_SERVICES = os.environ.get("CROSSWS_REQUIRE_SERVICES") == "1"


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def unavailable(message: str) -> NoReturn:
    """Skip for a missing service, or fail with ``CROSSWS_REQUIRE_SERVICES=1``."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} and CROSSWS_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(message)


def _need(url: str, default_port: int, what: str) -> str:
    if _reachable(url, default_port):
        return url
    unavailable(f"{what} is not reachable at {url}")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the shared Redis server (skip or fail if it is down)."""
    return _need(REDIS_URL, 6379, "Redis")


@pytest.fixture(scope="session")
def nats_url() -> str:
    """URL of the shared NATS server, with JetStream (skip or fail if it is down)."""
    return _need(NATS_URL, 4222, "NATS")


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """DSN of the shared PostgreSQL server (skip or fail if it is down)."""
    return _need(PG_DSN, 5432, "PostgreSQL")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server the test may kill and restart."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def sentinel_deployment() -> Iterator[SentinelDeployment]:
    """A master, a replica and three sentinels on free ports, shared by the session's
    contract tests (which never fail it over: the failover tests start their own)."""
    with SentinelDeployment() as deployment:
        yield deployment


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterDeployment]:
    """A Redis Cluster of three primaries on free ports, shared by the session's contract
    tests (which never fail it over: the failover tests start their own)."""
    with RedisClusterDeployment(replicas=0) as deployment:
        yield deployment


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL server the test may stop and restart."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=VARIANTS)
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """Agent processes of one cluster, once per driver, plain and encrypted
    (tests.cluster)."""
    driver, options = variant(request.param)
    servers = server_options(request, driver, request.param[len(driver) :])
    made = Cluster(driver, {**options, **servers}, tmp_path)
    try:
        yield made
    finally:
        made.close()


# Layers


class ErrorLog:
    """An ``on_error`` hook that records what it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[Exception, str]] = []

    def __call__(self, error: Exception, stage: str) -> None:
        self.calls.append((error, stage))

    def of(self, kind: type[Exception], stage: str | None = None) -> list[Exception]:
        return [e for e, s in self.calls if isinstance(e, kind) and (stage is None or s == stage)]


@pytest.fixture
def errors() -> ErrorLog:
    """A fresh on_error hook recorder."""
    return ErrorLog()


@pytest.fixture
async def make_layer(request: pytest.FixtureRequest) -> Any:
    """Build layers (default: local driver, a channel unique to the test); close them after."""
    from crossws_channels.layer import BackplaneChannelLayer

    layers: list[BackplaneChannelLayer] = []
    channel = f"test-{uuid.uuid4().hex[:10]}"

    def make(**config: Any) -> BackplaneChannelLayer:
        config.setdefault("driver", "local")
        config.setdefault("channel", channel)
        layer = BackplaneChannelLayer(**config)
        layers.append(layer)
        return layer

    yield make
    for layer in layers:
        await asyncio.wait_for(layer.close(), 10)
