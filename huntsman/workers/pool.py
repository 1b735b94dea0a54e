"""The one owner of the compute executor.

Any :class:`concurrent.futures.Executor` factory works (a process pool here; a distributed
engine later), so services never touch the executor itself.  The pool bounds the number of
jobs in flight, gives each a timeout, and rebuilds a process pool that broke or hung.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from huntsman.logs import configure_logging

__all__ = ["ComputePool", "JobTimeout", "PoolBroken", "process_pool_factory", "worker_init"]

T = TypeVar("T")


class JobTimeout(Exception):
    """A job ran longer than its timeout; its worker was replaced."""


class PoolBroken(Exception):
    """A worker died (killed, out of memory) while running the job."""


def worker_init(log_level: str, log_format: str) -> None:
    """Runs first in every worker: logging, SIGINT ignored, offline astropy."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(log_level, log_format, process=f"worker-{os.getpid()}")  # type: ignore[arg-type]
    from huntsman.science.offline import configure_offline_astropy

    configure_offline_astropy()


def warm() -> int:
    """A no-op job that imports what ingestion needs."""
    import huntsman.workers.ingest  # noqa: F401

    return os.getpid()


def process_pool_factory(
    max_workers: int, context: str = "forkserver", log_level: str = "INFO", log_format: str = "json"
) -> Callable[[], concurrent.futures.Executor]:
    def make() -> concurrent.futures.Executor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=max_workers,
            mp_context=multiprocessing.get_context(context),
            initializer=worker_init,
            initargs=(log_level, log_format),
        )

    return make


class ComputePool:
    """Runs top-level functions on the executor with back-pressure and timeouts."""

    def __init__(
        self,
        factory: Callable[[], concurrent.futures.Executor],
        *,
        max_in_flight: int,
        job_timeout_s: float,
        log: Any,
    ) -> None:
        self._factory = factory
        self._executor: concurrent.futures.Executor | None = factory()
        self._slots = asyncio.Semaphore(max_in_flight)
        self.job_timeout_s = job_timeout_s
        self._log = log
        self.in_flight = 0
        self.rebuilds = 0
        self.completed = 0

    @property
    def executor(self) -> concurrent.futures.Executor:
        if self._executor is None:
            self._executor = self._factory()
        return self._executor

    async def run(self, fn: Callable[..., T], *args: Any, timeout_s: float | None = None) -> T:
        """Run ``fn(*args)`` on the executor; waits for a free slot first."""
        async with self._slots:
            self.in_flight += 1
            executor = self.executor
            try:
                future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
                try:
                    result = await asyncio.wait_for(future, timeout_s or self.job_timeout_s)
                except TimeoutError:
                    self._replace(executor, reason="job_timeout")
                    raise JobTimeout(
                        f"{getattr(fn, '__name__', 'job')} exceeded {timeout_s or self.job_timeout_s:g} s"
                    ) from None
                except BrokenProcessPool:
                    self._replace(executor, reason="broken_pool")
                    raise PoolBroken("a worker process died while running the job") from None
                self.completed += 1
                return result
            finally:
                self.in_flight -= 1

    def _replace(self, executor: concurrent.futures.Executor, *, reason: str) -> None:
        """Swap in a fresh executor; the old one's workers are terminated."""
        if self._executor is not executor:
            return  # another job already replaced it
        self._executor = None
        self.rebuilds += 1
        self._log.warning("pool_rebuilt", reason=reason, rebuilds=self.rebuilds)
        _terminate(executor)

    async def warm_up(self, workers: int) -> None:
        """Start every worker and import the science stack now, not on the first file."""
        await asyncio.gather(*(self.run(warm) for _ in range(workers)))

    async def shutdown(self, timeout_s: float) -> None:
        """Let running jobs finish for up to ``timeout_s``, then terminate the workers."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(_join, _processes(executor), timeout_s)
        _terminate(executor)


def _processes(executor: concurrent.futures.Executor) -> list[Any]:
    procs = getattr(executor, "_processes", None) or {}
    return list(procs.values())


def _join(processes: list[Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))


def _terminate(executor: concurrent.futures.Executor) -> None:
    for proc in _processes(executor):
        if proc.is_alive():
            proc.kill()
    executor.shutdown(wait=False, cancel_futures=True)
