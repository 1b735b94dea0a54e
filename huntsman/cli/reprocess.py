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

import argparse
import asyncio
import dataclasses
import importlib
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from huntsman.cli.exits import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from huntsman.cli.progress import Progress
from huntsman.cli.selection import STAGE_STATUSES, STAGES, Selection
from huntsman.config import Config
from huntsman.logs import Logger, get_logger
from huntsman.models import FileSource, IngestRequest, WcsStatus, utcnow
from huntsman.services.stage import Stage, deadline_s
from huntsman.store.database import Database
from huntsman.store.encoding import bson_safe
from huntsman.store.records import STAGE_DOCUMENTS, SolveRecord
from huntsman.workers.pool import ComputePool

__all__ = ["HISTORY_LIMIT", "ReprocessSummary", "Reprocessor", "push_history", "reprocess", "rerun"]

HISTORY_LIMIT = 10
# The sub-documents a stage owns (saved to history before it runs again) and its timing field.
STAGE_FIELDS: dict[str, tuple[str, ...]] = {k: v.fields for k, v in STAGE_DOCUMENTS.items()}
STAGE_TIMING: dict[str, str] = {k: v.timing for k, v in STAGE_DOCUMENTS.items()}
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
        log: Logger,
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
        bar = self.progress(len(docs), stage)

        async def one(doc: dict[str, Any]) -> bool:
            try:
                await push_history(self.database.exposures.collection, doc, stage)
                outcome = await handler(doc)
                summary.done.append(doc["filename"])
                summary.count(outcome)
            except Exception as exc:  # one bad file never stops the others, and is reported
                self.log.exception("reprocess_failed", stage=stage, filename=doc["filename"])
                summary.failed.append((doc["filename"], f"{type(exc).__name__}: {exc}"))
            bar.advance()
            return True

        # The queue holds the selection already in memory (so it never waits for room).
        work: Stage[str, dict[str, Any], bool] = Stage(
            f"reprocess_{stage}", one, key=lambda d: d["filename"], queue_size=max(1, len(docs)),
            concurrency=concurrency, log=self.log, key_field="filename",
        )
        job_s = {"solve": self.config.astrometry.timeout_s + 30, "qc": self.config.qc.job_timeout_s}
        item_s = job_s.get(stage, self.config.pool.job_timeout_s) + self.config.database.write_retry_s
        budget_s = deadline_s(len(docs), concurrency, item_s)
        try:
            async with work.running():
                finished = await work.feed(docs, timeout_s=budget_s)
        finally:
            bar.close()
        if not finished:
            self.log.error("reprocess_timed_out", stage=stage, budget_s=budget_s)
            finished_names = {*summary.done, *(name for name, _ in summary.failed)}
            summary.failed += [(d["filename"], f"not finished within {budget_s:.0f} s")
                               for d in docs if d["filename"] not in finished_names]
        summary.done.sort()
        self.log.info("reprocess_done", stage=stage, done=len(summary.done), failed=len(summary.failed))

    async def losses(self, stage: str, docs: list[dict[str, Any]]) -> str | None:
        """Why re-running ``stage`` would replace measured values with empty ones, if it would.

        - ``qc`` without a usable catalogue (``qc.refcat.path`` unset or missing) on frames
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
                why = "no catalogue is configured (qc.refcat.path)" if refcat is None else (
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
                await exposures.record_solve(doc["filename"], SolveRecord.skipped(solver.unusable_reason))
                return WcsStatus.SKIPPED
            await exposures.record_solve(doc["filename"], SolveRecord.pending(keep_solution=True))
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


# -- the command: ``reprocess STAGE``, and the older spellings ``qc --reprocess``, ``calib --force``

async def reprocess(config: Config, args: argparse.Namespace) -> int:
    """``reprocess STAGE [selection] [--dry-run] [--force]``."""
    return await rerun(
        config, args.stage, Selection.from_args(args), dry_run=args.dry_run, force=args.force
    )


async def rerun(
    config: Config, stage: str, selection: Selection, *, dry_run: bool = False, force: bool = False
) -> int:
    """Re-run ``stage`` on ``selection`` and say what happened (the one implementation)."""
    from huntsman.app import make_pool
    from huntsman.science.offline import configure_offline_astropy
    from huntsman.store.database import open_database

    configure_offline_astropy()
    wrong = [s for s in selection.status if s not in STAGE_STATUSES[stage]]
    if wrong:
        print(
            f"huntsman: --status {wrong[0]} is not a status of the {stage} stage "
            f"(one of {', '.join(STAGE_STATUSES[stage])})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    log = get_logger(command="reprocess")
    async with open_database(config.database, log, reuse_running=True) as database:
        pool = None if dry_run else make_pool(config, log)
        try:
            summary = await Reprocessor(config, database, pool, log).run(
                stage, selection, dry_run=dry_run, force=force
            )
        finally:
            if pool is not None:
                await pool.shutdown(1.0)
    return _said(summary, selection)


def _said(summary: ReprocessSummary, selection: Selection) -> int:
    """Print the summary of a re-run; its exit code."""
    stage = summary.stage
    if summary.unavailable:
        print(f"huntsman: {summary.unavailable}", file=sys.stderr)
        return EXIT_FAILURE
    if not summary.selected:
        what = selection.describe() or "at all"
        print(f"huntsman: no exposure matches {what} for {stage}", file=sys.stderr)
        return EXIT_FAILURE
    if summary.refused:
        print(f"huntsman: refusing to reprocess {stage}: {summary.refused}", file=sys.stderr)
        return EXIT_FAILURE
    if summary.dry_run:
        for line in summary.actions:
            print(f"would {line}")
        print(
            f"dry run: {len(summary.selected)} exposures selected, {len(summary.actions)} actions, "
            "nothing changed"
        )
        return EXIT_OK
    for filename, error in summary.failed:
        print(f"failed {filename}: {error}")
    outcomes = ", ".join(f"{n} {k}" for k, n in sorted(summary.outcomes.items())) or "nothing to do"
    print(
        f"{stage}: {len(summary.selected)} selected, {len(summary.done)} done ({outcomes}), "
        f"{len(summary.failed)} failed"
    )
    return EXIT_FAILURE if summary.failed else EXIT_OK
