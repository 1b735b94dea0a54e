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
from huntsman.models import DetectorConstants, IngestParams
from huntsman.science.offline import configure_offline_astropy
from huntsman.services.calib import CalibService
from huntsman.services.http import StatusServer
from huntsman.services.ingestor import FileIngestor
from huntsman.services.quality import QualityMonitor
from huntsman.services.reporter import ReportScheduler
from huntsman.services.solver import PlateSolver
from huntsman.services.tasks import cancel_and_wait
from huntsman.services.watcher import DirectoryWatcher
from huntsman.store.database import Database, open_database
from huntsman.workers.pool import ComputePool, process_pool_factory

__all__ = ["Application", "run_service"]


def ingest_params(config: Config) -> IngestParams:
    return IngestParams(
        camera_numbers=tuple(sorted(config.camera_numbers().items())),
        metrics=config.ingest.metrics,
        raw_root=str(config.paths.raw_dir.resolve()),
        detector=DetectorConstants(**config.detector.model_dump()),
    )


def make_pool(config: Config, log: Any, *, background: bool = False) -> ComputePool:
    """The ingestion pool, or (``background``) the pool for solving, calibration and QC.

    Two pools so that a 20 s plate solve or a master build never queues ahead of a file
    waiting to be ingested: ingestion latency is what the operator sees first.
    """
    log_format = "json" if config.logging.format == "auto" else config.logging.format
    workers = config.pool.background_workers if background else config.pool.max_workers
    factory = process_pool_factory(workers, config.pool.context, config.logging.level, log_format)
    return ComputePool(
        factory,
        max_in_flight=workers if background else config.pool.max_in_flight,
        job_timeout_s=config.pool.job_timeout_s,
        log=log,
    )


def make_calib_service(config: Config, database: Database, pool: ComputePool, log: Any) -> CalibService:
    return CalibService(
        database.exposures, database.calibs, pool, config.calib, config.detector,
        config.paths.calib_dir, log,
    )


def make_quality_monitor(config: Config, database: Database, pool: ComputePool, log: Any) -> QualityMonitor:
    database.calibs.max_age_days = config.calib.max_age_days
    return QualityMonitor(
        database.exposures, database.calibs, pool, config.qc, config.detector, config.paths, log,
    )


class Application:
    """The running service: its parts, their tasks and the staged shutdown."""

    def __init__(
        self,
        config: Config,
        database: Database,
        pool: ComputePool,
        log: Any,
        background: ComputePool | None = None,
    ) -> None:
        self.config = config
        self.database = database
        self.pool = pool
        self.background = background or pool
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
            config.paths.raw_dir, self.ingestor.submit, config.watcher, log, tracker=self.ingestor
        )
        self.calib = make_calib_service(config, database, self.background, log)
        self.ingestor.listeners.append(self.calib.notify)
        self.solver = PlateSolver(
            database.exposures,
            self.background,
            config.astrometry,
            config.detector,
            raw_dir=config.paths.raw_dir,
            extra_index_dir=config.paths.astrometry_dir,
            log=log,
        )
        self.ingestor.listeners.append(self.solver.on_ingested)
        self.quality = make_quality_monitor(config, database, self.background, log)
        if config.qc.enabled:
            self.calib.on_master_built.append(self.quality.on_master_built)
            self.solver.listeners.append(self.quality.on_wcs_final)
        self.reporter = ReportScheduler(database, config.report, config.paths.reports_dir, log)
        self.http = StatusServer(
            config.http, database, pool, state=self.state, reports_dir=config.paths.reports_dir, log=log
        )

    def state(self) -> dict[str, Any]:
        return {
            "running": True,
            "version": __version__,
            "raw_dir": str(self.config.paths.raw_dir),
            "ingest_queue": self.ingestor.queue.qsize(),
            "in_flight": self.pool.in_flight,
            "background_in_flight": self.background.in_flight,
            "counts": dict(self.ingestor.counts),
            "solve_queue": self.solver.queue.qsize(),
            "solve_counts": dict(self.solver.counts),
            "pool_rebuilds": self.pool.rebuilds,
            "calib": self.calib.state(),
            "qc": self.quality.state(),
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
            if self.config.calib.enabled:
                # Intake-like: cancelled first at shutdown; a build in progress is abandoned
                # (its raw frames are still in the database, so the next start builds it).
                intake.append(group.create_task(self.calib.run(), name="calib"))
            if self.config.report.auto:
                intake.append(group.create_task(self.reporter.run(), name="reporter"))
            if self.config.http.enabled:
                intake.append(group.create_task(self.http.run(), name="http"))
            work = [
                group.create_task(self.ingestor.run(), name="ingestor"),
                group.create_task(self.solver.run(), name="solver"),
            ]
            if self.config.qc.enabled:
                work.append(group.create_task(self.quality.run(), name="quality"))
            stopper = group.create_task(stop.wait(), name="stop-wait")
            pending: set[asyncio.Task[Any]] = {stopper, *intake, *work}
            while stopper in pending:
                done, pending = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
                for task in done - {stopper}:
                    task.result()  # a crashed service loop propagates; a finished one is fine
            self.log.info("shutdown_started", stage="intake")
            stopper.cancel()
            await cancel_and_wait(intake, shutdown.cancel_timeout_s, self.log)
            drained = await self.ingestor.drain(shutdown.drain_timeout_s)
            if not drained:
                self.log.warning("ingest_abandoned_at_shutdown", files=self.ingestor.abandoned())
            await cancel_and_wait(work, shutdown.cancel_timeout_s, self.log)
        self.log.info("shutdown_stage", stage="pool")
        await asyncio.gather(
            self.pool.shutdown(shutdown.pool_timeout_s),
            self.background.shutdown(shutdown.pool_timeout_s),
        )
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
        background = make_pool(config, log, background=True)
        await asyncio.gather(
            pool.warm_up(config.pool.max_workers),
            background.warm_up(config.pool.background_workers),
        )
        app = Application(config, database, pool, log, background)
        if started is not None:
            started(app)
        try:
            await app.run(stop)
        finally:
            await asyncio.gather(pool.shutdown(0), background.shutdown(0))
    log.info("service_stopped")
    return 0
