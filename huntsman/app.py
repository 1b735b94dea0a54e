"""Composition root: lock → config → logging → store → pool → queues → services, staged shutdown.

The only module that knows every part.  The service lock on the var directory is taken before
anything else starts and held for the process lifetime: a second service on the same data is
refused (:class:`huntsman.lock.LockHeld`) having touched nothing.  SIGTERM, SIGINT and SIGHUP
all trigger the same shutdown.  Shutdown order, each stage with its deadline: stop intake
(watcher, database monitor) → drain the ingest queue → cancel what is left, logging the
abandoned files (they are redone at the next start, since no document was written for them)
→ shut the pool down → the heartbeat's final write → close the database client → stop the
embedded server.  The sum is ``Config.shutdown_budget_s()``, below supervisord's stopwaitsecs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from huntsman import __version__
from huntsman.config import Config, redact_uri
from huntsman.lock import EMBEDDED_LOCK, SERVICE_LOCK, LockHeld, PidLock
from huntsman.logs import Logger, get_logger
from huntsman.models import FileSource, IngestParams
from huntsman.paths import private_dir
from huntsman.science.offline import configure_offline_astropy
from huntsman.service_config import write_service_config
from huntsman.services.calib import CalibService
from huntsman.services.disk import DATABASE, DiskMonitor, watched_paths
from huntsman.services.http import StatusServer
from huntsman.services.ingestor import FileIngestor
from huntsman.services.quality import QualityMonitor
from huntsman.services.reporter import ReportScheduler
from huntsman.services.solver import PlateSolver
from huntsman.services.tasks import cancel_and_wait, raise_if_cancelling
from huntsman.services.watcher import DirectoryWatcher
from huntsman.store.calibs import CalibCollection
from huntsman.store.database import (
    Database,
    DatabaseMonitor,
    database_away,
    open_database,
    short_error,
)
from huntsman.store.embedded import EmbeddedServerError
from huntsman.workers.pool import ComputePool, process_pool_factory

__all__ = ["EXIT_DATABASE_LOST", "Application", "run_service"]

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
EXIT_DATABASE_LOST = 1  # the database cannot come back: supervisord restarts the whole process


def ingest_params(config: Config) -> IngestParams:
    return IngestParams(
        camera_numbers=tuple(sorted(config.camera_numbers().items())),
        metrics=config.ingest.metrics,
        raw_root=str(config.paths.raw_dir.resolve()),
        detector=config.detector,
        max_pixels=config.ingest.max_pixels,
    )


def make_pool(config: Config, log: Logger, *, background: bool = False) -> ComputePool:
    """The ingestion pool, or (``background``) the pool for solving, calibration and QC.

    Two pools so that a 20 s plate solve or a master build never queues ahead of a file
    waiting to be ingested: ingestion latency is what the operator sees first.
    """
    log_format = "json" if config.logging.format == "auto" else config.logging.format
    workers = config.pool.background_workers if background else config.pool.max_workers
    factory = process_pool_factory(
        workers, config.pool.context, config.logging.level, log_format, config.pool.worker_memory_mb
    )
    return ComputePool(
        factory,
        max_in_flight=workers if background else config.pool.max_in_flight,
        job_timeout_s=config.pool.job_timeout_s,
        log=log,
    )


def calib_repository(config: Config, database: Database) -> CalibCollection:
    """The masters repository of the services, built with ``calib.max_age_days`` (never set later)."""
    shared = database.calibs
    return CalibCollection(shared.collection, shared.status, max_age_days=config.calib.max_age_days)


def make_calib_service(config: Config, database: Database, pool: ComputePool, log: Logger) -> CalibService:
    return CalibService(
        database.exposures, calib_repository(config, database), pool, config.calib, config.detector,
        config.paths.calib_dir, log,
    )


def make_quality_monitor(
    config: Config, database: Database, pool: ComputePool, log: Logger, *, sweeps: bool = True
) -> QualityMonitor:
    """``sweeps=False`` for a command: it measures the frames it is given, and no others."""
    return QualityMonitor(
        database.exposures, calib_repository(config, database), pool, config.qc, config.detector,
        config.paths, log, sweeps=sweeps,
    )


class Application:
    """The running service: its parts, their tasks and the staged shutdown."""

    def __init__(
        self,
        config: Config,
        database: Database,
        pool: ComputePool,
        log: Logger,
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
            write_retry_s=config.database.write_retry_s,
        )
        self.watcher = DirectoryWatcher(
            config.paths.raw_dir, self.ingestor.submit, config.watcher, log, tracker=self.ingestor
        )
        self.calib = make_calib_service(config, database, self.background, log)
        self.ingestor.add_listener(self.calib.notify)
        self.solver = PlateSolver(
            database.exposures,
            self.background,
            config.astrometry,
            config.detector,
            raw_dir=config.paths.raw_dir,
            extra_index_dir=config.paths.astrometry_dir,
            log=log,
        )
        self.ingestor.add_listener(self.solver.on_ingested)
        self.quality = make_quality_monitor(config, database, self.background, log)
        if config.qc.enabled:
            self.calib.on_master_built.append(self.quality.on_master_built)
            self.solver.listeners.append(self.quality.on_wcs_final)
        self.disk = DiskMonitor(config.disk, watched_paths(config), log)
        for writer in (self.ingestor, self.solver, self.calib, self.quality):
            writer.disk = self.disk
        self.reporter = ReportScheduler(database, config.report, config.paths.reports_dir, log)
        self.http = StatusServer(
            config.http, database, pool, state=self.state, reports_dir=config.paths.reports_dir, log=log,
            disk=self.disk,
        )
        self._reconcile_wanted = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self._loop_retry_s = config.database.monitor_interval_s
        self.exit_code = 0
        self.monitor = DatabaseMonitor(
            database, config.database, log, on_recovered=self._reconcile_wanted.set,
            on_lost=self._database_lost,
            may_restart=lambda: not self.disk.low((DATABASE,)),
        )

    def _database_lost(self, reason: str) -> None:
        """The database cannot come back: shut down and exit non-zero (supervisord restarts)."""
        self.exit_code = EXIT_DATABASE_LOST
        self.log.error("service_exiting", reason=reason, exit_code=self.exit_code)
        if self._stop is not None:
            self._stop.set()

    async def _reconciler(self) -> None:
        """After the database returns, scan the raw tree so every file gets its document.

        Twice: at once, and again when every operation issued during the outage has either
        succeeded or failed (their files are then no longer in flight and are picked up).
        """
        settle_s = self.config.database.server_selection_timeout_s
        while True:
            raise_if_cancelling()
            await self._reconcile_wanted.wait()
            self._reconcile_wanted.clear()
            await self.watcher.ready.wait()
            for _ in range(2):
                files = await self.watcher.scan(self.watcher.root, FileSource.RECONCILE)
                self.log.info("reconciled_after_outage", files=files)
                await asyncio.sleep(settle_s)

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
            "database": self.monitor.state(),
            "disk": self.disk.state(),
        }

    async def _heartbeat(self) -> None:
        deadline_s = self.config.database.server_selection_timeout_s
        while True:
            raise_if_cancelling()
            try:
                await asyncio.wait_for(self.database.services.beat(self.state()), deadline_s)
            except Exception as exc:  # the database may be briefly away; keep beating
                self.log.warning("heartbeat_failed", error=short_error(exc))
            await asyncio.sleep(self.config.service.heartbeat_interval_s)

    async def _outlasting_outages(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a service loop; one stopped by the database being away is started again.

        The loop's start-up pass then catches up on what it missed.  Any other exception is
        a bug and propagates (the process exits and supervisord restarts it).
        """
        while True:
            try:
                await loop()
                return
            except Exception as exc:
                if not database_away(exc):
                    raise
                self.log.warning("service_loop_interrupted", service=name,
                                 error=type(exc).__name__, retry_in_s=self._loop_retry_s)
            await asyncio.sleep(self._loop_retry_s)

    async def run(self, stop: asyncio.Event) -> None:
        """Run every service until ``stop`` is set, then shut down in stages."""
        shutdown = self.config.shutdown
        self._stop = stop

        def service(group: asyncio.TaskGroup, name: str, loop: Callable[[], Awaitable[None]]) -> Any:
            return group.create_task(self._outlasting_outages(name, loop), name=name)

        await self.disk.check()  # a full disk pauses the writers from their first item
        async with asyncio.TaskGroup() as group:
            intake = [
                group.create_task(self.watcher.run(), name="watcher"),
                group.create_task(self._heartbeat(), name="heartbeat"),
                group.create_task(self.monitor.run(), name="database-monitor"),
                group.create_task(self._reconciler(), name="reconciler"),
            ]
            if self.config.calib.enabled:
                # Intake-like: cancelled first at shutdown; a build in progress is abandoned
                # (its raw frames are still in the database, so the next start builds it).
                intake.append(service(group, "calib", self.calib.run))
            if self.config.report.auto:
                intake.append(service(group, "reporter", self.reporter.run))
            if self.config.http.enabled:
                intake.append(group.create_task(self.http.run(), name="http"))
            work = [
                # Work stage: keeps measuring while the queues drain (waiters need its news).
                group.create_task(self.disk.run(), name="disk"),
                service(group, "ingestor", self.ingestor.run),
                service(group, "solver", self.solver.run),
            ]
            if self.config.qc.enabled:
                work.append(service(group, "quality", self.quality.run))
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
        self.log.info("shutdown_stage", stage="database")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.database.services.stopped(), shutdown.database_timeout_s)


