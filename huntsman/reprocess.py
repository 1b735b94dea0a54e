"""Re-run one stage (ingest, solve, calib, qc) for a selection of exposures.

Selection by night (``calib_date``), camera, filter, observation type, the stage's own status
(``ingest.status``, ``wcs.status``, ``qc.status``; ``ingest.status`` for calib) and a filename
glob.  Every action goes through the service's own code (``FileIngestor.process``,
``PlateSolver.solve``, ``CalibService.run_pass``, the QualityMonitor), so a re-run is the same
as the first run.  Documents are updated in place, never duplicated; before a stage's
sub-document is replaced, the old one is pushed onto the document's ``history`` (the last
:data:`HISTORY_LIMIT` kept).  Masters are never overwritten: a rebuilt master is a new version
and the old one is marked superseded.  A dry run only lists what would be done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import importlib
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import IO, Any

from huntsman.config import Config
from huntsman.models import FileSource, IngestRequest, utcnow
from huntsman.store.database import Database
from huntsman.store.encoding import bson_safe
from huntsman.workers.pool import ComputePool

__all__ = [
    "HISTORY_LIMIT",
    "STAGES",
    "Progress",
    "ReprocessSummary",
    "Reprocessor",
    "Selection",
    "push_history",
]

STAGES = ("ingest", "solve", "calib", "qc")
HISTORY_LIMIT = 10
# The sub-documents a stage owns (saved to history before it runs again) and its timing field.
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "ingest": ("ingest", "metrics"),
    "solve": ("wcs", "pointing"),
    "qc": ("qc",),
}
STAGE_TIMING = {"ingest": "ingested", "solve": "solved", "qc": "qc_done"}
STATUS_FIELD = {"ingest": "ingest.status", "solve": "wcs.status", "calib": "ingest.status", "qc": "qc.status"}
STAGE_TYPES: dict[str, tuple[str, ...] | None] = {
    "ingest": None,
    "solve": ("science",),
    "calib": ("bias", "dark", "flat"),
    "qc": ("science",),
}
_PROJECTION = {
    "_id": 0,
    "filename": 1,
    "observation_type": 1,
    "camera": 1,
    "physical_filter": 1,
    "calib_date": 1,
    "ingest": 1,
    "metrics": 1,
    "wcs": 1,
    "pointing": 1,
    "qc": 1,
    "timing": 1,
}


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which exposures; ``None`` fields do not constrain."""

    night: str | None = None
    camera: str | None = None
    physical_filter: str | None = None
    observation_type: str | None = None
    status: str | None = None
    pattern: str | None = None

    def query(self, stage: str) -> dict[str, Any]:
        query: dict[str, Any] = {}
        for field, value in (
            ("calib_date", self.night),
            ("camera", self.camera),
            ("physical_filter", self.physical_filter),
            (STATUS_FIELD[stage], self.status),
        ):
            if value is not None:
                query[field] = value
        if stage != "ingest" and STATUS_FIELD[stage] != "ingest.status":
            query["ingest.status"] = "ok"  # only ingested frames can be solved or measured
        allowed = STAGE_TYPES[stage]
        if self.observation_type is not None:
            ok = allowed is None or self.observation_type in allowed
            query["observation_type"] = self.observation_type if ok else {"$in": []}
        elif allowed is not None:
            query["observation_type"] = {"$in": list(allowed)}
        return query

    def matches(self, filename: str) -> bool:
        """The glob matches the whole path or the file name."""
        if self.pattern is None:
            return True
        return fnmatch.fnmatchcase(filename, self.pattern) or fnmatch.fnmatchcase(
            os.path.basename(filename), self.pattern
        )


@dataclasses.dataclass
class ReprocessSummary:
    stage: str
    dry_run: bool
    selected: list[str] = dataclasses.field(default_factory=list)
    actions: list[str] = dataclasses.field(default_factory=list)
    done: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    unavailable: str | None = None
    refused: str | None = None  # would replace measured values with empty ones (no --force)
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)

    def count(self, outcome: str | None) -> None:
        key = str(outcome)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


