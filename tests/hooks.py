"""on_error hooks importable by dotted path from test CONFIGs."""

from __future__ import annotations

import asyncio

calls: list[tuple[Exception, str]] = []


def record(error: Exception, stage: str) -> None:
    calls.append((error, stage))


async def record_async(error: Exception, stage: str) -> None:
    await asyncio.sleep(0)
    calls.append((error, stage))


def explode(error: Exception, stage: str) -> None:
    raise RuntimeError("the hook itself is broken")


not_callable = 42
