"""A private Redis Cluster for the subjects that run on one, when the run is given none.

Three primaries without replicas on free ports, in temporary directories, started with
the same recipe as the tests' (:class:`tests.servers.RedisClusterDeployment`) and removed
when the run ends. The shared Redis is never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable


def start_private_cluster(notes: list[str]) -> tuple[str | None, Callable[[], None]]:
    """The URL of one node of a new cluster and how to stop it; ``None`` if none starts."""
    try:
        from tests.servers import RedisClusterDeployment
    except ImportError as exc:
        notes.append(f"no Redis Cluster ({exc}; run from the repository): skipped")
        return None, lambda: None
    deployment = RedisClusterDeployment(masters=3, replicas=0)
    try:
        deployment.start()
    except Exception as exc:
        with contextlib.suppress(Exception):
            deployment.close()
        notes.append(f"a private Redis Cluster did not start ({exc}): its subjects are skipped")
        return None, lambda: None
    return deployment.url, deployment.close