class Progress:
    """``\\r[#####     ] 12/40 stage`` on a terminal; silent otherwise."""

    def __init__(self, total: int, label: str, stream: IO[str] | None = None, width: int = 30) -> None:
        self.total, self.label, self.width, self.done = total, label, width, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = total > 0 and self.stream.isatty()
        self.show()

    def show(self) -> None:
        if not self.enabled:
            return
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + " " * (self.width - filled)
        print(f"\r[{bar}] {self.done}/{self.total} {self.label}", end="", file=self.stream, flush=True)

    def advance(self) -> None:
        self.done += 1
        self.show()

    def close(self) -> None:
        if self.enabled:
            print(file=self.stream, flush=True)


async def push_history(
    collection: Any, doc: Mapping[str, Any], stage: str, *, limit: int = HISTORY_LIMIT
) -> None:
    """Save what ``stage`` wrote on ``doc`` before it is replaced (last ``limit`` entries)."""
    previous = {field: doc[field] for field in STAGE_FIELDS.get(stage, ()) if doc.get(field) is not None}
    timing = (doc.get("timing") or {}).get(STAGE_TIMING.get(stage, ""))
    if timing is not None:
        previous["timing"] = {STAGE_TIMING[stage]: timing}
    if not previous:
        return  # the stage never ran on this document: nothing is superseded
    entry = bson_safe({"stage": stage, "replaced_at": utcnow(), "previous": previous})
    await collection.update_one(
        {"filename": doc["filename"]},
        {"$push": {"history": {"$each": [entry], "$slice": -limit}}},
    )