async def announce_ready(app: Application, log: Logger, timeout_s: float = 300.0) -> None:
    """Once files are watched: where to copy them and how to see results (log, and terminal)."""
    try:
        await asyncio.wait_for(app.watcher.ready.wait(), timeout_s)
    except TimeoutError:
        log.warning("service_not_ready", waited_s=timeout_s)
        return
    config = app.config
    commands = ["python -m huntsman status", "python -m huntsman export --no-header",
                "python -m huntsman report"]
    page = f"http://{config.http.host}:{config.http.port}/" if config.http.enabled else None
    log.info("service_ready", raw_dir=str(config.paths.raw_dir), commands=commands, status_page=page)
    if sys.stderr.isatty():
        where = f", or open {page}" if page else ""
        print(
            f"huntsman is running: copy FITS files into {config.paths.raw_dir}; see the results "
            f"with `{commands[0]}`{where} (Ctrl-C stops it)",
            file=sys.stderr,
            flush=True,
        )


async def run_service(
    config: Config,
    stop: asyncio.Event | None = None,
    started: Callable[[Application], None] | None = None,
    *,
    lock: PidLock | None = None,
    storage_lock: PidLock | None = None,
) -> int:
    """The service's root coroutine; ``stop`` is the injectable shutdown trigger.

    ``started`` is called with the application once its parts exist (tests use it).  Raises
    :class:`huntsman.lock.LockHeld`, having touched nothing, if a service already runs on
    this var directory (``lock``, ``storage_lock``: already taken by the caller, who
    releases them).  Returns the exit code: 0, or :data:`EXIT_DATABASE_LOST`.
    """
    # First of all: one service per data directory (the kernel drops the lock if we die),
    # then at once the embedded storage, so that a command-line tool started meanwhile
    # waits for our server instead of starting its own.
    own: list[PidLock] = []
    try:
        if lock is None or not lock.held:
            lock = PidLock(config.paths.var_dir / SERVICE_LOCK)
            own.append(await asyncio.to_thread(lock.acquire))
        if storage_lock is None and config.database.uri == "embedded":
            storage_lock = PidLock(config.database.embedded.storage_dir / EMBEDDED_LOCK)
            own.append(await asyncio.to_thread(
                storage_lock.acquire, config.database.embedded.start_timeout_s
            ))
        return await _run_locked(config, stop, started, storage_lock)
    except LockHeld as exc:
        if exc.path.name == EMBEDDED_LOCK:
            raise EmbeddedServerError(
                f"the embedded database on {exc.path.parent} is in use by pid {exc.pid or '?'}"
            ) from None
        raise
    finally:
        for held in reversed(own):
            held.release()


