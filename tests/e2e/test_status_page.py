"""The backplane status page in a real browser (Debian's Chromium, driven by Playwright).

Two daphne processes and a runworker of one cluster on Redis, as the demo runs them: the
page served by one of them shows all three instances, and a chart moves while messages
flow between the servers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.e2e.harness import Processes, WSClient, http_get, project_env

pytestmark = [pytest.mark.slow, pytest.mark.redis]

# The page refreshes every 2 s: a few refreshes for what the checks wait for.
PAGE_TIMEOUT_MS = 20_000


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--no-proxy-server", "--disable-gpu"],
        )
        try:
            yield launched
        finally:
            await launched.close()


async def instance_pids(page: Page) -> set[int]:
    pids: list[str] = await page.eval_on_selector_all(
        ".instance", "cards => cards.map(card => card.dataset.pid)"
    )
    return {int(pid) for pid in pids}


async def test_the_page_shows_every_process_and_its_charts_move(
    processes: Processes, redis_url: str, browser: Browser, tmp_path: Any
) -> None:
    """Both servers and the worker are on the page, connected, and the receiving
    server's delivered/s chart rises while a client of the other one chats."""
    env = project_env("redis", redis_url=redis_url)
    first, second = processes.daphnes(2, env)
    worker = processes.runworker(env)
    alice = await WSClient.connect(first.room_url("status"))
    bob = await WSClient.connect(second.room_url("status"))
    try:
        for client in (alice, bob):
            await client.receive_type("welcome")
        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        response = await page.goto(first.url("/backplane/"))
        assert response is not None and response.status == 200
        await page.wait_for_function(
            "document.querySelectorAll('.instance').length >= 3", timeout=PAGE_TIMEOUT_MS
        )
        assert {first.pid, second.pid, worker.pid} <= await instance_pids(page)
        assert await page.locator(".instance .state.up").count() >= 3
        summary = await page.text_content("#summary")
        assert summary is not None and "driver redis" in summary

        async def chat() -> None:
            for n in range(60):
                await bob.send_json({"text": f"flowing {n}"})
                await asyncio.sleep(0.05)

        talking = asyncio.create_task(chat())
        # The receiving server's "delivered/s" chart: a rate above zero, drawn from points.
        await page.wait_for_function(
            f"""() => {{
                const card = document.querySelector('.instance[data-pid="{first.pid}"]');
                const chart = card && card.querySelector('tr[data-rate="delivered"] svg');
                return chart && Number(chart.dataset.points) >= 2
                    && Number(chart.dataset.last) > 0;
            }}""",
            timeout=PAGE_TIMEOUT_MS,
        )
        await talking
        line = page.locator(f'.instance[data-pid="{first.pid}"] tr[data-rate="delivered"] polyline')
        assert len((await line.get_attribute("points") or "").split()) >= 2
        await page.screenshot(path=str(tmp_path / "status.png"), full_page=True)
        assert errors == []
    finally:
        await alice.close()
        await bob.close()


async def test_the_page_and_its_data_are_refused_to_others(processes: Processes) -> None:
    """Outside testproject's rule (here: DEBUG off), the page and its data answer 403."""
    server = processes.daphne(project_env(extra={"DJANGO_DEBUG": "0"}))
    for path in ("/backplane/", "/backplane/status.json"):
        result = await http_get(server.url(path))
        assert result.status == 403, path
        assert "staff" in result.body
