"""CalibService: master bias, dark and flat frames built automatically from the database.

Schedule: a full pass at start-up (back-fill: everything the database says is missing or out of
date is built) and every ``calib.interval_s``; new raw calibration frames (the ingestor's
listener) mark their date dirty and a targeted pass runs once ``calib.debounce_s`` have passed
without new ones.  All progress is in the database (``calibs`` and ``calib_status``), so a
restart simply plans again.

A pass plans every unit (type, camera, [filter], date) with :mod:`calib_plan`, biases first,
then darks (which need a bias), then flats (bias and dark).  A group is *up to date* when a
current master has exactly its raw frames and calibration masters; otherwise a new master is
built (one at a time, in the process pool: the memory ceiling holds for the whole service)
under a new version name, and once every group of the unit is up to date the unit's other
current masters are marked superseded.  A group whose build failed is not retried until its
inputs change (or ``--force``).  Each unit is handled in its own ``try``: one bad group never
stops the pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import re
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from pymongo.errors import PyMongoError

from huntsman import __version__
from huntsman.config import CalibConfig, DetectorConfig
from huntsman.logs import Logger
from huntsman.models import IngestStatus, ObservationType, QCStatus, utcnow
from huntsman.paths import inside, path_component
from huntsman.science.masters import MasterParams, MasterResult
from huntsman.science.provenance import Provenance, config_hash
from huntsman.services.calib_plan import RAW_PROJECTION, Group, RawFrame, UnitPlan, plan_unit, units_of
from huntsman.services.disk import MASTERS, DiskMonitor
from huntsman.store.calibs import CALIB_TYPES, CalibCollection, CalibDocument, Unit, calib_date_of
from huntsman.store.exposures import ExposureCollection
from huntsman.workers.calib import CalibJob, build_calib_master
from huntsman.workers.pool import ComputePool, JobFailed

__all__ = ["CalibService", "MasterListener", "PassSummary", "master_path"]

# Called after each master is stored, with its document and the science exposures whose
# calibration set it just completed (the QualityMonitor's hand-off).
MasterListener = Callable[[CalibDocument, list[str]], Awaitable[None]]

def master_path(calib_dir: Path, unit: Unit, version: int) -> Path:
    """``<calib_dir>/<date>/<type>/<type>_<camera>[_<filter>]_<date>[_v<N>].fits``.

    Every part goes through :func:`path_component` (header values are data, never paths) and
    the result is checked to lie inside ``calib_dir``.
    """
    date, calib_type = path_component(unit.date), path_component(unit.calib_type)
    parts = [calib_type, path_component(unit.camera)]
    if unit.physical_filter:
        parts.append(path_component(unit.physical_filter))
    stem = "_".join([*parts, date])
    suffix = f"_v{version}" if version > 1 else ""
    return inside(calib_dir / date / calib_type / f"{stem}{suffix}.fits", calib_dir, resolve=False)


def _input_hash(filenames: Iterable[str], masters: dict[str, str]) -> str:
    text = "\n".join([*sorted(filenames), *(f"{k}={v}" for k, v in sorted(masters.items()))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass
class PassSummary:
    """What one pass did."""

    reason: str
    built: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)  # insufficient or waiting
    up_to_date: int = 0
    duration_s: float = 0.0


class _GroupFailed(Exception):
    """A group could not be built; the message is the recorded reason."""


class CalibService:
    """Plans and builds master calibrations; the database holds every bit of its progress."""

    def __init__(
        self,
        exposures: ExposureCollection,
        calibs: CalibCollection,
        pool: ComputePool,
        config: CalibConfig,
        detector: DetectorConfig,
        calib_dir: Path,
        log: Logger,
    ) -> None:
        self.exposures = exposures
        self.calibs = calibs
        self.pool = pool
        self.config = config
        self.detector = detector
        self.calib_dir = calib_dir
        self.params: MasterParams = config.stack  # the section is the science record
        self.provenance = Provenance(__version__, config_hash(config))
        self.on_master_built: list[MasterListener] = []
        self._log = log.bind(component="calib")
        self._dirty: set[str] = set()
        self._last_arrival = 0.0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.passes = 0
        self.last_pass: PassSummary | None = None
        self.disk: DiskMonitor | None = None  # set by the application: pauses on a full disk

    # -- trigger ----------------------------------------------------------------------------
    async def notify(self, filename: str, fields: dict[str, Any]) -> None:
        """Ingestor listener: a calibration frame arrived; its date is rebuilt after a quiet time."""
        date = fields.get("calib_date")
        if fields.get("observation_type") in CALIB_TYPES and date:
            self._dirty.add(str(date))
            self._last_arrival = time.monotonic()
            self._wake.set()

    def state(self) -> dict[str, Any]:
        last = self.last_pass
        return {
            "passes": self.passes,
            "dirty_dates": sorted(self._dirty),
            "last_pass": None if last is None else {
                "reason": last.reason, "built": len(last.built), "failed": len(last.failed),
                "missing": len(last.missing), "duration_s": round(last.duration_s, 3),
            },
        }

    # -- loop -------------------------------------------------------------------------------
    async def run(self) -> None:
        """Start-up back-fill, then a full pass every interval and targeted passes on arrivals."""
        await self._guarded_pass(None, "startup")
        next_full = time.monotonic() + self.config.interval_s
        while True:
            now = time.monotonic()
            timeout = next_full - now
            if self._dirty:
                timeout = min(timeout, self._last_arrival + self.config.debounce_s - now)
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            now = time.monotonic()
            if now >= next_full:
                self._dirty.clear()
                await self._guarded_pass(None, "interval")
                next_full = time.monotonic() + self.config.interval_s
            elif self._dirty and now - self._last_arrival >= self.config.debounce_s:
                dates, self._dirty = self._dirty, set()
                await self._guarded_pass(dates, "new_frames")

    async def _guarded_pass(self, dates: set[str] | None, reason: str) -> None:
        try:
            await self.run_pass(dates=dates, reason=reason)
        except PyMongoError as exc:  # database briefly away: the next pass plans again
            self._log.warning("calib_pass_failed", reason=reason, error=str(exc))
            if dates:
                self._dirty |= dates

    # -- a pass -----------------------------------------------------------------------------
    async def run_pass(
        self,
        *,
        dates: set[str] | None = None,
        cameras: set[str] | None = None,
        types: Iterable[str] = CALIB_TYPES,
        force: bool = False,
        reason: str = "manual",
    ) -> PassSummary:
        """Plan and build every unit of ``dates`` (all dates if ``None``)."""
        async with self._lock:
            start = time.perf_counter()
            summary = PassSummary(reason)
            types = [t for t in CALIB_TYPES if t in set(types)]
            frames = await self._load_frames(dates, cameras, types)
            units = units_of(frames, dates)
            self._log.info("calib_pass_started", reason=reason, n_frames=len(frames), n_units=len(units))
            plans = {u: plan_unit(u, frames, self.config, self.detector) for u in units}
            await self._mark_pending(plans, force)
            for calib_type in types:
                for unit, plan in plans.items():
                    if unit.calib_type == calib_type:
                        await self._handle_unit(plan, force, summary)
            summary.duration_s = time.perf_counter() - start
            self.passes += 1
            self.last_pass = summary
            self._log.info(
                "calib_pass_done", reason=reason, built=len(summary.built), failed=len(summary.failed),
                missing=len(summary.missing), up_to_date=summary.up_to_date,
                duration_s=round(summary.duration_s, 3),
            )
            return summary

    async def _load_frames(
        self, dates: set[str] | None, cameras: set[str] | None, types: list[str]
    ) -> list[RawFrame]:
        query: dict[str, Any] = {"observation_type": {"$in": types}}
        if cameras:
            query["camera"] = {"$in": sorted(cameras)}
        if dates is not None:
            window = self.config.window_days
            near = {
                (calib_date_of(d) + dt.timedelta(days=k)).isoformat()
                for d in dates for k in range(-window, window + 1)
            }
            query["calib_date"] = {"$in": sorted(near)}
        frames = []
        async for doc in self.exposures.find(query, projection=RAW_PROJECTION):
            frame = RawFrame.from_doc(doc)
            if frame is not None:
                frames.append(frame)
        return frames

    async def _mark_pending(self, plans: dict[Unit, UnitPlan], force: bool) -> None:
        """Record, before building anything, which units have groups not yet built: if the
        service stops mid-pass the database shows what is outstanding (the next pass builds it)."""
        for unit, plan in plans.items():
            if not plan.groups:
                continue
            current = await self.calibs.current(unit)
            built = {frozenset(d.get("raw_filenames") or ()) for d in current}
            outstanding = [g for g in plan.groups if force or frozenset(g.filenames) not in built]
            if outstanding:
                await self.calibs.set_status(unit, {"state": "pending", "n_outstanding": len(outstanding)})

    async def _handle_unit(self, plan: UnitPlan, force: bool, summary: PassSummary) -> None:
        unit = plan.unit
        log = self._log.bind(calib_type=unit.calib_type, camera=unit.camera,
                             filter=unit.physical_filter, date=unit.date)
        try:
            await self._reconcile(plan, force, summary, log)
        except asyncio.CancelledError:
            log.warning("calib_abandoned")
            raise
        except Exception as exc:  # one bad unit never stops the pass
            log.exception("master_failed", error=str(exc))
            summary.failed.append(unit.key)
            await self.calibs.set_status(unit, {"state": "failed", "reason": f"{type(exc).__name__}: {exc}"})

    async def _reconcile(self, plan: UnitPlan, force: bool, summary: PassSummary, log: Logger) -> None:
        unit = plan.unit
        status = await self.calibs.get_status(unit) or {}
        failed_inputs: dict[str, str] = dict(status.get("failed_inputs") or {})
        current = await self.calibs.current(unit)
        reasons = list(plan.shortfalls)
        kept: list[CalibDocument] = []
        new: list[CalibDocument] = []
        problems = bool(plan.shortfalls)
        state = "insufficient" if plan.shortfalls else "built"
        for group in plan.groups:
            masters, missing = await self._upstream(group)
            if missing is not None:
                reasons.append(missing)
                problems, state = True, "waiting"
                continue
            same = [d for d in current if set(d.get("raw_filenames") or ()) == set(group.filenames)
                    and (d.get("masters") or {}) == masters]
            if same and not force:
                kept.extend(same)
                summary.up_to_date += 1
                continue
            key = _input_hash(group.filenames, masters)
            if key in failed_inputs and not force:
                reasons.append(failed_inputs[key])
                problems, state = True, "failed"
                continue
            try:
                doc = await self._build(group, masters, plan, log)
            except _GroupFailed as exc:
                failed_inputs[key] = str(exc)
                reasons.append(str(exc))
                problems, state = True, "failed"
                summary.failed.append(unit.key)
                continue
            failed_inputs.pop(key, None)
            new.append(doc)
            summary.built.append(doc["filename"])
        outdated = [d["filename"] for d in current if d not in kept]
        if not problems and outdated:
            await self.calibs.supersede(outdated, [d["filename"] for d in new])
            log.info("master_superseded", superseded=outdated, by=[d["filename"] for d in new])
        if plan.shortfalls or state == "waiting":
            summary.missing.append(unit.key)
        live = [d["filename"] for d in kept + new] + ([] if not problems else outdated)
        await self.calibs.set_status(unit, {
            "state": state,
            "reason": "; ".join(reasons) or None,
            "masters": sorted(set(live)),
            "n_candidates": plan.n_candidates,
            "excluded": list(plan.excluded),
            "failed_inputs": failed_inputs,
            "n_outstanding": 0,
        })
        for doc in new:
            await self._hand_off(doc, log)

    async def _upstream(self, group: Group) -> tuple[dict[str, str], str | None]:
        """The masters a group is calibrated with, or the reason it must wait for them."""
        unit = group.unit
        needed = {"bias": [], "dark": ["bias"], "flat": ["bias", "dark"]}[unit.calib_type]
        masters: dict[str, str] = {}
        for kind in needed:
            age = self.config.max_age_days
            doc = await self.calibs.match_one(kind, unit.camera, unit.date, ccd_temp=group.ccd_temp,
                                              max_age_days=age)
            if doc is None:
                return masters, f"waiting for a master {kind} of {unit.camera} within {age:g} days"
            masters[kind] = doc["filename"]
        return masters, None

    async def _next_path(self, unit: Unit) -> Path:
        version = await self.calibs.versions(unit) + 1
        path = master_path(self.calib_dir, unit, version)
        # A file without a document (a build interrupted after writing): never overwrite it.
        while await asyncio.to_thread(path.exists) or await self.calibs.get(str(path)) is not None:
            version += 1
            path = master_path(self.calib_dir, unit, version)
        return path

    async def _build(
        self, group: Group, masters: dict[str, str], plan: UnitPlan, log: Logger
    ) -> CalibDocument:
        unit = group.unit
        if self.disk is not None:
            await self.disk.wait_writable(*MASTERS)  # writes the master and its document
        out = await self._next_path(unit)
        job = CalibJob(
            calib_type=unit.calib_type,
            paths=group.filenames,
            exptimes=tuple(float(f.exposure_time or 0.0) for f in group.frames),
            out_path=str(out),
            out_root=str(self.calib_dir),
            params=self.params,
            provenance=self.provenance,
            bias_path=masters.get("bias"),
            dark_path=masters.get("dark"),
        )
        start = time.perf_counter()
        try:
            result: MasterResult = await self.pool.run(
                build_calib_master, job, timeout_s=self.config.job_timeout_s
            )
        except Exception as exc:
            # A job that raised in the worker already says "<type>: <message>".
            error = str(exc) if isinstance(exc, JobFailed) else f"{type(exc).__name__}: {exc}"
            log.error("master_failed", error=error, n_frames=len(group.frames))
            raise _GroupFailed(f"build failed: {error}") from None
        duration = time.perf_counter() - start
        doc = self._document(group, masters, plan, result, version_of(out), duration)
        await self.calibs.insert(doc)
        log.info(
            "master_built", filename=str(out), n_frames=result.n_frames, ccd_temp=group.ccd_temp,
            duration_s=round(duration, 3),
        )
        return doc

    def _document(
        self, group: Group, masters: dict[str, str], plan: UnitPlan, result: MasterResult,
        version: int, duration_s: float,
    ) -> CalibDocument:
        unit = group.unit
        day = dt.datetime.fromisoformat(unit.date).replace(tzinfo=dt.UTC)
        age = dt.timedelta(days=self.config.max_age_days)
        stats = result.statistics
        exptimes = sorted({float(f.exposure_time or 0.0) for f in group.frames})
        return {
            "filename": result.out_path,
            "calib_type": unit.calib_type,
            "camera": unit.camera,
            "physical_filter": unit.physical_filter,
            "date": unit.date,
            "raw_filenames": list(result.input_paths),
            "n_frames": result.n_frames,
            "n_inputs": len(result.input_paths),
            "superseded": False,
            "version": version,
            "masters": masters,
            "ccd_temp": group.ccd_temp,
            "exposure_times": exptimes if unit.calib_type != "bias" else [],
            "shape": list(result.shape),
            "statistics": {
                "level": stats.level,
                "noise": stats.noise,
                "bad_pixel_fraction": stats.bad_pixel_fraction,
                "n_hot": stats.n_hot,
                "n_dead": stats.n_dead,
                "unit": {"bias": "adu", "dark": "adu/s", "flat": ""}[unit.calib_type],
            },
            "valid_from": day - age,
            "valid_until": day + dt.timedelta(days=1) + age,
            "excluded": list(plan.excluded),
            "config_hash": self.provenance.config_hash,
            "software_version": self.provenance.software_version,
            "build_duration_s": duration_s,
            "date_created": utcnow(),
        }

    # -- hand-off ---------------------------------------------------------------------------
    async def ready_science(self, master: CalibDocument) -> list[str]:
        """Science exposures (not yet quality-checked) whose matched calibration set is complete
        and includes ``master``: the ones this master completed or improved."""
        day = calib_date_of(master["date"])
        age = int(self.config.max_age_days)
        query: dict[str, Any] = {
            "observation_type": ObservationType.SCIENCE,
            "ingest.status": IngestStatus.OK,
            "camera": master["camera"],
            "calib_date": {"$gte": (day - dt.timedelta(days=age)).isoformat(),
                           "$lte": (day + dt.timedelta(days=age)).isoformat()},
            "qc.status": {"$ne": QCStatus.DONE},
        }
        if master["calib_type"] == "flat":
            query["physical_filter"] = master["physical_filter"]
        by_key: dict[tuple[str | None, str], list[str]] = defaultdict(list)
        projection = {"_id": 0, "filename": 1, "physical_filter": 1, "calib_date": 1}
        async for doc in self.exposures.find(query, projection=projection):
            by_key[(doc.get("physical_filter"), doc["calib_date"])].append(doc["filename"])
        ready: list[str] = []
        for (physical_filter, date), filenames in sorted(by_key.items(), key=lambda kv: repr(kv[0])):
            chosen = await self.calibs.match(master["camera"], physical_filter, date,
                                             max_age_days=self.config.max_age_days)
            if chosen is not None and master["filename"] in {d["filename"] for d in chosen.values()}:
                ready.extend(sorted(filenames))
        return ready

    async def _hand_off(self, master: CalibDocument, log: Logger) -> None:
        if not self.on_master_built:
            return
        science = await self.ready_science(master)
        for listener in self.on_master_built:
            try:
                await listener(master, science)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("master_listener_failed", filename=master["filename"])


def version_of(path: Path) -> int:
    match = re.search(r"_v(\d+)\.fits$", path.name)
    return int(match.group(1)) if match else 1
