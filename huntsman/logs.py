"""structlog set-up, once per process (the main process and every pool worker)."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

from huntsman.config import redact_data

__all__ = ["configure_logging", "get_logger"]

LogFormat = Literal["auto", "json", "console"]


def configure_logging(level: str = "INFO", fmt: LogFormat = "auto", process: str = "main") -> None:
    """JSON lines on stdout (a readable console renderer when stdout is a terminal)."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True)
        if use_console
        else structlog.processors.JSONRenderer()
    )
    numeric = logging.getLevelNamesMapping()[level]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_process(process),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.UnicodeDecoder(),
            _redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Libraries that use stdlib logging (pymongo, astropy) go to stderr at WARNING and above.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)


def _redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> dict[str, Any]:
    """Every URI in a log line (values, error texts, tracebacks) with its secrets hidden, and
    the value of every key named like a password, token, secret or credential."""
    redacted: dict[str, Any] = redact_data(event)
    return redacted


def _add_process(name: str) -> Any:
    def processor(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("process", name)
        return event

    return processor


def get_logger(**context: Any) -> Any:
    """A bound structlog logger."""
    return structlog.get_logger().bind(**context)
