"""Small value helpers shared by every layer: finite numbers or None, dotted-path look-ups."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["finite_or_none", "get_path"]


def finite_or_none(value: Any) -> float | None:
    """A plain ``float`` for a finite real number (numpy scalars included), else ``None``.

    ``None``, NaN, ±inf, booleans and anything that is not a real number (text, arrays) give
    ``None``: the measurement is missing rather than a value that breaks BSON, JSON or a sort.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def get_path(doc: Mapping[str, Any], dotted: str) -> Any:
    """``doc["a"]["b"]`` for ``"a.b"``, ``None`` when any level is missing or not a mapping."""
    value: Any = doc
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value
