"""The command-line tools other than ``run``: same code paths as the service."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

from bson import json_util
from bson.errors import BSONError

from huntsman.config import Config
from huntsman.logs import get_logger
from huntsman.models import FileSource, IngestRequest, utcnow
from huntsman.science.offline import configure_offline_astropy
from huntsman.science.paths import is_inside
from huntsman.services.watcher import is_candidate
from huntsman.store.database import Database, open_database

# The service's parts (huntsman.app, the ingestor) import the whole science stack: they are
# imported by the commands that use them, so that `status`, `check` and `export` start fast.

__all__ = ["calib", "check", "export", "ingest", "qc", "status"]


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
    otherwise nothing is ingested and no document is written.
    """
    from huntsman.app import ingest_params, make_pool
    from huntsman.services.ingestor import FileIngestor

    log = get_logger(command="ingest")
    configure_offline_astropy()
    errors = await asyncio.to_thread(
        _check_ingest_paths, args.paths, config.paths.raw_dir, args.outside_root
    )
    if errors:
        for line in errors:
            print(line, file=sys.stderr)
        return 2
    files = await asyncio.to_thread(_expand, args.paths, config.watcher.extensions)
    if not files:
        print("huntsman: no FITS files in the given paths", file=sys.stderr)
        return 1
    async with open_database(config.database, log, reuse_running=True) as database:
        await database.ensure_indexes()
        pool = make_pool(config, log)
        ingestor = FileIngestor(
            database.exposures, pool, ingest_params(config), config.ingest, config.watcher, log,
            concurrency=config.pool.max_in_flight,
        )
        tty = sys.stderr.isatty()
        submitted = 0

        def show() -> None:
            if tty:
                done = submitted - len(ingestor.stage.pending())
                print(f"\ringesting {done}/{len(files)}", end="", file=sys.stderr)

        # Each file is bounded by its job's timeout and its document write's retry deadline.
        rounds = -(-len(files) // ingestor.stage.concurrency)
        budget_s = rounds * (config.pool.job_timeout_s + ingestor.write_retry_s) + 60.0
        finished = False
        try:
            async with ingestor.stage.running():
                async with asyncio.timeout(budget_s):  # submitting waits while the queue is full
                    for path in files:
                        await ingestor.submit(IngestRequest(path, utcnow(), FileSource.CLI, args.force))
                        submitted += 1
                        show()
                    while not await ingestor.join(timeout_s=0.5 if tty else budget_s):
                        show()
                    finished = True
        except TimeoutError:
            pass
        finally:
            await pool.shutdown(1.0)
    counts = ingestor.counts
    if tty:
        print(file=sys.stderr)
    if not finished:
        print(f"huntsman: ingestion did not finish within {budget_s:.0f} s", file=sys.stderr)
        return 1
    print(
        f"{len(files)} files: {counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['quarantined']} quarantined, {counts['skipped']} already ingested"
    )
    return 1 if counts["failed"] or counts["quarantined"] else 0


async def _status_text(database: Database, config: Config) -> str:
    lines: list[str] = []
    heartbeat = await database.services.fresh(config.service.heartbeat_stale_s)
    if heartbeat is not None:
        lines.append(
            f"service: running (pid {heartbeat.get('pid')} on {heartbeat.get('host')}, "
            f"heartbeat {heartbeat['heartbeat'].isoformat(timespec='seconds')}, "
            f"ingest queue {heartbeat.get('ingest_queue', 0)})"
        )
    else:
        lines.append("service: not running")
    total = await database.exposures.count()
    lines.append(f"exposures: {total}")
    rows = await database.exposures.counts_by("observation_type", "ingest.status")
    for row in rows:
        lines.append(
            f"  {row.get('observation_type') or '(unknown)':<10} "
            f"{row.get('ingest_status') or '-':<12} {row['n']:>7}"
        )
    bad = [
        doc
        async for doc in database.exposures.find(
            {"ingest.status": {"$in": ["quarantined", "failed"]}},
            projection={"filename": 1, "ingest": 1, "_id": 0},
            limit=50,
        )
    ]
    if bad:
        lines.append("failed and quarantined files:")
        for doc in bad:
            ingest = doc.get("ingest", {})
            lines.append(
                f"  [{ingest.get('status')}, tries {ingest.get('tries')}] {doc['filename']}: "
                f"{ingest.get('error')}"
            )
    lines += await _calib_status_lines(database)
    lines += await _qc_status_lines(database)
    return "\n".join(lines)


async def _qc_status_lines(database: Database) -> list[str]:
    """Science frames by QC state (and grade), and the reasons of failed ones."""
    science = {"observation_type": "science"}
    lines = ["quality control (science frames):"]
    counts: dict[str, int] = {}
    for row in await database.exposures.counts_by("observation_type", "qc.status", "qc.grade"):
        if row.get("observation_type") != "science":
            continue
        state = row.get("qc_status") or "not measured"
        if row.get("qc_grade"):
            state += f" ({row['qc_grade']})"
        counts[state] = counts.get(state, 0) + row["n"]
    for state, n in sorted(counts.items()):
        lines.append(f"  {state:<24} {n:>7}")
    async for doc in database.exposures.find(
        {**science, "qc.status": "failed"}, projection={"filename": 1, "qc": 1, "_id": 0}, limit=20
    ):
        qc_doc = doc.get("qc") or {}
        lines.append(f"  [failed, tries {qc_doc.get('tries')}] {doc['filename']}: {qc_doc.get('error')}")
    return lines


async def _calib_status_lines(database: Database, max_records: int = 200) -> list[str]:
    """Masters per calibration date, and the reason of every group without a master."""
    lines: list[str] = []
    n_current = await database.calibs.count({"superseded": False})
    n_superseded = await database.calibs.count({"superseded": True})
    lines.append(f"master calibrations: {n_current} current, {n_superseded} superseded")
    date = None
    async for rec in database.calibs.find_status(limit=max_records):
        if rec.get("date") != date:
            date = rec.get("date")
            lines.append(f"  {date}")
        parts = (rec.get("calib_type"), rec.get("camera"), rec.get("physical_filter"))
        what = " ".join(str(p) for p in parts if p)
        masters = rec.get("masters") or []
        line = f"    {what:<30} {rec.get('state', '?'):<12} {len(masters)} master(s)"
        if rec.get("reason"):
            line += f": {rec['reason']}"
        lines.append(line)
        for item in (rec.get("excluded") or [])[:5]:
            lines.append(f"      excluded {item['filename']}: {item['reason']}")
        if len(rec.get("excluded") or []) > 5:
            lines.append(f"      ... {len(rec['excluded']) - 5} more excluded")
    return lines


async def calib(config: Config, args: argparse.Namespace) -> int:
    """Build master calibrations on demand, through the service's own CalibService."""
    from huntsman.app import make_calib_service, make_pool

    log = get_logger(command="calib")
    configure_offline_astropy()
    async with open_database(config.database, log, reuse_running=True) as database:
        await database.ensure_indexes()
        pool = make_pool(config, log)
        try:
            service = make_calib_service(config, database, pool, log)
            summary = await service.run_pass(
                dates=set(args.date) if args.date else None,
                cameras=set(args.camera) if args.camera else None,
                types=args.calib_type or ("bias", "dark", "flat"),
                force=args.force,
                reason="command",
            )
        finally:
            await pool.shutdown(1.0)
        if (args.date or args.camera) and not (
            summary.built or summary.failed or summary.missing or summary.up_to_date
        ):
            print(f"huntsman: no calibration frames match {_filters(args, 'date', 'camera')}",
                  file=sys.stderr)
            return 1
        for filename in summary.built:
            print(f"built {filename}")
        for key in summary.failed:
            print(f"failed {key}")
        print(
            f"{len(summary.built)} built, {summary.up_to_date} up to date, "
            f"{len(summary.missing)} without enough frames or masters, {len(summary.failed)} failed "
            f"(`huntsman status` shows the reasons)"
        )
    return 1 if summary.failed else 0


async def qc(config: Config, args: argparse.Namespace) -> int:
    """Calibrate and measure science frames on demand, through the service's QualityMonitor."""
    import fnmatch

    from huntsman.app import make_pool, make_quality_monitor

    log = get_logger(command="qc")
    configure_offline_astropy()
    query: dict[str, Any] = {"observation_type": "science", "ingest.status": "ok"}
    for field, values in (("calib_date", args.night), ("camera", args.camera),
                          ("physical_filter", args.physical_filter)):
        if values:
            query[field] = {"$in": list(values)}
    results: dict[str, int] = {}
    async with open_database(config.database, log, reuse_running=True) as database:
        await database.ensure_indexes()
        pool = make_pool(config, log)
        try:
            monitor = make_quality_monitor(config, database, pool, log)
            names = [d["filename"] async for d in database.exposures.find(
                query, projection={"_id": 0, "filename": 1})]
            if args.pattern:
                names = [n for n in names if fnmatch.fnmatch(n, args.pattern)
                         or fnmatch.fnmatch(Path(n).name, args.pattern)]

            async def one(name: str) -> None:
                status = await monitor.process(name, force=args.reprocess) or "unchanged"
                results[status] = results.get(status, 0) + 1
                print(f"{status:<15} {name}")

            await asyncio.gather(*(one(n) for n in sorted(names)))
        finally:
            await pool.shutdown(1.0)
    if not names:
        what = _filters(args, "night", "camera", "physical_filter", "pattern")
        print(f"huntsman: no ingested science frames match {what or 'at all'}", file=sys.stderr)
        return 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(results.items()))
    print(f"{len(names)} science frames: {summary}")
    return 1 if results.get("failed") else 0


