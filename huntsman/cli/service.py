"""``run`` and ``validate-config``: the service itself, under its locks, on uvloop."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine
from typing import Any

from huntsman.cli.exits import (
    EXIT_ALREADY_RUNNING,
    EXIT_DATABASE,
    EXIT_FAILURE,
    EXIT_OK,
    database_error,
    database_message,
)
from huntsman.config import Config
from huntsman.logs import configure_logging

__all__ = ["run", "run_loop", "validate_config"]


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    """Run the root coroutine on uvloop (asyncio's own loop without it)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return asyncio.run(coro)
    return uvloop.run(coro)


def validate_config(config: Config, args: argparse.Namespace) -> int:
    print(json.dumps(config.redacted(), indent=2))
    print("configuration OK", file=sys.stderr)
    return EXIT_OK


def run(config: Config, args: argparse.Namespace) -> int:
    """The service, once per var directory."""
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
        return run_loop(run_service(config, lock=lock, storage_lock=storage_lock))
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        if (db_exc := database_error(exc, any_store_error=False)) is None:
            raise
        print(database_message(db_exc, config), file=sys.stderr)
        return EXIT_DATABASE
