"""QualityMonitor: every science frame calibrated and measured once per calibration set.

Triggers: the CalibService hand-off (:meth:`QualityMonitor.on_master_built`), the PlateSolver
listener (:meth:`QualityMonitor.on_wcs_final`: a frame's ``wcs.status`` became solved, failed or
skipped), a start-up sweep and a periodic sweep (``qc.sweep_interval_s``).  All state is on the
exposure document (``qc.status``: ``waiting_calibs`` | ``done`` | ``failed``), so a restart
needs nothing else:

- a frame without a complete calibration set is marked ``waiting_calibs`` with the reason and
  left alone: the master that completes its set hands it over (no retry loop);
- a frame is *up to date* when ``qc.status`` is ``done`` with the masters
  :meth:`CalibCollection.match` picks now and the same ``wcs.status``; it is not measured again
  (unless forced);
- a failed frame (unreadable, worker crash or timeout) is retried by the sweeps until
  ``qc.max_tries``;
- a master that supersedes one a frame used re-queues that frame.

The queue, its consumers and the sweeps are a :class:`~huntsman.services.stage.Stage`.
Queue-full policy: the queue is bounded (``qc.queue_size``); a frame that does not fit is
dropped from the queue and found by the next sweep (its document says what it needs).  A frame
asked for while it is being measured (a master superseded meanwhile) is measured once more
afterwards, against whatever set is current then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from huntsman import __version__
from huntsman.config import DetectorConfig, PathsConfig, QCConfig
from huntsman.logs import Logger
from huntsman.models import (
    FINAL_WCS,
    IngestStatus,
    ObservationType,
    QCStatus,
    WcsStatus,
)
from huntsman.paths import inside, path_component
from huntsman.science.provenance import Provenance, config_hash
from huntsman.services.disk import QC, DiskMonitor
from huntsman.services.stage import Stage
from huntsman.store.calibs import CALIB_TYPES, CalibCollection, CalibDocument
from huntsman.store.exposures import ExposureCollection, ExposureDocument
from huntsman.store.records import QCRecord
from huntsman.workers.pool import ComputePool, JobTimeout, PoolBroken
from huntsman.workers.qc import QCJob, QCOutcome, qc_frame

__all__ = ["QualityMonitor", "calibrated_path"]

_CALIB_FIELDS = tuple(f"qc.calibs.{t}" for t in CALIB_TYPES)


def calibrated_path(calibrated_dir: Path, doc: ExposureDocument) -> Path:
    """``<calibrated_dir>/<night>/<camera>/<raw stem>_cal.fits``, every part through
    :func:`path_component` and the result checked to lie inside ``calibrated_dir``."""
    name = Path(doc["filename"]).name
    for suffix in (".fits.fz", ".fits", ".fit", ".fts"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    night = path_component(doc.get("calib_date"), empty="unknown-date")
    camera = path_component(doc.get("camera"), empty="unknown-camera")
    stem = path_component(name, empty="frame")
    return inside(calibrated_dir / night / camera / f"{stem}_cal.fits", calibrated_dir, resolve=False)


@dataclasses.dataclass(frozen=True, slots=True)
class QCRequest:
    """A frame to measure, as queued (``force``: even if up to date)."""

    filename: str
    force: bool = False


def _filename(request: QCRequest) -> str:
    return request.filename


class QualityMonitor:
    """Calibrates science frames and records their image-quality numbers (``qc.*``)."""

    def __init__(
        self,
        exposures: ExposureCollection,
        calibs: CalibCollection,
        pool: ComputePool,
        config: QCConfig,
        detector: DetectorConfig,
        paths: PathsConfig,
        log: Logger,
        *,
        sweeps: bool = True,
    ) -> None:
        """``sweeps=False``: a command's private monitor, which measures only what it is given."""
        self.exposures = exposures
        self.calibs = calibs
        self.pool = pool
        self.config = config
        self.paths = paths
        self._log = log.bind(component="quality")
        self.detector = detector
        self.spec = config.refcat  # the catalogue spec, validated as the config section
        self.provenance = Provenance(__version__, config_hash(config))
        self.counts: Counter[str] = Counter()
        self.disk: DiskMonitor | None = None  # set by the application: pauses on a full disk
        # The last exception of a frame whose measurement crashed (counted as ``crashed``):
        # the stage logs it and goes on; a command re-raises it once the others are done.
        self.last_crash: Exception | None = None
        self.stage: Stage[str, QCRequest, QCStatus] = Stage(
            "qc", self._measure_or_record, key=_filename, queue_size=config.queue_size,
            concurrency=config.concurrency, log=self._log, before=self._writable,
            sweep=self._needing if sweeps else None, sweep_interval_s=config.sweep_interval_s,
            counts=self.counts, key_field="filename",
        )

    @property
    def queue(self) -> asyncio.Queue[QCRequest]:
        return self.stage.queue

    # -- intake -------------------------------------------------------------------------
    def offer(self, filename: str, *, force: bool = False) -> bool:
        """Queue a frame; False if it is already queued or the queue is full (sweeps find it)."""
        return self.stage.offer(QCRequest(filename, force))

    async def on_master_built(self, master: CalibDocument, filenames: list[str]) -> None:
        """CalibService hand-off: frames this master completes, and frames that used a master
        it superseded."""
        for filename in filenames:
            self.offer(filename)
        old = [d["filename"] async for d in self.calibs.find({"superseded_by": master["filename"]})]
        await self.requeue_superseded(old)

    async def on_wcs_final(self, filename: str, status: WcsStatus) -> None:
        """PlateSolver listener: the frame's ``wcs.status`` is final (solved/failed/skipped)."""
        if status in FINAL_WCS:
            self.offer(filename)

    async def requeue_superseded(self, masters: Iterable[str]) -> int:
        """Queue the frames measured with any of these (superseded) masters."""
        names = sorted(set(masters))
        n = 0
        async for filename in self._measured_with(names):
            n += self.offer(filename)
        if n:
            self._log.info("qc_requeued_superseded", frames=n, masters=names)
        return n

    async def _measured_with(self, masters: list[str]) -> AsyncIterator[str]:
        if not masters:
            return
        query = {"$or": [{f: {"$in": masters}} for f in _CALIB_FIELDS]}
        async for doc in self.exposures.find(query, projection={"_id": 0, "filename": 1}):
            yield doc["filename"]

    async def sweep(self) -> int:
        """Queue science frames needing QC: never measured, waiting for calibrations, failed
        (fewer than ``max_tries``), or measured with a master since superseded."""
        return await self.stage.sweep()

    async def _needing(self, startup: bool) -> AsyncIterator[QCRequest]:
        """What every sweep (start-up or periodic alike) queues."""
        needs: list[dict[str, Any]] = [
            {"qc.status": {"$exists": False}},
            {"qc.status": QCStatus.WAITING_CALIBS},
            {"qc.status": QCStatus.FAILED, "qc.tries": {"$lt": self.config.max_tries}},
        ]
        query = {"observation_type": ObservationType.SCIENCE, "ingest.status": IngestStatus.OK,
                 "wcs.status": {"$in": sorted(FINAL_WCS)}, "$or": needs}
        async for doc in self.exposures.find(query, projection={"_id": 0, "filename": 1}):
            yield QCRequest(doc["filename"])
        superseded = sorted({d["filename"] async for d in self.calibs.find({"superseded": True})})
        async for filename in self._measured_with(superseded):
            yield QCRequest(filename)

    def state(self) -> dict[str, Any]:
        return self.stage.state()

    # -- loop -------------------------------------------------------------------------------
    async def run(self) -> None:
        """Start-up sweep, then the periodic sweep and the consumers."""
        await self.stage.run()

    async def _writable(self, request: QCRequest) -> None:
        if self.disk is not None:
            await self.disk.wait_writable(*QC)  # writes the calibrated frame and the document

    def idle(self) -> bool:
        return self.stage.idle()

    async def drain(self, timeout_s: float) -> bool:
        return await self.stage.drain(timeout_s)

    # -- one frame ----------------------------------------------------------------------
    async def process(self, filename: str, *, force: bool = False) -> QCStatus | None:
        """Measure one frame if it needs it (or ``force``); returns the new ``qc.status``, or
        None when nothing was done (not a usable science frame, WCS pending, up to date,
        failed ``max_tries`` times, or being processed already: then it is measured once
        more afterwards)."""
        return await self.stage.process(QCRequest(filename, force))

    async def _measure_or_record(self, request: QCRequest) -> QCStatus | None:
        try:
            return await self._measure(request)
        except Exception as exc:  # a bug or a database error: the stage logs it, the frame waits
            self.counts["crashed"] += 1
            self.last_crash = exc
            raise

    async def _measure(self, request: QCRequest) -> QCStatus | None:
        filename, force = request.filename, request.force
        doc = await self.exposures.get(filename)
        if doc is None or doc.get("observation_type") != ObservationType.SCIENCE:
            return None
        if (doc.get("ingest") or {}).get("status") != IngestStatus.OK:
            return None
        wcs = doc.get("wcs") or {}
        if wcs.get("status") not in FINAL_WCS and not force:
            return None  # the solver's listener brings it back
        qc = doc.get("qc") or {}
        log = self._log.bind(filename=filename, camera=doc.get("camera"))
        chosen = await self.calibs.match(
            doc.get("camera") or "", doc.get("physical_filter"), doc["date_obs"],
            ccd_temp=doc.get("ccd_temp"),
        )
        if chosen is None:
            reason = await self._missing_reason(doc)
            if qc.get("status") != QCStatus.WAITING_CALIBS or qc.get("error") != reason:
                await self.exposures.record_qc(filename, QCRecord.waiting(reason))
                log.info("qc_waiting_calibs", reason=reason)
            self.counts[QCStatus.WAITING_CALIBS] += 1
            return QCStatus.WAITING_CALIBS
        calibs = {k: d["filename"] for k, d in chosen.items()}
        same_inputs = qc.get("calibs") == calibs and qc.get("wcs_status") == wcs.get("status")
        if not force:
            if qc.get("status") == QCStatus.DONE and same_inputs:
                return None
            exhausted = int(qc.get("tries") or 0) >= self.config.max_tries
            if qc.get("status") == QCStatus.FAILED and same_inputs and exhausted:
                return None
        failed_before = same_inputs and qc.get("status") == QCStatus.FAILED
        tries = (int(qc.get("tries") or 0) if failed_before else 0) + 1
        job = self._job(doc, calibs)
        self.counts["attempts"] += 1
        log.info("qc_started", tries=tries, calibs=calibs)
        start = time.perf_counter()
        try:
            outcome: QCOutcome = await self.pool.run(
                qc_frame, filename, job, timeout_s=self.config.job_timeout_s
            )
        except (JobTimeout, PoolBroken) as exc:
            outcome = QCOutcome(QCStatus.FAILED, str(exc), {}, {}, None, (), None,
                                time.perf_counter() - start)
        except Exception as exc:  # a bug in the worker: recorded like any failure
            outcome = QCOutcome(QCStatus.FAILED, f"{type(exc).__name__}: {exc}", {}, {}, None, (),
                                None, time.perf_counter() - start)
        record = QCRecord(
            QCStatus(outcome.status),
            tries=tries,
            error=outcome.error,
            calibs=calibs,
            measurements=outcome.metrics,
            failed=outcome.failed,
            duration_s=outcome.duration_s,
            wcs_status=wcs.get("status"),
            grade=outcome.grade,
            flags=outcome.flags,
            calibrated_filename=outcome.calibrated_filename,
            filter=doc.get("physical_filter"),
            refcat=job.refcat_path,
            config_hash=self.provenance.config_hash,
            software_version=self.provenance.software_version,
        )
        await self.exposures.record_qc(filename, record)
        status = record.status
        self.counts[status] += 1
        done = status is QCStatus.DONE
        (log.info if done else log.warning)(
            "qc_done" if done else "qc_failed", duration_s=round(outcome.duration_s, 3), tries=tries,
            grade=outcome.grade, fwhm_arcsec=outcome.metrics.get("fwhm_arcsec"),
            zeropoint=outcome.metrics.get("zeropoint"), error=outcome.error,
        )
        return status

    async def _missing_reason(self, doc: ExposureDocument) -> str:
        camera, physical_filter = doc.get("camera") or "", doc.get("physical_filter")
        age = self.calibs.max_age_days
        missing = []
        for kind in CALIB_TYPES:
            if kind == ObservationType.FLAT and physical_filter is None:
                missing.append("flat (frame has no filter)")
                continue
            found = await self.calibs.match_one(kind, camera, doc["date_obs"], physical_filter)
            if found is None:
                missing.append(kind if kind != ObservationType.FLAT else f"flat {physical_filter}")
        return f"waiting for master {', '.join(missing)} of {camera} within {age:g} days"

    def _job(self, doc: ExposureDocument, calibs: dict[str, str]) -> QCJob:
        wcs = doc.get("wcs") or {}
        solved = wcs.get("status") == "solved" and wcs.get("header")
        note = None if solved else f"plate solution {wcs.get('status')}: {wcs.get('error')}"
        physical_filter = doc.get("physical_filter")
        c = self.config
        nominal = c.nominal_zeropoint.get(f"{doc.get('camera')}/{physical_filter}",
                                          c.nominal_zeropoint.get(str(physical_filter)))
        out = calibrated_path(self.paths.calibrated_dir, doc) if c.write_calibrated else None
        return QCJob(
            bias_path=calibs["bias"],
            dark_path=calibs["dark"],
            flat_path=calibs["flat"],
            exptime_s=float(doc.get("exposure_time") or 0.0),
            filter_name=physical_filter,
            wcs_header=wcs.get("header") if solved else None,
            wcs_note=note,
            refcat_path=str(c.refcat.path) if c.refcat.path is not None else None,
            catalogue=self.spec,
            detector=self.detector,
            grades=dataclasses.replace(c.grade, nominal_zeropoint=nominal),
            out_path=str(out) if out is not None else None,
            out_root=str(self.paths.calibrated_dir),
            provenance=self.provenance,
            min_flat_value=c.min_flat_value,
            psf_max_stars=c.psf_max_stars,
        )

