"""Fixtures of the multiprocessing driver's own tests: a socket directory, a cluster name
and a standalone relay for them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.drivers.multiprocessing.support import RelayProcess, short_socket_dir


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A fresh, short socket_dir."""
    with short_socket_dir() as directory:
        yield directory


@pytest.fixture
def channel() -> str:
    """A cluster name unique to the test."""
    return f"mp-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def relay(channel: str, socket_dir: Path, tmp_path: Path) -> Iterator[RelayProcess]:
    """A running standalone relay for ``channel``."""
    with RelayProcess(channel, socket_dir, tmp_path) as process:
        yield process
