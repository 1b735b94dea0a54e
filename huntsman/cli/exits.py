"""What a command's outcome becomes: its exit code, and one line for a database error."""

from __future__ import annotations

from huntsman.config import Config, redact_text, redact_uri

__all__ = [
    "EXIT_ALREADY_RUNNING",
    "EXIT_CONFIG",
    "EXIT_DATABASE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "database_error",
    "database_message",
]

EXIT_OK = 0
EXIT_FAILURE = 1  # failures, or a selection that matched nothing
EXIT_CONFIG = 2  # also bad arguments (argparse)
EXIT_ALREADY_RUNNING = 3  # ``run``: another service holds this var directory
EXIT_DATABASE = 4  # the database is unreachable or refused the command
EXIT_INTERRUPTED = 130


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
