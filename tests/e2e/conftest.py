"""Fixtures of the end-to-end tests: a process launcher that always cleans up, and a
browser."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import unavailable
from tests.e2e.harness import Processes

if TYPE_CHECKING:
    from playwright.async_api import Browser


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


CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt if it is missing (browser tests only)."""
    if not CHROMIUM.exists() and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
        if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode:
            # A machine whose package lists are stale: refresh them once and try again.
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            subprocess.run(install, env=env, capture_output=True, timeout=900)
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is not installed and apt-get could not install it")
    return str(CHROMIUM)


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    """Chromium, headless, driven by Playwright (never a downloaded browser)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--no-proxy-server", "--disable-gpu"],
        )
        try:
            yield launched
        finally:
            await launched.close()
