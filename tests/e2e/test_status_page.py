"""The backplane status page in a real browser (Debian's Chromium, driven by Playwright).

Two daphne processes and a runworker of one cluster on Redis, as the demo runs them: the
page served by one of them shows all three instances, and a chart moves while messages
flow between the servers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page

from tests.e2e.harness import Processes, WSClient, http_get, project_env

pytestmark = [pytest.mark.slow, pytest.mark.redis]

# The first browser test may install Chromium with apt (see the chromium fixture).
BROWSER_TIMEOUT = pytest.mark.timeout(900)
# The page refreshes every 2 s: a few refreshes for what the checks wait for.
PAGE_TIMEOUT_MS = 20_000


async def instance_pids(page: Page) -> set[int]:
    pids: list[str] = await page.eval_on_selector_all(
        ".instance", "cards => cards.map(card => card.dataset.pid)"
    )
    return {int(pid) for pid in pids}


async def check_status_page(
    browser: Browser,
    url: str,
    pids: set[int],
    receiver: int,
    chat: Callable[[], Awaitable[None]],
    screenshot: Path,
) -> None:
    """The page at ``url`` shows the processes ``pids``, each connected, and the
    delivered/s chart of process ``receiver`` rises while ``chat`` runs."""
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    response = await page.goto(url)
    assert response is not None and response.status == 200
    await page.wait_for_function(
        f"document.querySelectorAll('.instance').length >= {len(pids)}", timeout=PAGE_TIMEOUT_MS
    )
    assert pids <= await instance_pids(page)
    assert await page.locator(".instance .state.up").count() >= len(pids)
    talking = asyncio.create_task(chat())
    # A rate above zero, drawn from at least two points.
    await page.wait_for_function(
        f"""() => {{
            const card = document.querySelector('.instance[data-pid="{receiver}"]');
            const chart = card && card.querySelector('tr[data-rate="delivered"] svg');
            return chart && Number(chart.dataset.points) >= 2 && Number(chart.dataset.last) > 0;
        }}""",
        timeout=PAGE_TIMEOUT_MS,
    )
    await talking
    line = page.locator(f'.instance[data-pid="{receiver}"] tr[data-rate="delivered"] polyline')
    assert len((await line.get_attribute("points") or "").split()) >= 2
    await page.screenshot(path=str(screenshot), full_page=True)
    assert errors == []
    await page.close()


@BROWSER_TIMEOUT
async def test_the_page_shows_every_process_and_its_charts_move(
    processes: Processes, redis_url: str, browser: Browser, tmp_path: Path
) -> None:
    """On Redis: both servers and the worker are on the page, connected, and the
    receiving server's delivered/s chart rises while a client of the other one chats.
    (The demo's own cluster, on multiprocessing, is checked in test_dev_script.)"""
    env = project_env("redis", redis_url=redis_url)
    first, second = processes.daphnes(2, env)
    worker = processes.runworker(env)
    alice = await WSClient.connect(first.room_url("status"))
    bob = await WSClient.connect(second.room_url("status"))
    try:
        for client in (alice, bob):
            await client.receive_type("welcome")

        async def chat() -> None:
            for n in range(60):
                await bob.send_json({"text": f"flowing {n}"})
                await asyncio.sleep(0.05)

        await check_status_page(
            browser,
            first.url("/backplane/"),
            {first.pid, second.pid, worker.pid},
            first.pid,
            chat,
            tmp_path / "status.png",
        )
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
