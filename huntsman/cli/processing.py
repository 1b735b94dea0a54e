"""The commands that run the service's processing on demand, by the service's own code.

``ingest``, ``calib``, ``qc`` and ``build-index`` take the same code paths as the service.

The re-runs (``reprocess STAGE``, also spelt ``qc --reprocess`` and ``calib --force``) are
:mod:`huntsman.cli.reprocess`.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from huntsman.cli.exits import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from huntsman.cli.progress import Progress
from huntsman.cli.reprocess import rerun
from huntsman.cli.selection import CALIB_TYPES, Selection
from huntsman.config import Config
from huntsman.logs import get_logger
from huntsman.models import FileSource, IngestRequest, QCStatus, utcnow
from huntsman.paths import is_inside
from huntsman.science.offline import configure_offline_astropy
from huntsman.services.stage import deadline_s
from huntsman.services.watcher import is_candidate
from huntsman.store.database import open_database

if TYPE_CHECKING:
    from huntsman.services.quality import QualityMonitor

# The service's parts (huntsman.app, the ingestor) import the whole science stack: they are
# imported by the commands that use them, so that `status`, `check` and `export` start fast.

__all__ = ["build_index", "calib", "ingest", "qc"]


def _expand(paths: list[Path], extensions: tuple[str, ...]) -> list[str]:
    files: list[str] = []
    for path in paths:
        if path.is_dir():
            for directory, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [os.path.join(directory, n) for n in sorted(names) if is_candidate(n, extensions)]
        else:
            files.append(str(path))
    return [os.path.abspath(f) for f in files]


def _check_ingest_paths(paths: list[Path], raw_dir: Path, outside_root: bool) -> list[str]:
    """One line per path that cannot be ingested (missing, or outside the raw root)."""
    errors = []
    for path in paths:
        if not path.exists():
            errors.append(f"huntsman: no such file or directory: {path}")
        elif not outside_root and not is_inside(path, raw_dir, allow_root=True):
            errors.append(
                f"huntsman: {path} is outside the raw directory {raw_dir}; add --outside-root to "
                "ingest it where it is (such files are never written to)"
            )
    return errors


async def ingest(config: Config, args: argparse.Namespace) -> int:
    """Ingest files and directories through the service's own ingestor.

    Every path must exist and (unless ``--outside-root``) lie inside ``paths.raw_dir``;
    otherwise nothing is ingested and no document is written.  Files already ingested are
    skipped; ``--force`` (re-ingest them) is refused with the ``reprocess ingest`` line to use.
    """
    from huntsman.app import ingest_params, make_pool
    from huntsman.services.ingestor import FileIngestor

    if args.force:  # re-ingesting is `reprocess ingest`, which keeps the replaced values
        patterns = await asyncio.to_thread(_as_patterns, args.paths)
        print(f"huntsman: ingest --force is now: huntsman reprocess ingest {patterns}", file=sys.stderr)
        return EXIT_CONFIG
    log = get_logger(command="ingest")
    configure_offline_astropy()
    errors = await asyncio.to_thread(
        _check_ingest_paths, args.paths, config.paths.raw_dir, args.outside_root
    )
    if errors:
        for line in errors:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    files = await asyncio.to_thread(_expand, args.paths, config.watcher.extensions)
    if not files:
        print("huntsman: no FITS files in the given paths", file=sys.stderr)
        return EXIT_FAILURE
    async with open_database(config.database, log, reuse_running=True) as database:
        await database.ensure_indexes()
        pool = make_pool(config, log)
        ingestor = FileIngestor(
            database.exposures, pool, ingest_params(config), config.ingest, config.watcher, log,
            concurrency=config.pool.max_in_flight,
        )
        bar = Progress(len(files), "ingest")
        item_s = config.pool.job_timeout_s + ingestor.write_retry_s
        budget_s = deadline_s(len(files), ingestor.stage.concurrency, item_s)
        requests = (IngestRequest(path, utcnow(), FileSource.CLI) for path in files)
        try:
            async with ingestor.stage.running():
                finished = await ingestor.stage.feed(requests, timeout_s=budget_s, progress=bar.update)
        finally:
            bar.close()
            await pool.shutdown(1.0)
    counts = ingestor.counts
    if not finished:
        print(f"huntsman: ingestion did not finish within {budget_s:.0f} s", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"{len(files)} files: {counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['quarantined']} quarantined, {counts['skipped']} already ingested"
    )
    return EXIT_FAILURE if counts["failed"] or counts["quarantined"] else EXIT_OK


def _as_patterns(paths: list[Path]) -> str:
    """``--pattern`` flags selecting the documents of these files and directories (blocking)."""
    globs = [os.path.join(os.path.abspath(p), "*") if p.is_dir() else os.path.abspath(p) for p in paths]
    return " ".join(f"--pattern {shlex.quote(glob)}" for glob in globs)


async def calib(config: Config, args: argparse.Namespace) -> int:
    """Build missing or out-of-date master calibrations, through the service's own CalibService.

    ``calib --force`` (rebuild even masters that are up to date) is ``reprocess calib``.
    """
    from huntsman.app import make_calib_service, make_pool

    selection = Selection.from_args(args)
    if args.force:
        return await rerun(config, "calib", selection, force=True)
    log = get_logger(command="calib")
    configure_offline_astropy()
    async with open_database(config.database, log, reuse_running=True) as database:
        await database.ensure_indexes()
        pool = make_pool(config, log)
        try:
            service = make_calib_service(config, database, pool, log)
            summary = await service.run_pass(
                dates=set(selection.night) or None,
                cameras=set(selection.camera) or None,
                types=selection.observation_type or CALIB_TYPES,
                force=False,
                reason="command",
            )
        finally:
            await pool.shutdown(1.0)
        if (selection.night or selection.camera) and not (
            summary.built or summary.failed or summary.missing or summary.up_to_date
        ):
            print(f"huntsman: no calibration frames match {selection.describe()}", file=sys.stderr)
            return EXIT_FAILURE
        for filename in summary.built:
            print(f"built {filename}")
        for key in summary.failed:
            print(f"failed {key}")
        print(
            f"{len(summary.built)} built, {summary.up_to_date} up to date, "
            f"{len(summary.missing)} without enough frames or masters, {len(summary.failed)} failed "
            f"(`huntsman status` shows the reasons)"
        )
    return EXIT_FAILURE if summary.failed else EXIT_OK


async def qc(config: Config, args: argparse.Namespace) -> int:
    """Calibrate and measure the science frames not measured yet, through the QualityMonitor.

    ``qc --reprocess`` (measure again even frames that are done) is ``reprocess qc``.
    """
    from huntsman.app import make_pool, make_quality_monitor

    selection = Selection.from_args(args)
    if args.reprocess:
        return await rerun(config, "qc", selection, force=args.force)
    log = get_logger(command="qc")
    configure_offline_astropy()
    results: dict[str, int] = {}
    async with open_database(config.database, log, reuse_running=True) as database:
        await database.ensure_indexes()
        pool = make_pool(config, log)
        try:
            # Its own monitor, without sweeps: only the selected frames are measured.
            monitor = make_quality_monitor(config, database, pool, log, sweeps=False)
            names = sorted([
                d["filename"]
                async for d in database.exposures.find(
                    selection.query("qc"), projection={"_id": 0, "filename": 1}
                )
                if selection.matches(d["filename"])
            ])
            finished, budget_s = await _measure_all(monitor, names, config, results)
        finally:
            await pool.shutdown(1.0)
    if not names:
        print(f"huntsman: no ingested science frames match {selection.describe() or 'at all'}",
              file=sys.stderr)
        return EXIT_FAILURE
    if monitor.last_crash is not None:
        raise monitor.last_crash  # as before the stage: a database error is exit 4, a bug a traceback
    if not finished:
        print(f"huntsman: qc did not finish within {budget_s:.0f} s", file=sys.stderr)
        return EXIT_FAILURE
    summary = ", ".join(f"{n} {k}" for k, n in sorted(results.items()))
    print(f"{len(names)} science frames: {summary}")
    return EXIT_FAILURE if results.get("failed") else EXIT_OK


async def _measure_all(
    monitor: QualityMonitor, names: list[str], config: Config, results: dict[str, int]
) -> tuple[bool, float]:
    """Offer ``names`` to the monitor's stage and join it with a deadline; one line per frame
    (its new ``qc.status``, or ``unchanged``), counted in ``results``.  Returns whether all
    finished, and the deadline."""
    from huntsman.services.quality import QCRequest

    stage = monitor.stage
    bar = Progress(len(names), "qc")
    reported: set[str] = set()

    async def measured(name: str, status: QCStatus) -> None:
        reported.add(name)
        results[status] = results.get(status, 0) + 1
        print(f"{status:<15} {name}")

    stage.add_listener(measured)
    item_s = config.qc.job_timeout_s + config.database.write_retry_s
    budget_s = deadline_s(len(names), stage.concurrency, item_s)
    try:
        async with stage.running():
            finished = await stage.feed(
                (QCRequest(name) for name in names), timeout_s=budget_s, progress=bar.update
            )
    finally:
        bar.close()
    if finished and monitor.last_crash is None:  # no outcome told: nothing was done to it
        for name in names:
            if name not in reported:
                results["unchanged"] = results.get("unchanged", 0) + 1
                print(f"{'unchanged':<15} {name}")
    return finished, budget_s


async def build_index(config: Config, args: argparse.Namespace) -> int:
    """Build astrometry.net index files for fields too narrow for the Tycho-2 indexes."""
    from huntsman.science.astrometry import build_index as build

    out = args.out or config.paths.astrometry_dir
    if not args.refcat.is_file():
        print(f"huntsman: no such catalogue: {args.refcat}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        columns = await asyncio.to_thread(_csv_columns, args.refcat)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"huntsman: cannot read catalogue {args.refcat}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    wanted = {"--ra-col": args.ra_col, "--dec-col": args.dec_col, "--mag-col": args.mag_col}
    absent = [f"{option} {name}" for option, name in wanted.items() if name not in columns]
    if absent:
        print(
            f"huntsman: catalogue {args.refcat} has no column {', '.join(absent)}; "
            f"its columns: {', '.join(columns) or '(none)'}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        files = await asyncio.to_thread(
            build, args.refcat, out, ra_col=args.ra_col, dec_col=args.dec_col, mag_col=args.mag_col
        )
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"huntsman: build-index failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    for path in files:
        print(path)
    print(f"{len(files)} index files in {out}; the service adds this directory to its index path")
    return EXIT_OK


def _csv_columns(path: Path) -> list[str]:
    """The header row of a CSV catalogue (blocking)."""
    with open(path, newline="") as handle:
        row = next(csv.reader(handle), [])
    return [name.strip() for name in row]


