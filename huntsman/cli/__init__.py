"""Command line: ``python -m huntsman [run|ingest|status|check|export|report|reprocess|...]``.

:func:`main` parses the arguments (the table of commands is :mod:`huntsman.cli.commands`),
loads the configuration once, chooses the service's or the command's own, and returns the
command's exit code (:mod:`huntsman.cli.exits`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from huntsman.cli.configuration import ChosenConfig, choose_config
from huntsman.cli.exits import (
    EXIT_ALREADY_RUNNING,
    EXIT_CONFIG,
    EXIT_DATABASE,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    database_error,
    database_message,
)
from huntsman.config import ConfigError, load_config
from huntsman.logs import configure_logging

__all__ = [
    "EXIT_ALREADY_RUNNING",
    "EXIT_CONFIG",
    "EXIT_DATABASE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "ChosenConfig",
    "choose_config",
    "database_error",
    "database_message",
    "main",
    "parse_args",
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, parsed by the table's parser (exit 2 with one line if it is wrong)."""
    from huntsman.cli.commands import parser

    return parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from huntsman.cli.commands import BY_NAME, Service
    from huntsman.cli.service import run_loop

    args = parse_args(argv)
    command = BY_NAME[args.command or "run"]
    if command.name == "run":
        # The service's whole output is one JSON log stream: a deprecated key's warning, given
        # while the configuration is read, is already a log line (re-configured once read).
        configure_logging("WARNING")
    try:
        config = load_config(args.config, override=args.override)
    except ConfigError as exc:
        print(f"huntsman: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(command, Service):
        return command.handler(config, args)
    try:
        chosen = choose_config(args, config)
    except ConfigError as exc:
        print(f"huntsman: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    config = chosen.config
    if chosen.note is not None:
        print(chosen.note, file=sys.stderr)
    guarded = command.changes_data and not getattr(args, "dry_run", False)
    if chosen.conflicts and guarded and not args.force:
        print(
            f"huntsman: refusing to {command.name} with a configuration that differs from the "
            "service's in data settings; run without --config/--override to use the "
            "service's, or add --force",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    # Command-line tools log warnings only, to stderr-friendly console output.
    configure_logging("WARNING", "console" if sys.stderr.isatty() else config.logging.format)
    try:
        return run_loop(command.handler(config, args))
    except KeyboardInterrupt:
        print("huntsman: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if (db_exc := database_error(exc)) is None:
            raise
        print(database_message(db_exc, config), file=sys.stderr)
        return EXIT_DATABASE
