"""Command line: ``python -m huntsman [run|ingest|status|check|export|report|reprocess|...]``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import re
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from huntsman import __version__
from huntsman.config import Config, ConfigError, load_config, redact_text, redact_uri
from huntsman.logs import configure_logging

__all__ = ["EXIT_DATABASE", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2  # also bad arguments (argparse)
EXIT_ALREADY_RUNNING = 3  # ``run``: another service holds this var directory
EXIT_DATABASE = 4  # the database is unreachable or refused the command
EXIT_INTERRUPTED = 130

OBSERVATION_TYPES = ("bias", "dark", "flat", "science")
INGEST_STATUSES = ("ok", "failed", "quarantined")
# Commands that change data: a conflicting configuration is refused unless --force.
GUARDED_COMMANDS = {"reprocess", "qc", "calib"}


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line: ``huntsman calib: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def iso_date(text: str) -> str:
    """argparse type: a calendar date written ``YYYY-MM-DD`` (returned as that text)."""
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError(text)
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD (e.g. 2021-01-07)") from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="huntsman",
        description="Data-reduction service of the Huntsman Telescope. Command-line tools use "
        "the running service's configuration (<var_dir>/service-config.json) unless --config "
        "or --override is given.",
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
    ingest.add_argument(
        "--outside-root", action="store_true",
        help="accept files outside paths.raw_dir (ingested in place, never written to)",
    )
    sub.add_parser("status", help="counts, quarantined files and whether a service runs")
    sub.add_parser("check", help="exit 0 only if a running service's heartbeat is fresh")
    calib = sub.add_parser("calib", help="build missing or out-of-date master calibrations now")
    calib.add_argument(
        "--date", action="append", type=iso_date, help="calibration date YYYY-MM-DD (repeatable)"
    )
    calib.add_argument("--camera", action="append", help="CAM-ID (repeatable)")
    calib.add_argument("--type", dest="calib_type", action="append", choices=["bias", "dark", "flat"])
    calib.add_argument(
        "--force", action="store_true",
        help="rebuild even masters that are up to date (and accept a configuration that differs "
        "from the running service's)",
    )
    qc = sub.add_parser("qc", help="calibrate and measure science frames now (same code as the service)")
    qc.add_argument("--reprocess", action="store_true", help="measure again even frames that are done")
    qc.add_argument(
        "--night", action="append", type=iso_date, help="calibration date YYYY-MM-DD (repeatable)"
    )
    qc.add_argument("--camera", action="append", help="CAM-ID (repeatable)")
    qc.add_argument("--filter", dest="physical_filter", action="append", help="filter (repeatable)")
    qc.add_argument("--pattern", help="shell pattern matched against the raw filename")
    qc.add_argument(
        "--force", action="store_true",
        help="run even with a configuration that differs from the running service's",
    )
    index = sub.add_parser(
        "build-index", help="build an astrometry.net index from a local reference catalogue"
    )
    index.add_argument("--refcat", type=Path, required=True, help="catalogue CSV (SkyMapper columns)")
    index.add_argument("--out", type=Path, help="output directory (default paths.astrometry_dir)")
    index.add_argument("--ra-col", default="raj2000")
    index.add_argument("--dec-col", default="dej2000")
    index.add_argument("--mag-col", default="g_psf")
    export = sub.add_parser("export", help="print exposure documents as JSON lines")
    export.add_argument("--type", dest="observation_type", choices=OBSERVATION_TYPES)
    export.add_argument("--camera")
    export.add_argument("--filter", dest="physical_filter")
    export.add_argument("--status", choices=INGEST_STATUSES, help="ingest status")
    export.add_argument("--night", type=iso_date, help="calibration date YYYY-MM-DD (UTC day)")
    export.add_argument(
        "--query",
        help="a MongoDB filter as Extended JSON (e.g. {\"date_obs\": {\"$gt\": {\"$date\": "
        "\"2021-01-07T00:00:00Z\"}}}), combined with the others",
    )
    export.add_argument("--no-header", action="store_true", help="leave out the raw header")
    export.add_argument("--limit", type=int, default=0, help="at most this many (0: all)")
    from huntsman import operations

    operations.add_parsers(sub)
    return parser


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, override=args.override)


@dataclasses.dataclass(frozen=True)
class ChosenConfig:
    """The configuration a command uses, and the line that says so (``None``: nothing to say)."""

    config: Config
    note: str | None = None
    conflicts: tuple[str, ...] = ()


def _own_source(args: argparse.Namespace) -> str:
    from huntsman.config import default_config_path

    base = args.config or os.environ.get("HUNTSMAN_CONFIG") or default_config_path()
    text = str(base) if base else "the built-in defaults"
    return f"{text} + {args.override}" if args.override else text


def _listed(keys: Sequence[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def choose_config(args: argparse.Namespace, own: Config) -> ChosenConfig:
    """The running service's configuration by default; the command's own when it gives one.

    Explicit means ``--config``, ``--override`` or ``HUNTSMAN_CONFIG``.  Without one, and when
    the var directory has a ``service-config.json``, the service's configuration is used and
    any data setting in which this command's environment differs is named as ignored.
    """
    from huntsman.service_config import config_differences, read_service_config

    service = read_service_config(own)
    if service is None:
        return ChosenConfig(own)
    differences = tuple(config_differences(own, service.data))
    explicit = args.config is not None or args.override is not None or bool(
        os.environ.get("HUNTSMAN_CONFIG")
    )
    if explicit:
        if not differences:
            return ChosenConfig(own, f"huntsman: using {_own_source(args)} (same as the service's: "
                                     f"{service.describe()})")
        return ChosenConfig(
            own,
            f"huntsman: warning: using {_own_source(args)}, which differs from the service's "
            f"configuration ({service.describe()}) in {_listed(differences)}",
            differences,
        )
    config = service.to_config(own)
    note = f"huntsman: using the service's configuration ({service.describe()})"
    from huntsman.config import _env_overrides
    from huntsman.service_config import flatten

    from_env = set(flatten(_env_overrides(os.environ)))
    ignored = [k for k in differences if k in from_env and not k.startswith("database.uri")]
    if ignored:
        note += f"; ignoring this environment's {_listed(ignored)} (give --config to use them)"
    return ChosenConfig(config, note)


def database_error(exc: BaseException, *, any_store_error: bool = True) -> BaseException | None:
    """The database error inside ``exc`` (an exception group included), if any.

    PyMongo's errors and the embedded server's start-up error always count; with
    ``any_store_error`` (the command-line tools) so does any error raised by the store layer
    (e.g. the embedded server being started by a service right now).
    """
    from pymongo.errors import PyMongoError

    from huntsman.store.embedded import EmbeddedServerError

    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = database_error(inner, any_store_error=any_store_error)
            if found is not None:
                return found
        return None
    if isinstance(exc, PyMongoError | EmbeddedServerError):
        return exc
    if any_store_error and type(exc).__module__.startswith("huntsman.store"):
        return exc
    return None


def database_message(exc: BaseException, config: Config) -> str:
    """One line for the operator: what failed, where, and what to look at."""
    from pymongo.errors import ConnectionFailure

    from huntsman.store.database import short_error
    from huntsman.store.embedded import EmbeddedServerError

    text = redact_text(short_error(exc))
    where = (
        f"embedded database in {config.database.embedded.storage_dir}"
        if config.database.uri == "embedded"
        else redact_uri(config.database.uri)
    )
    unreachable = isinstance(exc, ConnectionFailure | EmbeddedServerError)
    what = "database unreachable" if unreachable else "database error"
    return f"huntsman: {what} ({where}): {text}"


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
    try:
        chosen = choose_config(args, config)
    except ConfigError as exc:
        print(f"huntsman: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    config = chosen.config
    if chosen.note is not None:
        print(chosen.note, file=sys.stderr)
    guarded = command in GUARDED_COMMANDS and not getattr(args, "dry_run", False)
    if chosen.conflicts and guarded and not args.force:
        print(
            f"huntsman: refusing to {command} with a configuration that differs from the "
            "service's in data settings; run without --config/--override to use the "
            "service's, or add --force",
            file=sys.stderr,
        )
        return EXIT_CONFIG
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
    try:
        return _run(handlers[command](config, args))
    except KeyboardInterrupt:
        print("huntsman: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if (db_exc := database_error(exc)) is None:
            raise
        print(database_message(db_exc, config), file=sys.stderr)
        return EXIT_DATABASE


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
    from huntsman.app import run_service

    configure_logging(config.logging.level, config.logging.format)
    try:
        return _run(run_service(config, lock=lock, storage_lock=storage_lock))
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        if (db_exc := database_error(exc, any_store_error=False)) is None:
            raise
        print(database_message(db_exc, config), file=sys.stderr)
        return EXIT_DATABASE


def json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)
