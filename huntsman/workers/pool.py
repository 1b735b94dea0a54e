"""The one owner of the compute executor.

Any :class:`concurrent.futures.Executor` factory works (a process pool here; a distributed
engine later), so services never touch the executor itself.  The pool bounds the number of
jobs in flight, gives each a timeout, and rebuilds a process pool that broke or hung.  Every
job runs inside :func:`~huntsman.workers.guard.call_guarded`, so what it raises comes back as
:class:`JobFailed` with the reason as text; worker processes die with the service and have
their memory capped (:mod:`huntsman.workers.lifeline`).
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

from huntsman.logs import Logger, configure_logging
from huntsman.workers.guard import JobRaised, call_guarded, describe_exception
from huntsman.workers.lifeline import die_with_parent, limit_memory, watch_service

__all__ = [
    "ComputePool",
    "JobFailed",
    "JobTimeout",
    "PoolBroken",
    "process_pool_factory",
    "worker_init",
]

T = TypeVar("T")


class JobTimeout(Exception):
    """A job ran longer than its timeout; its worker was replaced."""


class PoolBroken(Exception):
    """A worker died (killed, out of memory) while running the job."""


class JobFailed(Exception):
    """The job raised in the worker; the message is the exception's type and text."""


_FORKSERVER_PRELOAD = ["huntsman.workers.forkserver_init"]


def ignore_group_signals() -> None:
    """Signals sent to the whole process group are the service's to act on, not a worker's.

    supervisord stops the group (``stopasgroup``) and a terminal hang-up reaches the whole
    foreground group: a worker that died of it would fail its file with "a worker process died"
    during the drain.  Workers still never outlive the service (:mod:`huntsman.workers.lifeline`),
    and the pool ends them with SIGKILL.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def worker_init(
    log_level: str, log_format: str, service_pid: int = 0, memory_mb: int = 0
) -> None:
    """Runs first in every worker: tied to the service, memory capped, logging, SIGINT
    ignored, offline astropy."""
    if service_pid and os.getppid() != service_pid:
        # The parent is the fork server, a single-threaded child of the service: the kernel
        # kills this worker when it goes.  (Not with "spawn": there the parent is a thread of
        # the service, and a thread that ends would take the worker with it.)
        die_with_parent()
    watch_service(service_pid)
    # One BLAS/OpenMP thread per worker (numpy is not imported yet): the pool already has a
    # process per core, and every extra thread reserves address space counted by the cap.
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    limit_memory(memory_mb)
    ignore_group_signals()
    from huntsman.science.offline import configure_offline_astropy

    configure_offline_astropy()
    # After astropy's import, so that its logger joins the one stream.
    configure_logging(log_level, log_format, process=f"worker-{os.getpid()}")  # type: ignore[arg-type]


def warm() -> int:
    """A no-op job that imports what ingestion needs."""
    import huntsman.workers.ingest  # noqa: F401

    return os.getpid()


def process_pool_factory(
    max_workers: int,
    context: str = "forkserver",
    log_level: str = "INFO",
    log_format: str = "json",
    memory_mb: int = 0,
) -> Callable[[], concurrent.futures.Executor]:
    """Process pools whose workers die with this process and use at most ``memory_mb`` MiB
    of address space each (0: no cap)."""
    mp_context = multiprocessing.get_context(context)
    if context == "forkserver":
        # Only takes effect if the fork server is not running yet (it is started once).
        mp_context.set_forkserver_preload(_FORKSERVER_PRELOAD)

    def make() -> concurrent.futures.Executor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=max_workers,
            mp_context=mp_context,
            initializer=worker_init,
            initargs=(log_level, log_format, os.getpid(), memory_mb),
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
        log: Logger,
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
            name = getattr(fn, "__name__", "job")
            try:
                future = asyncio.get_running_loop().run_in_executor(
                    executor, call_guarded, fn, *args
                )
                try:
                    result = await asyncio.wait_for(future, timeout_s or self.job_timeout_s)
                except TimeoutError:
                    self._replace(executor, reason="job_timeout")
                    raise JobTimeout(
                        f"{name} exceeded {timeout_s or self.job_timeout_s:g} s"
                    ) from None
                except BrokenProcessPool:
                    self._replace(executor, reason="broken_pool")
                    raise PoolBroken("a worker process died while running the job") from None
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the result could not come back (e.g. not picklable)
                    reason = describe_exception(exc)
                    self._log.warning("job_raised", job=name, error=reason)
                    raise JobFailed(reason) from None
                self.completed += 1
                if isinstance(result, JobRaised):
                    self._log.warning(
                        "job_raised", job=name, error=result.reason, traceback=result.traceback
                    )
                    raise JobFailed(result.reason)
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