async def _run_locked(
    config: Config,
    stop: asyncio.Event | None,
    started: Callable[[Application], None] | None,
    storage_lock: PidLock | None,
) -> int:
    log = get_logger(service="huntsman")
    configure_offline_astropy()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in SHUTDOWN_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, _on_signal, log, sig, stop)
    log.info(
        "service_starting",
        version=__version__,
        pid=os.getpid(),
        raw_dir=str(config.paths.raw_dir),
        database="embedded" if config.database.uri == "embedded" else "external",
        database_uri=redact_uri(config.database.uri),
        workers=config.pool.max_workers,
        background_workers=config.pool.background_workers,
    )
    log.debug("service_config", config=config.redacted())
    await asyncio.to_thread(private_dir, config.paths.var_dir)  # owner-only (0700)
    await asyncio.to_thread(config.paths.raw_dir.mkdir, parents=True, exist_ok=True)
    close_timeout_s = config.shutdown.close_timeout_s
    async with open_database(
        config.database, log, close_timeout_s=close_timeout_s, storage_lock=storage_lock
    ) as database:
        await database.ensure_indexes()
        # Command-line tools act with this configuration by default (huntsman/service_config.py).
        try:
            written = await asyncio.to_thread(write_service_config, config)
            log.info("service_config_written", path=str(written))
        except OSError as exc:  # e.g. a full var directory: the service still runs
            log.warning("service_config_not_written", error=f"{type(exc).__name__}: {exc}")
        pool = make_pool(config, log)
        background = make_pool(config, log, background=True)
        await asyncio.gather(
            pool.warm_up(config.pool.max_workers),
            background.warm_up(config.pool.background_workers),
        )
        app = Application(config, database, pool, log, background)
        if started is not None:
            started(app)
        announce = asyncio.create_task(announce_ready(app, log), name="announce-ready")
        try:
            await app.run(stop)
        finally:
            announce.cancel()
            await asyncio.gather(pool.shutdown(0), background.shutdown(0))
            log.info("shutdown_stage", stage="close")
    log.info("service_stopped", exit_code=app.exit_code)
    return app.exit_code


def _on_signal(log: Logger, sig: signal.Signals, stop: asyncio.Event) -> None:
    log.info("signal_received", signal=sig.name)
    stop.set()