async def status(config: Config, args: argparse.Namespace) -> int:
    log = get_logger(command="status")
    async with open_database(config.database, log, reuse_running=True) as database:
        print(await _status_text(database, config))
    return 0


async def check(config: Config, args: argparse.Namespace) -> int:
    """Health check for supervisors and monitoring: exit 0 only with a fresh heartbeat."""
    log = get_logger(command="check")
    async with open_database(config.database, log, reuse_running=True) as database:
        heartbeat = await database.services.fresh(config.service.heartbeat_stale_s)
    if heartbeat is None:
        print("unhealthy: no running service with a fresh heartbeat", file=sys.stderr)
        return 1
    print(f"healthy: heartbeat {heartbeat['heartbeat'].isoformat(timespec='seconds')}")
    return 0


async def build_index(config: Config, args: argparse.Namespace) -> int:
    """Build astrometry.net index files for fields too narrow for the Tycho-2 indexes."""
    from huntsman.science.astrometry import build_index as build

    out = args.out or config.paths.astrometry_dir
    if not args.refcat.is_file():
        print(f"huntsman: no such catalogue: {args.refcat}", file=sys.stderr)
        return 2
    try:
        columns = await asyncio.to_thread(_csv_columns, args.refcat)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"huntsman: cannot read catalogue {args.refcat}: {exc}", file=sys.stderr)
        return 2
    wanted = {"--ra-col": args.ra_col, "--dec-col": args.dec_col, "--mag-col": args.mag_col}
    absent = [f"{option} {name}" for option, name in wanted.items() if name not in columns]
    if absent:
        print(
            f"huntsman: catalogue {args.refcat} has no column {', '.join(absent)}; "
            f"its columns: {', '.join(columns) or '(none)'}",
            file=sys.stderr,
        )
        return 2
    try:
        files = await asyncio.to_thread(
            build, args.refcat, out, ra_col=args.ra_col, dec_col=args.dec_col, mag_col=args.mag_col
        )
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"huntsman: build-index failed: {exc}", file=sys.stderr)
        return 1
    for path in files:
        print(path)
    print(f"{len(files)} index files in {out}; the service adds this directory to its index path")
    return 0


