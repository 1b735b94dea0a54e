"""Provenance stamped into every FITS file the service writes.

Keywords (all in the primary header):

``HNTSVER``  software version;  ``CFGHASH``  :func:`config_hash` of the configuration used;
``NINPUTS``  number of input files;  ``INPUT001`` … ``INPUT999``  the input paths, one per card
(astropy writes values longer than 68 characters with ``CONTINUE`` cards, so full paths fit);
``M<NAME>`` (e.g. ``MBIAS``, ``MDARK``) the master calibrations used.  Numbered keywords are kept
to eight characters so the cards stay standard FITS (no HIERARCH); more than 999 inputs is an
error rather than a silently truncated record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from astropy.io import fits

__all__ = ["MAX_INPUTS", "Provenance", "config_hash", "provenance_cards", "stamp_header"]

MAX_INPUTS = 999

Card = tuple[str, str | int, str]


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Who made a product: the software version and the hash of the configuration used."""

    software_version: str
    config_hash: str


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "model_dump"):  # pydantic models
        return _jsonable(obj.model_dump(mode="json"))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = [_jsonable(v) for v in obj]
        return sorted(items, key=repr) if isinstance(obj, set | frozenset) else items
    if isinstance(obj, PurePath):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


def config_hash(obj: Any) -> str:
    """First 12 hex digits of the sha256 of ``obj`` as canonical JSON.

    Canonical means sorted keys, no whitespace, dataclasses/pydantic models as dicts, tuples as
    lists and paths as strings, so equal configurations hash equally across processes.
    """
    text = json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def provenance_cards(
    software_version: str,
    config_hash: str,
    inputs: Sequence[str],
    masters: Mapping[str, str] | None = None,
) -> list[Card]:
    """Header cards ``(keyword, value, comment)`` recording how a product was made.

    Raises
    ------
    ValueError
        More than :data:`MAX_INPUTS` inputs, or a master name that is not alphanumeric.
    """
    if len(inputs) > MAX_INPUTS:
        raise ValueError(f"{len(inputs)} inputs exceed the {MAX_INPUTS} provenance keywords")
    cards: list[Card] = [
        ("HNTSVER", software_version, "huntsman software version"),
        ("CFGHASH", config_hash, "sha256[:12] of the configuration"),
        ("NINPUTS", len(inputs), "number of input files"),
    ]
    cards += [(f"INPUT{i:03d}", str(p), "") for i, p in enumerate(inputs, start=1)]
    for name, path in sorted((masters or {}).items()):
        if not name.isalnum():
            raise ValueError(f"master name {name!r} must be alphanumeric")
        cards.append((f"M{name.upper()[:7]}", str(path), ""))
    return cards


def stamp_header(
    header: fits.Header,
    provenance: Provenance,
    inputs: Sequence[str],
    masters: Mapping[str, str] | None = None,
) -> fits.Header:
    """A copy of ``header`` with the provenance cards added (replacing any earlier ones)."""
    out = header.copy()
    for key in [k for k in out if k.startswith("INPUT") and k[5:].isdigit()]:
        del out[key]
    for key, value, comment in provenance_cards(
        provenance.software_version, provenance.config_hash, inputs, masters
    ):
        out[key] = (value, comment)
    return out
