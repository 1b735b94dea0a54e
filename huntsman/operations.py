"""The operator's commands: ``report`` (night report) and ``reprocess`` (re-run a stage)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from huntsman.config import Config
from huntsman.logs import get_logger
from huntsman.models import utcnow
from huntsman.store.database import open_database

__all__ = ["add_parsers", "report", "reprocess"]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``report`` and ``reprocess`` sub-commands."""
    report_p = sub.add_parser("report", help="write the night report (HTML page with PNG plots)")
    report_p.add_argument("--night", help="YYYY-MM-DD, the UTC day of the night (default: today, UTC)")
    report_p.add_argument("--out", type=Path, help="output directory (default <reports_dir>/<night>)")
    repro = sub.add_parser("reprocess", help="re-run a stage for a selection of exposures")
    repro.add_argument("stage", choices=["ingest", "solve", "calib", "qc"])
    repro.add_argument("--night", help="calibration date YYYY-MM-DD (UTC day)")
    repro.add_argument("--camera", help="CAM-ID")
    repro.add_argument("--filter", dest="physical_filter")
    repro.add_argument("--type", dest="observation_type", choices=["bias", "dark", "flat", "science"])
    repro.add_argument(
        "--status", help="the stage's own status: ingest.status (ingest, calib), wcs.status, qc.status"
    )
    repro.add_argument("--pattern", help="glob on the file path or name, e.g. '*/TESTCAM01/*.fits'")
    repro.add_argument("--dry-run", action="store_true", help="list what would be done, change nothing")


async def report(config: Config, args: argparse.Namespace) -> int:
    import datetime as dt

    from huntsman.report import write_report

    night = args.night or utcnow().date().isoformat()
    try:
        dt.date.fromisoformat(night)
    except ValueError:
        print(f"huntsman: --night must be YYYY-MM-DD, not {night!r}", file=sys.stderr)
        return 2
    out = args.out or config.paths.reports_dir / night
    log = get_logger(command="report")
    async with open_database(config.database, log, reuse_running=True) as database:
        result = await write_report(database, night, out, worst_n=config.report.worst_n)
    what = "no data" if result.empty else f"{result.n_exposures} exposures, {len(result.plots)} plots"
    print(f"{result.path} ({what})")
    return 0


async def reprocess(config: Config, args: argparse.Namespace) -> int:
    from huntsman.app import make_pool
    from huntsman.reprocess import Reprocessor, Selection
    from huntsman.science.offline import configure_offline_astropy

    configure_offline_astropy()
    selection = Selection(
        night=args.night,
        camera=args.camera,
        physical_filter=args.physical_filter,
        observation_type=args.observation_type,
        status=args.status,
        pattern=args.pattern,
    )
    log = get_logger(command="reprocess")
    async with open_database(config.database, log, reuse_running=True) as database:
        pool = None if args.dry_run else make_pool(config, log)
        try:
            summary = await Reprocessor(config, database, pool, log).run(
                args.stage, selection, dry_run=args.dry_run
            )
        finally:
            if pool is not None:
                await pool.shutdown(1.0)
    if summary.unavailable:
        print(f"huntsman: {summary.unavailable}", file=sys.stderr)
        return 1
    if args.dry_run:
        for line in summary.actions:
            print(f"would {line}")
        print(
            f"dry run: {len(summary.selected)} exposures selected, {len(summary.actions)} actions, "
            "nothing changed"
        )
        return 0
    for filename, error in summary.failed:
        print(f"failed {filename}: {error}")
    outcomes = ", ".join(f"{n} {k}" for k, n in sorted(summary.outcomes.items())) or "nothing to do"
    print(
        f"{args.stage}: {len(summary.selected)} selected, {len(summary.done)} done ({outcomes}), "
        f"{len(summary.failed)} failed"
    )
    return 1 if summary.failed else 0
