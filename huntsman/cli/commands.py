"""The table of commands: each command's name, handler, help and arguments, and its parser."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

from huntsman import __version__
from huntsman.cli import processing, reprocess, service, views
from huntsman.cli.exits import EXIT_CONFIG
from huntsman.cli.selection import CALIB_TYPES, STAGE_STATUSES, STAGES, add_selection
from huntsman.config import Config
from huntsman.models import IngestStatus, QCStatus

__all__ = ["COMMANDS", "Command", "Service", "Tool", "parser"]

Arguments = Callable[[argparse.ArgumentParser], None]


def _none(parser: argparse.ArgumentParser) -> None:
    """No arguments."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Command:
    name: str
    help: str
    arguments: Arguments = _none


@dataclasses.dataclass(frozen=True, kw_only=True)
class Service(Command):
    """Runs on the command's own configuration, as it is (``run``, ``validate-config``)."""

    handler: Callable[[Config, argparse.Namespace], int]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tool(Command):
    """A command-line tool: the running service's configuration by default, on uvloop.

    ``changes_data``: refused with a configuration that differs from the service's in data
    settings, unless ``--force`` (or ``--dry-run``).
    """

    handler: Callable[[Config, argparse.Namespace], Coroutine[Any, Any, int]]
    changes_data: bool = False


# -- arguments ---------------------------------------------------------------------------------

def _ingest(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument(
        "--outside-root", action="store_true",
        help="accept files outside paths.raw_dir (ingested in place, never written to)",
    )
    p.add_argument("--force", action="store_true", help="gone: re-ingesting is `reprocess ingest`")


def _calib(p: argparse.ArgumentParser) -> None:
    add_selection(p, "night", "camera", "observation_type", types=CALIB_TYPES, night_aliases=["--date"])
    p.add_argument(
        "--force", action="store_true",
        help="rebuild even masters that are up to date, i.e. `reprocess calib` (and accept a "
        "configuration that differs from the running service's)",
    )


def _qc(p: argparse.ArgumentParser) -> None:
    add_selection(p, "night", "camera", "physical_filter", "status", "pattern", statuses=tuple(QCStatus))
    p.add_argument(
        "--reprocess", action="store_true",
        help="measure again even frames that are done, i.e. `reprocess qc`",
    )
    p.add_argument(
        "--force", action="store_true",
        help="run even with a configuration that differs from the running service's (with "
        "--reprocess: as `reprocess qc --force`)",
    )


def _build_index(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refcat", type=Path, required=True, help="catalogue CSV (SkyMapper columns)")
    p.add_argument("--out", type=Path, help="output directory (default paths.astrometry_dir)")
    p.add_argument("--ra-col", default="raj2000")
    p.add_argument("--dec-col", default="dej2000")
    p.add_argument("--mag-col", default="g_psf")


def _export(p: argparse.ArgumentParser) -> None:
    add_selection(
        p, "observation_type", "camera", "physical_filter", "status", "night", "pattern",
        statuses=tuple(IngestStatus), help_={"status": "ingest status (repeatable)"},
    )
    p.add_argument(
        "--query",
        help="a MongoDB filter as Extended JSON (e.g. {\"date_obs\": {\"$gt\": {\"$date\": "
        "\"2021-01-07T00:00:00Z\"}}}), combined with the others",
    )
    p.add_argument("--no-header", action="store_true", help="leave out the raw header")
    p.add_argument("--limit", type=int, default=0, help="at most this many (0: all)")


def _report(p: argparse.ArgumentParser) -> None:
    add_selection(
        p, "night", help_={"night": "YYYY-MM-DD, the UTC day of the night (default: today, UTC; repeatable)"}
    )
    p.add_argument("--out", type=Path, help="output directory (default <reports_dir>/<night>)")


def _reprocess(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=STAGES)
    add_selection(
        p, "night", "camera", "physical_filter", "observation_type", "status", "pattern",
        statuses=sorted({s for values in STAGE_STATUSES.values() for s in values}),
        help_={"status": "the stage's own status: ingest.status (ingest, calib), wcs.status "
                         "(solve), qc.status (qc); repeatable"},
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be done, change nothing")
    p.add_argument(
        "--force", action="store_true",
        help="replace measured values even with empty ones (e.g. zeropoints without a catalogue; "
        "the old values stay in history), and accept a configuration that differs from the "
        "running service's",
    )


# -- the table ---------------------------------------------------------------------------------

COMMANDS: tuple[Service | Tool, ...] = (
    Service(
        name="run", handler=service.run,
        help="run the service (the default); SIGTERM, SIGINT and SIGHUP shut it down cleanly",
    ),
    Service(name="validate-config", handler=service.validate_config,
            help="validate the configuration and print it"),
    Tool(name="ingest", handler=processing.ingest, arguments=_ingest,
         help="ingest files or directories (back-fill)"),
    Tool(name="status", handler=views.status,
         help="counts, quarantined files and whether a service runs"),
    Tool(name="check", handler=views.check,
         help="exit 0 only if a running service's heartbeat is fresh"),
    Tool(name="calib", handler=processing.calib, arguments=_calib, changes_data=True,
         help="build missing or out-of-date master calibrations now"),
    Tool(name="qc", handler=processing.qc, arguments=_qc, changes_data=True,
         help="calibrate and measure science frames now (same code as the service)"),
    Tool(name="build-index", handler=processing.build_index, arguments=_build_index,
         help="build an astrometry.net index from a local reference catalogue"),
    Tool(name="export", handler=views.export, arguments=_export,
         help="print exposure documents as JSON lines"),
    Tool(name="report", handler=views.report, arguments=_report,
         help="write the night report (HTML page with PNG plots)"),
    Tool(name="reprocess", handler=reprocess.reprocess, arguments=_reprocess, changes_data=True,
         help="re-run a stage for a selection of exposures"),
)
BY_NAME = {command.name: command for command in COMMANDS}


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line: ``huntsman calib: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    """``huntsman [--config FILE] [--override FILE] COMMAND ...``, from the table."""
    top = _Parser(
        prog="huntsman",
        description="Data-reduction service of the Huntsman Telescope. Command-line tools use "
        "the running service's configuration (<var_dir>/service-config.json) unless --config "
        "or --override is given.",
    )
    top.add_argument("--version", action="version", version=f"huntsman {__version__}")
    top.add_argument("--config", type=Path, help="config file (default etc/huntsman.yaml)")
    top.add_argument("--override", type=Path, help="local override file layered on top")
    sub = top.add_subparsers(dest="command")
    for command in COMMANDS:
        command.arguments(sub.add_parser(command.name, help=command.help))
    return top
