"""One log stream per process: structlog and stdlib logging rendered alike on one handler.

Our own lines (structlog) and the libraries' (pymongo, astropy, asyncio, ``warnings.warn``,
all stdlib logging) pass through the same processors and the same renderer on one handler of
the root logger, so every line on stdout is one JSON object with ``timestamp``, ``level``,
``event``, ``logger`` and ``process`` (a readable console renderer when stdout is a
terminal).  Configured once per process: the main process and every pool worker.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import MutableMapping
from typing import IO, Any, Literal, TypeAlias

import structlog
from structlog.typing import FilteringBoundLogger, Processor

from huntsman.config import redact_data

__all__ = ["LIBRARY_LEVEL", "Logger", "configure_logging", "get_logger"]

LogFormat = Literal["auto", "json", "console"]

# The type of every logger passed around: what ``wrapper_class`` below makes.
Logger: TypeAlias = FilteringBoundLogger

# Libraries speak at WARNING and above, whatever our own level: pymongo's DEBUG is one line
# per command (built only if its logger is enabled), astropy's INFO is not for the operator.
LIBRARY_LEVEL = logging.WARNING
# The stdlib logger our structlog lines go through (their ``logger`` key).
_OURS = "huntsman"


def configure_logging(
    level: str = "INFO",
    fmt: LogFormat = "auto",
    process: str = "main",
    stream: IO[str] | None = None,
) -> None:
    """Route structlog and stdlib logging to one handler writing to ``stream`` (stdout).

    Our lines are filtered at ``level``; the libraries' at ``level`` or :data:`LIBRARY_LEVEL`,
    whichever is higher.  Warnings (``warnings.warn``) become log lines of the logger
    ``py.warnings``.  Call it after astropy is imported where it is used: astropy installs
    its own handler (plain text on stderr) when imported, which this replaces.
    """
    out = sys.stdout if stream is None else stream
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=True)
        if use_console
        else structlog.processors.JSONRenderer()
    )
    numeric = logging.getLevelNamesMapping()[level]
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_process(process),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        structlog.processors.UnicodeDecoder(),
        _redact_secrets,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    handler.addFilter(_LibraryLevel(max(numeric, LIBRARY_LEVEL)))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(max(numeric, LIBRARY_LEVEL))
    logging.getLogger(_OURS).setLevel(numeric)
    _adopt_astropy()
    logging.captureWarnings(True)


class _LibraryLevel(logging.Filter):
    """Our records (already filtered by structlog) pass; a library's from ``level`` up, also
    from a logger that sets its own lower level (astropy's is INFO)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return hasattr(record, "_logger") or record.levelno >= self.level


def _adopt_astropy() -> None:
    """astropy's logger without its own handler and warnings hook: its records propagate to
    the root handler, its warnings reach ``py.warnings``.  astropy is imported here (every
    process of the service and every command uses it), so a later import cannot install its
    plain-text handler on stderr."""
    import astropy

    astropy_log = astropy.log
    if astropy_log.warnings_logging_enabled():
        # Refused (LoggingError) if someone replaced warnings.showwarning after astropy did:
        # then captureWarnings below still routes every warning to logging.
        with contextlib.suppress(Exception):
            astropy_log.disable_warnings_logging()
    for handler in astropy_log.handlers[:]:
        astropy_log.removeHandler(handler)
    astropy_log.propagate = True


def _redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> dict[str, Any]:
    """Every URI in a log line (values, error texts, tracebacks) with its secrets hidden, and
    the value of every key named like a password, token, secret or credential."""
    redacted: dict[str, Any] = redact_data(event)
    return redacted


def _add_process(name: str) -> Processor:
    def processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("process", name)
        return event

    return processor


def get_logger(**context: Any) -> Logger:
    """A bound structlog logger; its lines carry ``logger: huntsman`` (the libraries' their
    own names), the bound keys (``component``, ``command``) say which part speaks."""
    logger: Logger = structlog.get_logger(_OURS).bind(**context)
    return logger
