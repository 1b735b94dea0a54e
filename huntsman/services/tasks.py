"""Cancellation that really stops tasks.

A library that swallows one ``CancelledError`` (a database call interrupted at the wrong
moment) would leave a consumer loop waiting on its queue for ever and hang the shutdown.
Consumer loops call :func:`raise_if_cancelling` between items, and the shutdown repeats the
cancellation of any task still running until its deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from huntsman.logs import Logger

__all__ = ["cancel_and_wait", "raise_if_cancelling"]


def raise_if_cancelling() -> None:
    """Raise ``CancelledError`` if this task was asked to stop, even if the request was eaten."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], timeout_s: float, log: Logger) -> bool:
    """Cancel tasks and wait for them, cancelling again any that carry on; ``False`` on timeout."""
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.error("tasks_not_stopped", tasks=sorted(t.get_name() for t in pending))
            return False
        _, pending = await asyncio.wait(pending, timeout=min(0.5, remaining))
    return True
