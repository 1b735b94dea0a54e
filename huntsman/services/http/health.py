"""Health of the running service: event loop, compute pool, database and disk, each with a reason.

``/healthz`` answers ``200`` only when every check says ``ok``; the status page shows the same
record.  Every check has a deadline, so a stuck dependency makes the answer ``503`` with the
reason, never a hung probe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

from huntsman.config import HttpConfig
from huntsman.services.disk import DiskMonitor
from huntsman.store.database import Database
from huntsman.workers.pool import ComputePool

__all__ = ["Health", "HealthChecks"]

_POOL_CACHE_S = 5.0  # a no-op through the pool at most this often: probes do not load it


@dataclasses.dataclass(frozen=True)
class Health:
    ok: bool
    checks: dict[str, str]  # check -> "ok" or the reason it failed

    def text(self) -> str:
        """The ``/healthz`` body: ``ok`` or ``unhealthy``, then one line per check."""
        lines = ["ok" if self.ok else "unhealthy"]
        lines += [f"{k}: {v}" for k, v in self.checks.items()]
        return "\n".join(lines) + "\n"


class HealthChecks:
    """Runs the checks; :meth:`probe_loop` measures the event-loop lag they report."""

    def __init__(
        self,
        config: HttpConfig,
        database: Database,
        pool: ComputePool | None,
        disk: DiskMonitor | None = None,
    ) -> None:
        self.config = config
        self.database = database
        self.pool = pool
        self.disk = disk
        self.loop_lag_s = 0.0
        self._pool_cache: tuple[float, str] | None = None

    async def probe_loop(self, interval_s: float = 0.25) -> None:
        """Measure the event-loop lag until cancelled."""
        while True:
            start = time.monotonic()
            await asyncio.sleep(interval_s)
            self.loop_lag_s = max(0.0, time.monotonic() - start - interval_s)

    async def check(self) -> Health:
        checks: dict[str, str] = {}
        lag = self.loop_lag_s
        checks["loop"] = "ok" if lag <= self.config.max_loop_lag_s else f"event loop lag {lag:.2f} s"
        checks["pool"] = await self._pool_health()
        checks["database"] = await self._database_health()
        if self.disk is not None:
            checks["disk"] = self.disk.reason() or "ok"
        return Health(all(v == "ok" for v in checks.values()), checks)

    async def _database_health(self) -> str:
        try:
            await asyncio.wait_for(self.database.check(), self.config.db_timeout_s)
        except TimeoutError:
            return f"database did not answer within {self.config.db_timeout_s:g} s"
        except Exception as exc:
            return f"database check failed: {type(exc).__name__}: {exc}"[:300]
        return "ok"

    async def _pool_health(self) -> str:
        """A trivial job through the executor (not the job slots: never queued behind work)."""
        if self.pool is None:
            return "ok"
        if self._pool_cache is not None and time.monotonic() - self._pool_cache[0] < _POOL_CACHE_S:
            return self._pool_cache[1]
        result = await self._pool_noop(self.pool)
        self._pool_cache = (time.monotonic(), result)
        return result

    async def _pool_noop(self, pool: ComputePool) -> str:
        executor = pool.executor
        if getattr(executor, "_broken", False):
            return "worker pool is broken"
        try:
            fut = asyncio.get_running_loop().run_in_executor(executor, os.getpid)
            await asyncio.wait_for(fut, self.config.pool_timeout_s)
        except TimeoutError:
            # Every worker busy on long jobs is not a fault; an idle pool that cannot run a no-op is.
            if pool.in_flight > 0:
                return "ok"
            return f"pool did not run a no-op within {self.config.pool_timeout_s:g} s"
        except Exception as exc:
            return f"pool unusable: {type(exc).__name__}: {exc}"
        return "ok"
