"""Fixtures of the end-to-end tests: a process launcher that always cleans up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.harness import Processes


@pytest.fixture
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    """Starts testproject processes; stops them all after the test.

    The processes' output is printed at teardown, which pytest shows when the test fails.
    """
    with Processes(tmp_path_factory.mktemp("processes")) as launched:
        try:
            yield launched
        finally:
            launched.stop_all()
            if launched.started:
                print(launched.report())
