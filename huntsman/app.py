"""Composition root: config → logging → store → pool → queues → services, staged shutdown.

The only module that knows every part.  Shutdown order: stop intake (watcher) → drain the
ingest queue up to a deadline → cancel what is left, logging the abandoned files (they are
redone at the next start, since no document was written for them) → shut the pool down →
close the database → stop the embedded server.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import Any

from huntsman import __version__
from huntsman.config import Config
from huntsman.logs import get_logger
from huntsman.models import IngestParams
from huntsman.science.offline import configure_offline_astropy
from huntsman.services.ingestor import FileIngestor
from huntsman.services.watcher import DirectoryWatcher
from huntsman.store.database import Database, open_database
from huntsman.workers.pool import ComputePool, process_pool_factory

__all__ = ["Application", "run_service"]


def ingest_params(config: Config) -> IngestParams:
    return IngestParams(
        camera_numbers=tuple(sorted(config.camera_numbers().items())),
        metrics=config.ingest.metrics,
        raw_root=str(config.paths.raw_dir.resolve()),
        **config.detector.model_dump(),
    )


def make_pool(config: Config, log: Any) -> ComputePool:
    log_format = "json" if config.logging.format == "auto" else config.logging.format
    factory = process_pool_factory(
        config.pool.max_workers, config.pool.context, config.logging.level, log_format
    )
    return ComputePool(
        factory,
        max_in_flight=config.pool.max_in_flight,
        job_timeout_s=config.pool.job_timeout_s,
        log=log,
    )


class Application:
    """The running service: its parts, their tasks and the staged shutdown."""

    def __init__(self, config: Config, database: Database, pool: ComputePool, log: Any) -> None:
        self.config = config
        self.database = database
        self.pool = pool
        self.log = log
        self.ingestor = FileIngestor(
            database.exposures,
            pool,
            ingest_params(config),
            config.ingest,
            config.watcher,
            log,
            concurrency=config.pool.max_in_flight,
        )
        self.watcher = DirectoryWatcher(
            config.paths.raw_dir, self.ingestor.submit, config.watcher, log
        )

    def state(self) -> dict[str, Any]:
        return {
            "running": True,
            "version": __version__,
            "raw_dir": str(self.config.paths.raw_dir),
            "ingest_queue": self.ingestor.queue.qsize(),
            "in_flight": self.pool.in_flight,
            "counts": dict(self.ingestor.counts),
            "pool_rebuilds": self.pool.rebuilds,
        }

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.database.services.beat(self.state())
            except Exception as exc:  # the database may be briefly away; keep beating
                self.log.warning("heartbeat_failed", error=str(exc))
            await asyncio.sleep(self.config.service.heartbeat_interval_s)

    async def run(self, stop: asyncio.Event) -> None:
        """Run every service until ``stop`` is set, then shut down in stages."""
        shutdown = self.config.shutdown
        async with asyncio.TaskGroup() as group:
            intake = [
                group.create_task(self.watcher.run(), name="watcher"),
                group.create_task(self._heartbeat(), name="heartbeat"),
            ]
            work = [group.create_task(self.ingestor.run(), name="ingestor")]
            stopper = group.create_task(stop.wait(), name="stop-wait")
            done, _ = await asyncio.wait([stopper, *intake, *work], return_when="FIRST_COMPLETED")
            if stopper not in done:
                for task in done:
                    task.result()  # a service loop crashed: let it propagate
            self.log.info("shutdown_started", stage="intake")
            stopper.cancel()
            for task in intake:
                task.cancel()
            drained = await self.ingestor.drain(shutdown.drain_timeout_s)
            if not drained:
                self.log.warning("ingest_abandoned_at_shutdown", files=self.ingestor.abandoned())
            for task in work:
                task.cancel()
        self.log.info("shutdown_stage", stage="pool")
        await self.pool.shutdown(shutdown.pool_timeout_s)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.database.services.stopped(), shutdown.database_timeout_s)


async def run_service(
    config: Config,
    stop: asyncio.Event | None = None,
    started: Callable[[Application], None] | None = None,
) -> int:
    """The service's root coroutine; ``stop`` is the injectable shutdown trigger.

    ``started`` is called with the application once its parts exist (tests use it).
    """
    log = get_logger(service="huntsman")
    configure_offline_astropy()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    log.info("service_starting", version=__version__, config=config.redacted())
    config.paths.raw_dir.mkdir(parents=True, exist_ok=True)
    async with open_database(config.database, log) as database:
        await database.ensure_indexes()
        pool = make_pool(config, log)
        await pool.warm_up(config.pool.max_workers)
        app = Application(config, database, pool, log)
        if started is not None:
            started(app)
        try:
            await app.run(stop)
        finally:
            await pool.shutdown(0)
    log.info("service_stopped")
    return 0
