"""PlateSolver: every science frame gets a WCS (or a recorded reason why not).

State lives on the exposure document (``wcs.status``: pending → solved | failed | skipped), so
nothing depends on this process's memory: frames that did not fit in the bounded queue of its
:class:`~huntsman.services.stage.Stage`, or were in flight at shutdown, are found again by the
start-up and periodic sweeps.  A failed frame is retried at start-up until
``astrometry.max_tries``, never in a loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from huntsman.config import AstrometryConfig, DetectorConfig
from huntsman.logs import Logger
from huntsman.models import IngestStatus, ObservationType, WcsStatus
from huntsman.paths import is_inside
from huntsman.science.astrometry import SolveParams, available
from huntsman.science.wcs_writer import cleanup_temp_files
from huntsman.services.disk import SOLVER, DiskMonitor
from huntsman.services.stage import Stage
from huntsman.store.exposures import ExposureCollection
from huntsman.store.records import SolveRecord, WcsSolution
from huntsman.workers.pool import ComputePool, JobFailed, JobTimeout, PoolBroken
from huntsman.workers.solve import SolveJob, SolveOutcome, solve_file

__all__ = ["PlateSolver", "WcsListener"]

# Called with (filename, wcs status) once a frame's solved/failed/skipped outcome is recorded.
WcsListener = Callable[[str, WcsStatus], Awaitable[None]]


class PlateSolver:
    """Consumes science frames waiting for a plate solution."""

    def __init__(
        self,
        exposures: ExposureCollection,
        pool: ComputePool,
        config: AstrometryConfig,
        detector: DetectorConfig,
        *,
        raw_dir: Path,
        extra_index_dir: Path,
        log: Logger,
    ) -> None:
        self.exposures = exposures
        self.pool = pool
        self.config = config
        self.raw_dir = raw_dir
        self._log = log.bind(component="solver")
        self.extra_index_dir = extra_index_dir
        self.params = SolveParams(
            pixel_scale_arcsec=detector.pixel_scale_arcsec,
            scale_tolerance=config.scale_tolerance,
            cpu_limit_s=config.cpu_limit_s,
            timeout_s=config.timeout_s,
            index_dirs=tuple(str(p) for p in config.index_dirs),
            search_radius_deg=config.search_radius_deg,
            max_sources=config.max_sources,
            blind_fallback=config.blind_fallback,
        )
        self.usable, self.unusable_reason = False, "not checked"
        self.counts = {"solved": 0, "failed": 0, "skipped": 0}
        self.disk: DiskMonitor | None = None  # set by the application: pauses on a full disk
        self.stage: Stage[str, str, WcsStatus] = Stage(
            "solve", self._solve, key=str, queue_size=config.queue_size,
            concurrency=config.concurrency, log=self._log, before=self._writable,
            sweep=self._waiting, sweep_interval_s=config.sweep_interval_s, counts=self.counts,
            key_field="filename",
        )

    @property
    def queue(self) -> asyncio.Queue[str]:
        return self.stage.queue

    @property
    def listeners(self) -> list[WcsListener]:
        """Awaited with (filename, wcs status) once an outcome is recorded (each isolated)."""
        return self.stage.listeners

    async def check_available(self) -> bool:
        if not self.config.enabled:
            self.usable, self.unusable_reason = False, "plate solving disabled in config"
        else:
            # Indexes built with `huntsman build-index` join the configured ones (at start-up).
            if await asyncio.to_thread(self.extra_index_dir.is_dir):
                extra = str(self.extra_index_dir)
                dirs = (*self.params.index_dirs, extra)
                self.params = dataclasses.replace(self.params, index_dirs=dirs)
            self.usable, reason = await asyncio.to_thread(available, self.params.index_dirs)
            self.unusable_reason = reason
        if not self.usable:
            self._log.warning("astrometry_unavailable", reason=self.unusable_reason)
        return self.usable

    # -- intake -------------------------------------------------------------------------
    async def on_ingested(self, filename: str, fields: dict[str, Any]) -> None:
        """Ingestor listener: science frames wait for a solution (or are skipped, with why)."""
        if fields.get("observation_type") != ObservationType.SCIENCE:
            return
        if not self.usable:
            await self.exposures.record_solve(filename, SolveRecord.skipped(self.unusable_reason))
            self.counts["skipped"] += 1
            await self.stage.notify(filename, WcsStatus.SKIPPED)
            return
        await self.exposures.record_solve(filename, SolveRecord.pending())
        self.stage.offer(filename)  # a full queue leaves it pending on its document: swept later

    async def sweep(self, *, retry_failed: bool) -> int:
        """Queue science frames whose solution is pending (and, at start-up, failed ones)."""
        return await self.stage.sweep(startup=retry_failed)

    async def _waiting(self, retry_failed: bool) -> AsyncIterator[str]:
        waiting: list[dict[str, Any]] = [{"wcs": {"$exists": False}}, {"wcs.status": WcsStatus.PENDING}]
        if retry_failed:
            waiting.append({"wcs.status": WcsStatus.FAILED, "wcs.tries": {"$lt": self.config.max_tries}})
        query = {"observation_type": ObservationType.SCIENCE, "ingest.status": IngestStatus.OK,
                 "$or": waiting}
        async for doc in self.exposures.find(query, projection={"filename": 1, "_id": 0}):
            yield doc["filename"]

    # -- processing ---------------------------------------------------------------------
    async def run(self) -> None:
        if not await self.check_available():
            return
        removed = await asyncio.to_thread(cleanup_temp_files, self.raw_dir)
        if removed:
            self._log.info("wcs_temp_files_removed", files=[str(p) for p in removed])
        await self.stage.run()  # the start-up sweep retries failed frames, the periodic one not

    async def _writable(self, filename: str) -> None:
        if self.disk is not None:
            await self.disk.wait_writable(*SOLVER)  # writes the raw file and the document

    async def solve(self, filename: str) -> WcsStatus | None:
        """Solve one frame now and record the outcome; returns the new ``wcs.status``."""
        return await self.stage.process(filename)

    async def _solve(self, filename: str) -> WcsStatus | None:
        doc = await self.exposures.get(filename)
        if doc is None or doc.get("observation_type") != ObservationType.SCIENCE:
            return None
        wcs = doc.get("wcs") or {}
        if wcs.get("status") == WcsStatus.SOLVED:
            return None
        tries = int(wcs.get("tries") or 0) + 1
        # Files ingested from outside the raw root (`ingest --outside-root`) are never written.
        inside = await asyncio.to_thread(is_inside, filename, self.raw_dir)
        job = SolveJob(
            params=self.params,
            write_wcs=self.config.write_wcs and inside,
            hint_ra_deg=doc.get("ra"),
            hint_dec_deg=doc.get("dec"),
            date_obs=doc.get("date_obs"),
            raw_root=str(self.raw_dir),
        )
        log = self._log.bind(filename=filename, camera=doc.get("camera"))
        try:
            outcome: SolveOutcome | None = await self.pool.run(
                solve_file, filename, job, timeout_s=self.config.timeout_s + 30
            )
            error = outcome.error if outcome is not None else "no outcome"
        except (JobTimeout, PoolBroken, JobFailed) as exc:
            outcome, error = None, str(exc)
        record: SolveRecord
        if outcome is not None and error is None:
            result = outcome.result
            solution = WcsSolution(
                header=result.header,
                ra_center=result.ra_center,
                dec_center=result.dec_center,
                pixel_scale_arcsec=result.pixel_scale_arcsec,
                rotation_deg=result.rotation_deg,
                solve_time_s=result.solve_time_s,
                index_used=result.index_used,
                n_matched=result.n_matched,
                residual_arcsec=result.residual_arcsec,
                pointing_offset_arcsec=result.pointing_offset_arcsec,
                blind=result.blind,
                marker=outcome.marker,
                written_to_file=outcome.wrote_wcs or bool(wcs.get("written_to_file")),
                write_error=outcome.write_error,
            )
            if outcome.write_error is not None:
                log.warning("wcs_write_refused", reason=outcome.write_error)
            record = SolveRecord.solved(
                solution, tries=tries, pointing=outcome.pointing,
                file_size=outcome.file_size, file_mtime_ns=outcome.file_mtime_ns,
            )
            log.info(
                "frame_solved",
                duration_s=round(outcome.duration_s, 2),
                ra=result.ra_center,
                dec=result.dec_center,
                pointing_offset_arcsec=result.pointing_offset_arcsec,
                wrote_wcs=outcome.wrote_wcs,
            )
        else:
            record = SolveRecord.failed(
                tries=tries, error=error or "no outcome",
                solve_time_s=outcome.result.solve_time_s if outcome is not None else None,
            )
            log.warning("solve_failed", error=record.error, tries=tries)
        status = record.status
        self.counts[status] += 1
        await self.exposures.record_solve(filename, record)
        return status  # the stage tells the listeners

    async def drain(self, timeout_s: float) -> bool:
        return await self.stage.drain(timeout_s)

