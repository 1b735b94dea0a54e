"""The command-line tools other than ``run``: same code paths as the service."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from huntsman.app import ingest_params, make_pool
from huntsman.config import Config
from huntsman.logs import get_logger
from huntsman.models import FileSource, IngestRequest, utcnow
from huntsman.science.offline import configure_offline_astropy
from huntsman.services.ingestor import FileIngestor
from huntsman.services.watcher import is_candidate
from huntsman.store.database import Database, open_database

__all__ = ["check", "export", "ingest", "status"]


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


async def ingest(config: Config, args: argparse.Namespace) -> int:
    """Ingest files and directories through the service's own ingestor."""
    log = get_logger(command="ingest")
    configure_offline_astropy()
    files = _expand(args.paths, config.watcher.extensions)
    missing = [str(p) for p in args.paths if not p.exists()]
    for path in missing:
        print(f"huntsman: no such file or directory: {path}", file=sys.stderr)
    async with open_database(config.database, log, reuse_running=True) as database:
        await database.ensure_indexes()
        pool = make_pool(config, log)
        ingestor = FileIngestor(
            database.exposures, pool, ingest_params(config), config.ingest, config.watcher, log,
            concurrency=config.pool.max_in_flight,
        )
        tty = sys.stderr.isatty()
        done = 0
        try:
            async with asyncio.TaskGroup() as group:
                consumer = group.create_task(ingestor.run(), name="ingestor")
                for path in files:
                    await ingestor.submit(IngestRequest(path, utcnow(), FileSource.CLI, args.force))
                    if tty:
                        done = len(files) - ingestor.queue.qsize() - pool.in_flight
                        print(f"\ringesting {done}/{len(files)}", end="", file=sys.stderr)
                while not ingestor.idle():
                    await asyncio.sleep(0.2)
                    if tty:
                        done = len(files) - len(ingestor._pending)
                        print(f"\ringesting {done}/{len(files)}", end="", file=sys.stderr)
                consumer.cancel()
        finally:
            await pool.shutdown(1.0)
    counts = ingestor.counts
    if tty:
        print(file=sys.stderr)
    print(
        f"{len(files)} files: {counts['ok']} ok, {counts['failed']} failed, "
        f"{counts['quarantined']} quarantined, {counts['skipped']} already ingested"
    )
    return 1 if missing or counts["failed"] or counts["quarantined"] else 0


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
    return "\n".join(lines)


async def status(config: Config, args: argparse.Namespace) -> int:
    log = get_logger(command="status")
    async with open_database(config.database, log, reuse_running=True) as database:
        print(await _status_text(database, config))
    return 0


async def check(config: Config, args: argparse.Namespace) -> int:
    """Health check for supervisors and monitoring: exit 0 only with a fresh heartbeat."""
    log = get_logger(command="check")
    try:
        async with open_database(config.database, log, reuse_running=True) as database:
            heartbeat = await database.services.fresh(config.service.heartbeat_stale_s)
    except Exception as exc:
        print(f"unhealthy: database unreachable: {exc}", file=sys.stderr)
        return 1
    if heartbeat is None:
        print("unhealthy: no running service with a fresh heartbeat", file=sys.stderr)
        return 1
    print(f"healthy: heartbeat {heartbeat['heartbeat'].isoformat(timespec='seconds')}")
    return 0


def _export_query(args: argparse.Namespace) -> dict[str, Any]:
    query: dict[str, Any] = json.loads(args.query) if args.query else {}
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
    except json.JSONDecodeError as exc:
        print(f"huntsman: --query is not valid JSON: {exc}", file=sys.stderr)
        return 2
    projection = {"_id": 0, **({"header": 0} if args.no_header else {})}
    async with open_database(config.database, log, reuse_running=True) as database:
        async for doc in database.exposures.find(query, limit=args.limit, projection=projection):
            sys.stdout.write(json.dumps(doc, default=json_default) + "\n")
    return 0
