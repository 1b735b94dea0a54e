"""The operator's commands: ``report`` (night report) and ``reprocess`` (re-run a stage)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from huntsman.config import Config
from huntsman.logs import get_logger
from huntsman.models import utcnow
from huntsman.store.database import open_database

__all__ = ["add_parsers", "report", "reprocess"]


# The values of each stage's own status field (``STATUS_FIELD`` of huntsman.reprocess).
STAGE_STATUSES = {
    "ingest": ("ok", "failed", "quarantined"),
    "calib": ("ok", "failed", "quarantined"),
    "solve": ("pending", "solved", "failed", "skipped"),
    "qc": ("waiting_calibs", "done", "failed"),
}


def add_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    """The ``report`` and ``reprocess`` sub-commands."""
    from huntsman.cli import OBSERVATION_TYPES, iso_date

    report_p = sub.add_parser("report", help="write the night report (HTML page with PNG plots)")
    report_p.add_argument(
        "--night", type=iso_date, help="YYYY-MM-DD, the UTC day of the night (default: today, UTC)"
    )
    report_p.add_argument("--out", type=Path, help="output directory (default <reports_dir>/<night>)")
    repro = sub.add_parser("reprocess", help="re-run a stage for a selection of exposures")
    repro.add_argument("stage", choices=["ingest", "solve", "calib", "qc"])
    repro.add_argument("--night", type=iso_date, help="calibration date YYYY-MM-DD (UTC day)")
    repro.add_argument("--camera", help="CAM-ID")
    repro.add_argument("--filter", dest="physical_filter")
    repro.add_argument("--type", dest="observation_type", choices=OBSERVATION_TYPES)
    repro.add_argument(
        "--status",
        choices=sorted({s for values in STAGE_STATUSES.values() for s in values}),
        help="the stage's own status: ingest.status (ingest, calib), wcs.status (solve), qc.status",
    )
    repro.add_argument("--pattern", help="glob on the file path or name, e.g. '*/TESTCAM01/*.fits'")
    repro.add_argument("--dry-run", action="store_true", help="list what would be done, change nothing")
    repro.add_argument(
        "--force", action="store_true",
        help="replace measured values even with empty ones (e.g. zeropoints without a catalogue; "
        "the old values stay in history), and accept a configuration that differs from the "
        "running service's",
    )


async def report(config: Config, args: argparse.Namespace) -> int:
    from huntsman.report import write_report

    night = args.night or utcnow().date().isoformat()
    out = args.out or config.paths.reports_dir / night
    log = get_logger(command="report")
    async with open_database(config.database, log, reuse_running=True) as database:
        result = await write_report(database, night, out, worst_n=config.report.worst_n)
    what = "no data" if result.empty else f"{result.n_exposures} exposures, {len(result.plots)} plots"
    print(f"{result.path} ({what})")
    if result.empty:
        print(f"huntsman: no exposures for the night {night}", file=sys.stderr)
    return 0


async def reprocess(config: Config, args: argparse.Namespace) -> int:
    from huntsman.app import make_pool
    from huntsman.reprocess import Reprocessor, Selection
    from huntsman.science.offline import configure_offline_astropy

    configure_offline_astropy()
    if args.status is not None and args.status not in STAGE_STATUSES[args.stage]:
        print(
            f"huntsman: --status {args.status} is not a status of the {args.stage} stage "
            f"(one of {', '.join(STAGE_STATUSES[args.stage])})",
            file=sys.stderr,
        )
        return 2
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
                args.stage, selection, dry_run=args.dry_run, force=args.force
            )
        finally:
            if pool is not None:
                await pool.shutdown(1.0)
    if summary.unavailable:
        print(f"huntsman: {summary.unavailable}", file=sys.stderr)
        return 1
    if not summary.selected:
        what = " ".join(
            f"--{name} {value}"
            for name, value in (
                ("night", args.night), ("camera", args.camera), ("filter", args.physical_filter),
                ("type", args.observation_type), ("status", args.status), ("pattern", args.pattern),
            )
            if value is not None
        )
        print(f"huntsman: no exposure matches {what or 'at all'} for {args.stage}", file=sys.stderr)
        return 1
    if summary.refused:
        print(f"huntsman: refusing to reprocess {args.stage}: {summary.refused}", file=sys.stderr)
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
