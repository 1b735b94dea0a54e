"""Command line: ``python -m huntsman [run|ingest|status|check|export|report|reprocess|...]``."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from huntsman import __version__
from huntsman.config import Config, ConfigError, load_config
from huntsman.logs import configure_logging

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_ALREADY_RUNNING = 3  # ``run``: another service holds this var directory


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="huntsman", description="Data-reduction service of the Huntsman Telescope."
    )
    parser.add_argument("--version", action="version", version=f"huntsman {__version__}")
    parser.add_argument("--config", type=Path, help="config file (default etc/huntsman.yaml)")
    parser.add_argument("--override", type=Path, help="local override file layered on top")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser(
        "run", help="run the service (the default); SIGTERM, SIGINT and SIGHUP shut it down cleanly"
    )
    sub.add_parser("validate-config", help="validate the configuration and print it")
    ingest = sub.add_parser("ingest", help="ingest files or directories (back-fill)")
    ingest.add_argument("paths", nargs="+", type=Path)
    ingest.add_argument("--force", action="store_true", help="re-ingest files already ingested")
    sub.add_parser("status", help="counts, quarantined files and whether a service runs")
    sub.add_parser("check", help="exit 0 only if a running service's heartbeat is fresh")
    calib = sub.add_parser("calib", help="build missing or out-of-date master calibrations now")
    calib.add_argument("--date", action="append", help="calibration date YYYY-MM-DD (repeatable)")
    calib.add_argument("--camera", action="append", help="CAM-ID (repeatable)")
    calib.add_argument("--type", dest="calib_type", action="append", choices=["bias", "dark", "flat"])
    calib.add_argument("--force", action="store_true", help="rebuild even masters that are up to date")
    qc = sub.add_parser("qc", help="calibrate and measure science frames now (same code as the service)")
    qc.add_argument("--reprocess", action="store_true", help="measure again even frames that are done")
    qc.add_argument("--night", action="append", help="calibration date YYYY-MM-DD (repeatable)")
    qc.add_argument("--camera", action="append", help="CAM-ID (repeatable)")
    qc.add_argument("--filter", dest="physical_filter", action="append", help="filter (repeatable)")
    qc.add_argument("--pattern", help="shell pattern matched against the raw filename")
    index = sub.add_parser(
        "build-index", help="build an astrometry.net index from a local reference catalogue"
    )
    index.add_argument("--refcat", type=Path, required=True, help="catalogue CSV (SkyMapper columns)")
    index.add_argument("--out", type=Path, help="output directory (default paths.astrometry_dir)")
    index.add_argument("--ra-col", default="raj2000")
    index.add_argument("--dec-col", default="dej2000")
    index.add_argument("--mag-col", default="g_psf")
    export = sub.add_parser("export", help="print exposure documents as JSON lines")
    export.add_argument("--type", dest="observation_type", help="bias, dark, flat or science")
    export.add_argument("--camera")
    export.add_argument("--filter", dest="physical_filter")
    export.add_argument("--status", help="ingest status: ok, failed or quarantined")
    export.add_argument("--night", help="calibration date YYYY-MM-DD (UTC day)")
    export.add_argument("--query", help="a MongoDB filter as JSON, combined with the others")
    export.add_argument("--no-header", action="store_true", help="leave out the raw header")
    export.add_argument("--limit", type=int, default=0)
    from huntsman import operations

    operations.add_parsers(sub)
    return parser


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, override=args.override)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"huntsman: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if command == "validate-config":
        print(json.dumps(config.redacted(), indent=2))
        print("configuration OK", file=sys.stderr)
        return EXIT_OK
    if command == "run":
        return _run_command(config)
    # Command-line tools log warnings only, to stderr-friendly console output.
    configure_logging("WARNING", "console" if sys.stderr.isatty() else config.logging.format)
    from huntsman import commands, operations

    handlers = {
        "ingest": commands.ingest,
        "status": commands.status,
        "check": commands.check,
        "export": commands.export,
        "calib": commands.calib,
        "qc": commands.qc,
        "build-index": commands.build_index,
        "report": operations.report,
        "reprocess": operations.reprocess,
    }
    return _run(handlers[command](config, args))


def _run_command(config: Config) -> int:
    # The locks first, before the heavy imports: a refused second run answers at once, and
    # a command-line tool started while we start waits for our embedded server.
    from huntsman.lock import EMBEDDED_LOCK, SERVICE_LOCK, LockHeld, PidLock

    lock = PidLock(config.paths.var_dir / SERVICE_LOCK)
    storage_lock = PidLock(config.database.embedded.storage_dir / EMBEDDED_LOCK)
    try:
        lock.acquire()
    except LockHeld as exc:
        who = f"pid {exc.pid}" if exc.pid else "another process"
        print(
            f"huntsman: a service is already running on {config.paths.var_dir} ({who}); "
            "not starting a second one",
            file=sys.stderr,
        )
        return EXIT_ALREADY_RUNNING
    try:
        if config.database.uri == "embedded":
            try:  # a command-line tool may own it for a moment
                storage_lock.acquire(config.database.embedded.start_timeout_s)
            except LockHeld as exc:
                print(
                    f"huntsman: the embedded database on {config.database.embedded.storage_dir} "
                    f"is in use by pid {exc.pid or '?'}",
                    file=sys.stderr,
                )
                return EXIT_FAILURE
        return _run_locked(config, lock, storage_lock if storage_lock.held else None)
    finally:
        storage_lock.release()
        lock.release()


def _run_locked(config: Config, lock: Any, storage_lock: Any) -> int:
    from pymongo.errors import PyMongoError

    from huntsman.app import run_service
    from huntsman.store.database import short_error
    from huntsman.store.embedded import EmbeddedServerError

    configure_logging(config.logging.level, config.logging.format)
    try:
        return _run(run_service(config, lock=lock, storage_lock=storage_lock))
    except KeyboardInterrupt:
        return EXIT_OK
    except EmbeddedServerError as exc:
        print(f"huntsman: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except PyMongoError as exc:  # unreachable at start-up: one line, supervisord retries
        print(f"huntsman: database unreachable: {short_error(exc)}", file=sys.stderr)
        return EXIT_FAILURE


def json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)