class Reprocessor:
    """Selects exposures and re-runs one stage on them through the service's own parts."""

    def __init__(
        self,
        config: Config,
        database: Database,
        pool: ComputePool | None,
        log: Any,
        *,
        progress: Callable[[int, str], Progress] | None = None,
    ) -> None:
        self.config = config
        self.database = database
        self.pool = pool
        self.log = log.bind(component="reprocess")
        self.progress = progress or (lambda total, label: Progress(total, label))

    async def select(self, stage: str, selection: Selection) -> list[dict[str, Any]]:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
        cursor = self.database.exposures.collection.find(selection.query(stage), _PROJECTION).sort(
            "filename", 1
        )
        return [doc async for doc in cursor if selection.matches(doc["filename"])]

    async def run(
        self, stage: str, selection: Selection, *, dry_run: bool = False, force: bool = False
    ) -> ReprocessSummary:
        """Re-run ``stage`` on the selection.

        Unless ``force``, a run that would replace measured values with empty ones (see
        :meth:`losses`) is refused: ``summary.refused`` says why and nothing is changed.
        With ``force`` the old values are kept in each document's ``history`` as always.
        """
        docs = await self.select(stage, selection)
        summary = ReprocessSummary(stage, dry_run, selected=[d["filename"] for d in docs])
        if not force:
            summary.refused = await self.losses(stage, docs)
            if summary.refused is not None:
                self.log.warning("reprocess_refused", stage=stage, reason=summary.refused)
                return summary
        if stage == "calib":
            await self._calib(docs, summary, dry_run)
            return summary
        handler: Callable[[dict[str, Any]], Awaitable[str | None]] | None
        if stage == "ingest":
            handler = None if dry_run else self._ingest_handler()
            verb = "re-ingest (force)"
        elif stage == "solve":
            handler = None if dry_run else await self._solve_handler(summary)
            verb = "re-solve (wcs.status -> pending, then solve)"
        else:
            handler, summary.unavailable = self._qc_handler(dry_run)
            verb = "re-run QC (calibrate and measure again, forced)"
        summary.actions = [f"{verb}: {d['filename']}" for d in docs]
        if summary.unavailable is not None or dry_run or handler is None:
            return summary
        await self._each(stage, docs, handler, summary)
        return summary

    async def _each(
        self,
        stage: str,
        docs: list[dict[str, Any]],
        handler: Callable[[dict[str, Any]], Awaitable[str | None]],
        summary: ReprocessSummary,
    ) -> None:
        concurrency = (
            self.config.astrometry.concurrency if stage == "solve" else self.config.pool.max_in_flight
        )
        slots = asyncio.Semaphore(concurrency)
        bar = self.progress(len(docs), stage)

        async def one(doc: dict[str, Any]) -> None:
            async with slots:
                try:
                    await push_history(self.database.exposures.collection, doc, stage)
                    outcome = await handler(doc)
                    summary.done.append(doc["filename"])
                    summary.count(outcome)
                except Exception as exc:  # one bad file never stops the others
                    self.log.exception("reprocess_failed", stage=stage, filename=doc["filename"])
                    summary.failed.append((doc["filename"], f"{type(exc).__name__}: {exc}"))
                bar.advance()

        try:
            async with asyncio.TaskGroup() as group:
                for doc in docs:
                    group.create_task(one(doc), name=f"reprocess:{doc['filename']}")
        finally:
            bar.close()
        summary.done.sort()
        self.log.info("reprocess_done", stage=stage, done=len(summary.done), failed=len(summary.failed))

    async def losses(self, stage: str, docs: list[dict[str, Any]]) -> str | None:
        """Why re-running ``stage`` would replace measured values with empty ones, if it would.

        - ``qc`` without a usable catalogue (``qc.refcat_path`` unset or missing) on frames
          that have a zeropoint: every zeropoint would become null;
        - ``solve`` when plate solving is unusable on frames that are solved: every solution
          would become ``skipped``;
        - ``ingest`` with ``ingest.metrics: false`` on frames that have metrics.
        """

        def count(predicate: Callable[[dict[str, Any]], bool]) -> int:
            return sum(1 for d in docs if predicate(d))

        if stage == "qc":
            refcat = self.config.qc.refcat.path
            usable = refcat is not None and await asyncio.to_thread(refcat.is_file)
            n = count(lambda d: (d.get("qc") or {}).get("zeropoint") is not None)
            if n and not usable:
                why = "no catalogue is configured (qc.refcat_path)" if refcat is None else (
                    f"the catalogue {refcat} does not exist")
                return (f"{n} of {len(docs)} frames have a zeropoint and {why}: QC would replace "
                        "them with none (use the service's configuration, or --force; the old "
                        "values stay in history)")
        elif stage == "solve":
            n = count(lambda d: (d.get("wcs") or {}).get("status") == "solved")
            if n:
                from huntsman.services.solver import PlateSolver

                solver = PlateSolver(
                    self.database.exposures, self.pool, self.config.astrometry,  # type: ignore[arg-type]
                    self.config.detector, raw_dir=self.config.paths.raw_dir,
                    extra_index_dir=self.config.paths.astrometry_dir, log=self.log,
                )
                if not await solver.check_available():
                    return (f"{n} of {len(docs)} frames are solved and plate solving is unusable "
                            f"({solver.unusable_reason}): their solutions would become skipped "
                            "(--force to do it anyway; the old values stay in history)")
        elif stage == "ingest" and not self.config.ingest.metrics:
            n = count(lambda d: bool(d.get("metrics")))
            if n:
                return (f"{n} of {len(docs)} frames have metrics and ingest.metrics is off: "
                        "re-ingesting would drop them (--force to do it anyway; the old values "
                        "stay in history)")
        return None

    # -- stages ---------------------------------------------------------------------------
    def _ingest_handler(self) -> Callable[[dict[str, Any]], Awaitable[str | None]]:
        from huntsman.app import ingest_params
        from huntsman.services.ingestor import FileIngestor

        assert self.pool is not None
        ingestor = FileIngestor(
            self.database.exposures,
            self.pool,
            ingest_params(self.config),
            self.config.ingest,
            self.config.watcher,
            self.log,
            concurrency=self.config.pool.max_in_flight,
        )

        async def handle(doc: dict[str, Any]) -> str | None:
            return await ingestor.process(IngestRequest(doc["filename"], utcnow(), FileSource.CLI, True))

        return handle

    async def _solve_handler(
        self, summary: ReprocessSummary
    ) -> Callable[[dict[str, Any]], Awaitable[str | None]]:
        from huntsman.services.solver import PlateSolver

        assert self.pool is not None
        solver = PlateSolver(
            self.database.exposures,
            self.pool,
            self.config.astrometry,
            self.config.detector,
            raw_dir=self.config.paths.raw_dir,
            extra_index_dir=self.config.paths.astrometry_dir,
            log=self.log,
        )
        usable = await solver.check_available()
        exposures = self.database.exposures

        async def handle(doc: dict[str, Any]) -> str | None:
            if not usable:  # as the service does: recorded as skipped, with the reason
                await exposures.set_fields(
                    doc["filename"], {"wcs": {"status": "skipped", "error": solver.unusable_reason}}
                )
                return "skipped"
            await exposures.set_fields(doc["filename"], {"wcs.status": "pending", "wcs.tries": 0})
            return await solver.solve(doc["filename"])

        return handle

    def _qc_handler(
        self, dry_run: bool
    ) -> tuple[Callable[[dict[str, Any]], Awaitable[str | None]] | None, str | None]:
        """``QualityMonitor.process(filename, force=True)``, imported lazily: QC may be absent."""
        try:
            importlib.import_module("huntsman.services.quality")
        except ImportError:
            return None, "QC is not available: huntsman.services.quality is not installed"
        from huntsman import app

        factory = getattr(app, "make_quality_monitor", None)
        if factory is None:
            return None, "QC is not available: huntsman.app has no make_quality_monitor"
        if dry_run:
            return None, None
        monitor = factory(self.config, self.database, self.pool, self.log)
        process = getattr(monitor, "process", None)
        if process is None:
            return None, "QC is not available: the QualityMonitor has no process() method"

        async def handle(doc: dict[str, Any]) -> str | None:
            # One write replaces the whole qc sub-document (or records waiting_calibs).
            result = await process(doc["filename"], force=True)
            return None if result is None else str(result)

        return handle, None

    async def _calib(self, docs: list[dict[str, Any]], summary: ReprocessSummary, dry_run: bool) -> None:
        """Rebuild the masters of the selected frames' (date, camera, type) groups."""
        groups = sorted(
            {
                (str(d.get("calib_date")), str(d.get("camera")), str(d.get("observation_type")))
                for d in docs
                if d.get("calib_date") and d.get("camera")
            }
        )
        summary.actions = [f"rebuild {kind} masters of {camera} for {date}" for date, camera, kind in groups]
        if dry_run or not groups:
            return
        from huntsman.app import make_calib_service

        assert self.pool is not None
        service = make_calib_service(self.config, self.database, self.pool, self.log)
        bar = self.progress(len(groups), "calib")
        try:
            # One pass per (date, camera): the service orders bias → dark → flat within it.
            by_key: dict[tuple[str, str], set[str]] = {}
            for date, camera, kind in groups:
                by_key.setdefault((date, camera), set()).add(kind)
            for (date, camera), kinds in sorted(by_key.items()):
                result = await service.run_pass(
                    dates={date}, cameras={camera}, types=kinds, force=True, reason="reprocess"
                )
                summary.done += result.built
                summary.failed += [(key, "build failed (see `huntsman status`)") for key in result.failed]
                summary.outcomes["built"] = summary.outcomes.get("built", 0) + len(result.built)
                for _ in kinds:
                    bar.advance()
        finally:
            bar.close()
