"""The commands that only read: ``status``, ``check``, ``export`` and ``report``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from bson import json_util
from bson.errors import BSONError

from huntsman.cli.exits import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from huntsman.cli.selection import Selection
from huntsman.config import Config
from huntsman.logs import get_logger
from huntsman.models import IngestStatus, ObservationType, QCStatus, utcnow
from huntsman.store.database import Database, open_database

__all__ = ["check", "export", "json_default", "report", "status"]


async def status(config: Config, args: argparse.Namespace) -> int:
    log = get_logger(command="status")
    async with open_database(config.database, log, reuse_running=True) as database:
        print(await _status_text(database, config))
    return EXIT_OK


async def check(config: Config, args: argparse.Namespace) -> int:
    """Health check for supervisors and monitoring: exit 0 only with a fresh heartbeat."""
    log = get_logger(command="check")
    async with open_database(config.database, log, reuse_running=True) as database:
        heartbeat = await database.services.fresh(config.service.heartbeat_stale_s)
    if heartbeat is None:
        print("unhealthy: no running service with a fresh heartbeat", file=sys.stderr)
        return EXIT_FAILURE
    print(f"healthy: heartbeat {heartbeat['heartbeat'].isoformat(timespec='seconds')}")
    return EXIT_OK


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
            {"ingest.status": {"$in": [IngestStatus.QUARANTINED.value, IngestStatus.FAILED.value]}},
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
    science = {"observation_type": ObservationType.SCIENCE.value}
    lines = ["quality control (science frames):"]
    counts: dict[str, int] = {}
    for row in await database.exposures.counts_by("observation_type", "qc.status", "qc.grade"):
        if row.get("observation_type") != ObservationType.SCIENCE:
            continue
        state = row.get("qc_status") or "not measured"
        if row.get("qc_grade"):
            state += f" ({row['qc_grade']})"
        counts[state] = counts.get(state, 0) + row["n"]
    for state, n in sorted(counts.items()):
        lines.append(f"  {state:<24} {n:>7}")
    async for doc in database.exposures.find(
        {**science, "qc.status": QCStatus.FAILED.value},
        projection={"filename": 1, "qc": 1, "_id": 0},
        limit=20,
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


def json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


def _export_query(args: argparse.Namespace, selection: Selection) -> dict[str, Any]:
    """The filter: ``--query`` (MongoDB Extended JSON, so ``{"$date": ...}`` works) and the rest."""
    query: dict[str, Any] = {}
    if args.query:
        parsed = json_util.loads(args.query)
        if not isinstance(parsed, dict):
            raise ValueError("it must be a JSON object")
        query = parsed
    return {**query, **selection.query()}


async def export(config: Config, args: argparse.Namespace) -> int:
    log = get_logger(command="export")
    selection = Selection.from_args(args)
    try:
        query = _export_query(args, selection)
    except (ValueError, TypeError, BSONError) as exc:
        print(f"huntsman: --query is not a valid Extended JSON filter: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    projection = {"_id": 0, **({"header": 0} if args.no_header else {})}
    n = 0
    # A glob is matched here, so the limit is counted here when there is one.
    limit = 0 if selection.pattern else args.limit
    async with open_database(config.database, log, reuse_running=True) as database:
        async for doc in database.exposures.find(query, limit=limit, projection=projection):
            if not selection.matches(str(doc.get("filename", ""))):
                continue
            sys.stdout.write(json.dumps(doc, default=json_default) + "\n")
            n += 1
            if args.limit and n >= args.limit:
                break
    if n == 0:
        what = " ".join(p for p in (selection.describe(), f"--query {args.query}" if args.query else "") if p)
        print(f"huntsman: no exposure matches {what or '(the database is empty)'}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


async def report(config: Config, args: argparse.Namespace) -> int:
    """The night report of each ``--night`` (default: today, UTC)."""
    from huntsman.report import write_report

    nights = Selection.from_args(args).night or (utcnow().date().isoformat(),)
    log = get_logger(command="report")
    async with open_database(config.database, log, reuse_running=True) as database:
        for night in nights:
            out = args.out or config.paths.reports_dir / night
            if args.out and len(nights) > 1:
                out = args.out / night
            result = await write_report(database, night, out, worst_n=config.report.worst_n)
            what = "no data" if result.empty else f"{result.n_exposures} exposures, {len(result.plots)} plots"
            print(f"{result.path} ({what})")
            if result.empty:
                print(f"huntsman: no exposures for the night {night}", file=sys.stderr)
    return EXIT_OK
