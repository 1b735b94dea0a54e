"""Nothing but a plain record ever leaves a job: whatever it raises becomes text.

An exception raised in a worker travels back to the service by pickling, and some cannot
(astropy's ``CfitsioException`` for a corrupt tile of a ``.fits.fz`` file is one): the service
would then see a ``PicklingError`` in place of the reason.  :func:`call_guarded` runs in the
worker around every job and returns :class:`JobRaised` instead, which always pickles.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["JobRaised", "call_guarded", "describe_exception"]

_T = TypeVar("_T")
_MAX_REASON = 2000
_MAX_TRACEBACK = 8000


def describe_exception(exc: BaseException) -> str:
    """``"Type: message"`` on one line (the type alone when there is no message)."""
    name = type(exc).__name__
    try:
        text = " ".join(str(exc).split())
    except Exception:  # a broken __str__ must not hide the type
        text = ""
    reason = f"{name}: {text}" if text else name
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 1] + "…"


@dataclasses.dataclass(frozen=True, slots=True)
class JobRaised:
    """A job raised ``reason`` (type and message) in the worker; ``traceback`` for the log."""

    reason: str
    traceback: str


def call_guarded(fn: Callable[..., _T], *args: Any) -> _T | JobRaised:
    """``fn(*args)``, or a :class:`JobRaised` for anything it raises (``MemoryError`` included).

    ``BaseException`` is caught too: a job's ``SystemExit`` must not end the worker or, sent
    back, the service.
    """
    try:
        return fn(*args)
    except BaseException as exc:
        try:
            text = "".join(traceback.format_exception(exc))[-_MAX_TRACEBACK:]
        except Exception:  # formatting needs memory too; the reason alone is enough
            text = ""
        return JobRaised(describe_exception(exc), text)
