"""The compute pool: bounded, timed out jobs, a pool rebuilt after a worker dies, and whatever a
job raises (unpicklable, ``MemoryError``, ``SystemExit``) back as :class:`JobFailed` text."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from huntsman.config import ConfigError, load_config
from huntsman.logs import get_logger
from huntsman.workers.pool import (
    ComputePool,
    JobFailed,
    JobTimeout,
    PoolBroken,
    process_pool_factory,
)
from tests.conftest import ROOT, python_env


def slow(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def die() -> None:
    os._exit(3)


class Unpicklable(Exception):
    """Like astropy's CfitsioException: raised in a worker, it cannot be pickled back."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.callback = lambda: None


def raise_unpicklable() -> None:
    raise Unpicklable("decompression error: hit end of compressed byte stream")


def allocate(n_bytes: int) -> int:
    return len(bytearray(n_bytes))


def exit_job() -> None:
    sys.exit(5)


def unpicklable_result() -> object:
    return lambda: None


def address_space_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_AS)[0]


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


async def test_unpicklable_exception_comes_back_as_text(pool: ComputePool) -> None:
    with pytest.raises(JobFailed) as caught:
        await pool.run(raise_unpicklable)
    assert str(caught.value) == "Unpicklable: decompression error: hit end of compressed byte stream"
    assert pool.rebuilds == 0  # the worker lives on
    assert isinstance(await pool.run(slow, 0), int)


async def test_system_exit_and_unpicklable_result_are_failures(pool: ComputePool) -> None:
    with pytest.raises(JobFailed, match=r"^SystemExit: 5$"):
        await pool.run(exit_job)
    with pytest.raises(JobFailed, match="Can't pickle"):
        await pool.run(unpicklable_result)
    assert pool.rebuilds == 0


async def test_worker_memory_is_capped() -> None:
    own_limit = address_space_limit()
    factory = process_pool_factory(1, "forkserver", memory_mb=1024)
    p = ComputePool(factory, max_in_flight=1, job_timeout_s=30, log=get_logger())
    try:
        assert await p.run(address_space_limit) == 1024 * 2**20
        with pytest.raises(JobFailed, match=r"^MemoryError"):
            await p.run(allocate, 2 * 2**30)
        assert await p.run(allocate, 100 * 2**20) == 100 * 2**20  # the worker recovered
        assert p.rebuilds == 0
    finally:
        await p.shutdown(1)
    assert address_space_limit() == own_limit  # the service itself is not capped


async def test_no_cap_when_zero(pool: ComputePool) -> None:
    assert await pool.run(address_space_limit) == resource.getrlimit(resource.RLIMIT_AS)[0]


def test_master_budget_must_fit_under_the_worker_cap(tmp_path: Path) -> None:
    env = {"HUNTSMAN_POOL__WORKER_MEMORY_MB": "1024", "HUNTSMAN_CALIB__STACK__MEMORY_LIMIT_MB": "1024"}
    with pytest.raises(ConfigError, match=r"pool\.worker_memory_mb \(1024\) must be at least"):
        load_config(ROOT / "etc" / "huntsman.yaml", environ=env, root=tmp_path)
    env["HUNTSMAN_POOL__WORKER_MEMORY_MB"] = "0"  # no cap
    assert load_config(ROOT / "etc" / "huntsman.yaml", environ=env, root=tmp_path).pool.worker_memory_mb == 0


pytestmark = pytest.mark.slow  # real process pools, started and killed many times

OWNER = """
import asyncio, sys, time
from huntsman.logs import get_logger
from huntsman.workers.pool import ComputePool, process_pool_factory

async def main() -> None:
    pool = ComputePool(process_pool_factory(2, sys.argv[1]), max_in_flight=2, job_timeout_s=600,
                       log=get_logger())
    jobs = [asyncio.ensure_future(pool.run(time.sleep, 600)) for _ in range(2)]
    while pool.in_flight < 2:
        await asyncio.sleep(0.05)
    print("busy", flush=True)
    await asyncio.gather(*jobs)

if __name__ == "__main__":
    asyncio.run(main())
"""


@pytest.mark.parametrize("context", ["forkserver", "spawn"])
def test_busy_workers_die_with_their_owner(context: str, tmp_path: Path) -> None:
    """SIGKILL the pool's owner while both workers are in a job: nothing of the pool remains."""
    import psutil

    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    owner = subprocess.Popen(
        [sys.executable, str(script), context], stdout=subprocess.PIPE, text=True,
        env=python_env(),
    )
    children: list[psutil.Process] = []
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "busy"
        children = psutil.Process(owner.pid).children(recursive=True)
        assert len(children) >= 3  # two workers, the resource tracker (and the fork server)
        owner.kill()
        owner.wait(10)
        _, alive = psutil.wait_procs(children, timeout=5)
        alive = [p for p in alive if _running(p)]
        assert not alive, [" ".join(p.cmdline())[:100] for p in alive]
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.stdout.close()
        for p in children:
            with contextlib.suppress(psutil.Error):
                p.kill()


def _running(proc: object) -> bool:
    import psutil

    assert isinstance(proc, psutil.Process)
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