def _csv_columns(path: Path) -> list[str]:
    """The header row of a CSV catalogue (blocking)."""
    with open(path, newline="") as handle:
        row = next(csv.reader(handle), [])
    return [name.strip() for name in row]


def _filters(args: argparse.Namespace, *names: str) -> str:
    """``--night 2021-01-07 --camera X``: the selection options given, as typed."""
    parts = []
    for name in names:
        value = getattr(args, name, None)
        if value:
            values = value if isinstance(value, list) else [value]
            option = {"physical_filter": "filter", "observation_type": "type"}.get(name, name)
            parts += [f"--{option} {v}" for v in values]
    return " ".join(parts)


def _export_query(args: argparse.Namespace) -> dict[str, Any]:
    """The filter: ``--query`` (MongoDB Extended JSON, so ``{"$date": ...}`` works) and the rest."""
    query: dict[str, Any] = {}
    if args.query:
        parsed = json_util.loads(args.query)
        if not isinstance(parsed, dict):
            raise ValueError("it must be a JSON object")
        query = parsed
    for field, value in (
        ("observation_type", args.observation_type),
        ("camera", args.camera),
        ("physical_filter", args.physical_filter),
        ("ingest.status", args.status),
        ("calib_date", args.night),
    ):
        if value is not None:
            query[field] = value
    return query


async def export(config: Config, args: argparse.Namespace) -> int:
    from huntsman.cli import json_default

    log = get_logger(command="export")
    try:
        query = _export_query(args)
    except (ValueError, TypeError, BSONError) as exc:
        print(f"huntsman: --query is not a valid Extended JSON filter: {exc}", file=sys.stderr)
        return 2
    projection = {"_id": 0, **({"header": 0} if args.no_header else {})}
    n = 0
    async with open_database(config.database, log, reuse_running=True) as database:
        async for doc in database.exposures.find(query, limit=args.limit, projection=projection):
            sys.stdout.write(json.dumps(doc, default=json_default) + "\n")
            n += 1
    if n == 0:
        what = _filters(args, "observation_type", "camera", "physical_filter", "status", "night")
        what = " ".join(p for p in (what, f"--query {args.query}" if args.query else "") if p)
        print(f"huntsman: no exposure matches {what or '(the database is empty)'}", file=sys.stderr)
        return 1
    return 0
