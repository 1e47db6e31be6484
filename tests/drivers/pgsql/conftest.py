"""Fixtures of the pgsql driver's own tests: clusters of drivers on the shared server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.drivers.pgsql.support import CONNECTORS, Cluster, cluster_of


@pytest.fixture(params=CONNECTORS)
def connector(request: pytest.FixtureRequest) -> str:
    """Each library the driver speaks through."""
    return str(request.param)


@pytest.fixture
async def cluster(pg_dsn: str, connector: str) -> AsyncIterator[Cluster]:
    """A cluster of drivers on the shared server, for each connector (this directory's
    ``cluster``, not the agent processes of tests/conftest.py)."""
    async with cluster_of(pg_dsn, connector) as made:
        yield made


@pytest.fixture
async def psycopg_cluster(pg_dsn: str) -> AsyncIterator[Cluster]:
    """A cluster of drivers on the shared server, psycopg only."""
    async with cluster_of(pg_dsn) as made:
        yield made
