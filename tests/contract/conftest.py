"""``make_layer`` for the contract suite: the same tests on every driver.

Outside this package ``make_layer`` builds ``local`` layers; here it is parametrized over
:data:`tests.cluster.DRIVERS`, each layer of a test in one cluster on that driver, in this
process: ``local`` as it is, ``redis``, ``pgsql`` and ``nats`` over the shared servers (skipped, or
failed with ``CROSSWS_REQUIRE_SERVICES=1``, when one is down), ``multiprocessing`` with a
relay process of the test's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import VARIANTS, drop_storage, server_options, variant


@pytest.fixture(params=VARIANTS)
async def make_layer(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """Build layers on the parametrized driver (CONFIG overrides as keywords)."""
    from crossws_channels.layer import BackplaneChannelLayer

    driver, options = variant(request.param)
    options.update(server_options(request, driver, request.param[len(driver) :]))
    channel = f"ct-{uuid.uuid4().hex[:10]}"
    stack = contextlib.ExitStack()
    if driver == "multiprocessing":
        from tests.drivers.multiprocessing.support import RelayProcess, short_socket_dir

        socket_dir = stack.enter_context(short_socket_dir())
        options["socket_dir"] = str(socket_dir)
        stack.enter_context(RelayProcess(channel, socket_dir, tmp_path))
    layers: list[BackplaneChannelLayer] = []

    def make(**config: Any) -> BackplaneChannelLayer:
        layer = BackplaneChannelLayer(**{"driver": driver, "channel": channel, **options, **config})
        layers.append(layer)
        return layer

    try:
        yield make
    finally:
        for layer in layers:
            await asyncio.wait_for(layer.close(), 10)
        stack.close()
        # In a thread: dropping JetStream streams runs an event loop of its own.
        await asyncio.to_thread(drop_storage, driver, options, channel)
