"""One rendering of a page shared by every request within ``cache_s`` (single flight).

Requests arriving while a rendering is under way wait for it, and those arriving within
``cache_s`` of its success get its text: a flood of page loads costs the database one query
set per ``cache_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["RenderCache"]


class RenderCache:
    """Shares renderings by key; :attr:`renders` counts those actually made."""

    def __init__(self, cache_s: float) -> None:
        self.cache_s = cache_s
        self.renders = 0
        self._entries: dict[str, tuple[float, asyncio.Task[str]]] = {}

    async def get(self, key: str, render: Callable[[], Coroutine[Any, Any, str]]) -> str:
        if self.cache_s <= 0:
            self.renders += 1
            return await render()
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is None or not _reusable(entry[1], now - entry[0], self.cache_s):
            self.renders += 1
            task: asyncio.Task[str] = asyncio.get_running_loop().create_task(
                render(), name=f"http-render-{key}"
            )
            task.add_done_callback(_retrieve)  # a failure nobody waited for is not an error
            entry = self._entries[key] = (now, task)
        # Shielded: a client that goes away does not cancel the rendering the others wait for.
        return await asyncio.shield(entry[1])

    def cancel(self) -> None:
        """Cancel the renderings under way (the server is stopping)."""
        for _, task in self._entries.values():
            task.cancel()


def _reusable(task: asyncio.Task[str], age_s: float, cache_s: float) -> bool:
    """A rendering under way, or one that succeeded less than ``cache_s`` ago."""
    if not task.done():
        return True
    return not task.cancelled() and task.exception() is None and age_s < cache_s


def _retrieve(task: asyncio.Task[str]) -> None:
    if not task.cancelled():
        task.exception()
