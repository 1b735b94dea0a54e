"""The compute pool: bounded, timed out jobs and a pool rebuilt after a worker dies."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from huntsman.logs import get_logger
from huntsman.workers.pool import ComputePool, JobTimeout, PoolBroken, process_pool_factory


def slow(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def die() -> None:
    os._exit(3)


@pytest.fixture
async def pool() -> ComputePool:
    factory = process_pool_factory(2, "forkserver")
    p = ComputePool(factory, max_in_flight=2, job_timeout_s=30, log=get_logger())
    yield p
    await p.shutdown(1)


async def test_jobs_run_in_worker_processes(pool: ComputePool) -> None:
    pids = await asyncio.gather(*(pool.run(slow, 0.2) for _ in range(4)))
    assert os.getpid() not in pids


async def test_in_flight_is_bounded(pool: ComputePool) -> None:
    peak = 0

    async def job() -> None:
        nonlocal peak
        task = asyncio.create_task(pool.run(slow, 0.3))
        await asyncio.sleep(0.05)
        peak = max(peak, pool.in_flight)
        await task

    await asyncio.gather(*(job() for _ in range(6)))
    assert peak == 2


async def test_timeout_replaces_the_pool(pool: ComputePool) -> None:
    with pytest.raises(JobTimeout):
        await pool.run(slow, 30, timeout_s=0.5)
    assert pool.rebuilds == 1
    assert await pool.run(slow, 0) != os.getpid()


async def test_dead_worker_rebuilds_the_pool(pool: ComputePool) -> None:
    with pytest.raises(PoolBroken):
        await pool.run(die)
    assert pool.rebuilds == 1
    assert isinstance(await pool.run(slow, 0), int)


async def test_any_executor_can_be_used() -> None:
    from concurrent.futures import ThreadPoolExecutor

    p = ComputePool(lambda: ThreadPoolExecutor(2), max_in_flight=2, job_timeout_s=5, log=get_logger())
    assert await p.run(slow, 0) == os.getpid()
    await p.shutdown(1)
