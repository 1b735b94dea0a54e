"""BSON hygiene: plain Python numbers, no NaN/inf, timezone-aware UTC datetimes."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["bson_safe"]


def bson_safe(value: Any) -> Any:
    """A copy of ``value`` that BSON accepts and that reads back the same.

    numpy scalars become Python numbers, NaN/inf become ``None``, naive datetimes are
    refused (every datetime in this service is aware UTC), tuples become lists, ``StrEnum``
    members (statuses, grades, observation types) become their plain strings.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)  # a StrEnum member as its value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} would be stored without a time zone")
        return value.astimezone(dt.UTC)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): bson_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [bson_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [bson_safe(v) for v in value.tolist()]
    return str(value)  # paths, and anything else BSON does not know
