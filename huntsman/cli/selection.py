"""Which exposures a command acts on: one ``Selection``, its command-line flags and its query.

``export``, ``qc``, ``calib``, ``reprocess`` and ``report`` take the same flags, each the subset
that means something to it: ``--night D --camera C --filter F --type T --status S --pattern
GLOB``, every one repeatable (several values of one flag: any of them; different flags: all of
them).  The night is the calibration date (``calib_date``, the UTC day of a Siding Spring
night); ``--status`` is the stage's own status (``ingest.status``, ``wcs.status`` or
``qc.status``); the glob matches the whole path or the file name.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import fnmatch
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from huntsman.models import IngestStatus, ObservationType, QCStatus, WcsStatus

__all__ = [
    "CALIB_TYPES",
    "STAGES",
    "STAGE_STATUSES",
    "STATUS_FIELD",
    "Selection",
    "add_selection",
    "iso_date",
]

STAGES = ("ingest", "solve", "calib", "qc")
CALIB_TYPES = (ObservationType.BIAS, ObservationType.DARK, ObservationType.FLAT)
# Each stage's own status field, its values, and the observation types it applies to (None: all).
STATUS_FIELD = {"ingest": "ingest.status", "solve": "wcs.status", "calib": "ingest.status", "qc": "qc.status"}
STAGE_STATUSES: dict[str, tuple[str, ...]] = {
    "ingest": tuple(IngestStatus),
    "calib": tuple(IngestStatus),
    "solve": tuple(WcsStatus),
    "qc": tuple(QCStatus),
}
STAGE_TYPES: dict[str, tuple[str, ...] | None] = {
    "ingest": None,
    "solve": (ObservationType.SCIENCE,),
    "calib": CALIB_TYPES,
    "qc": (ObservationType.SCIENCE,),
}
# Selection field -> (flag, document field); the flag is the one printed back.
FIELDS = {
    "night": ("--night", "calib_date"),
    "camera": ("--camera", "camera"),
    "physical_filter": ("--filter", "physical_filter"),
    "observation_type": ("--type", "observation_type"),
    "status": ("--status", None),  # the stage's own status field
    "pattern": ("--pattern", None),  # matched on the file name, not in the query
}
HELP = {
    "night": "calibration date YYYY-MM-DD (the UTC day of the night; repeatable)",
    "camera": "CAM-ID (repeatable)",
    "physical_filter": "filter (repeatable)",
    "observation_type": "observation type (repeatable)",
    "status": "the stage's own status (repeatable)",
    "pattern": "glob on the file path or name, e.g. '*/TESTCAM01/*.fits' (repeatable)",
}
METAVAR = {"night": "YYYY-MM-DD", "camera": "CAM-ID", "physical_filter": "FILTER", "pattern": "GLOB"}
TYPED = "selection_typed"  # the argparse attribute keeping the flags as the operator wrote them

Values = str | Iterable[str] | None


def iso_date(text: str) -> str:
    """argparse type: a calendar date written ``YYYY-MM-DD`` (returned as that text)."""
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ValueError(text)
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD (e.g. 2021-01-07)") from None


def _values(value: Values) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _equal_or_in(values: Sequence[str]) -> Any:
    return values[0] if len(values) == 1 else {"$in": list(values)}


@dataclasses.dataclass(frozen=True, init=False)
class Selection:
    """Which exposures: each field a tuple of accepted values, empty when it does not constrain."""

    night: tuple[str, ...]
    camera: tuple[str, ...]
    physical_filter: tuple[str, ...]
    observation_type: tuple[str, ...]
    status: tuple[str, ...]
    pattern: tuple[str, ...]
    typed: tuple[str, ...] = dataclasses.field(compare=False)

    def __init__(
        self,
        *,
        night: Values = None,
        camera: Values = None,
        physical_filter: Values = None,
        observation_type: Values = None,
        status: Values = None,
        pattern: Values = None,
        typed: Iterable[str] = (),
    ) -> None:
        """One value or several per field; ``typed``: the flags as written, for messages."""
        for name, value in (
            ("night", night), ("camera", camera), ("physical_filter", physical_filter),
            ("observation_type", observation_type), ("status", status), ("pattern", pattern),
        ):
            object.__setattr__(self, name, _values(value))
        object.__setattr__(self, "typed", tuple(typed))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Selection:
        """The selection flags :func:`add_selection` gave a command (absent ones: no constraint)."""
        return cls(**{name: getattr(args, name, None) for name in FIELDS}, typed=getattr(args, TYPED, ()))

    def query(self, stage: str | None = None) -> dict[str, Any]:
        """The MongoDB filter on ``exposures``; ``stage`` None: any exposure, ``--status`` is
        ``ingest.status``.  A stage other than ingest and calib selects ingested frames only,
        and only the observation types it applies to."""
        status_field = STATUS_FIELD[stage] if stage is not None else "ingest.status"
        query: dict[str, Any] = {}
        for field, values in (
            ("calib_date", self.night),
            ("camera", self.camera),
            ("physical_filter", self.physical_filter),
            (status_field, self.status),
        ):
            if values:
                query[field] = _equal_or_in(values)
        if stage is not None and status_field != "ingest.status":
            query["ingest.status"] = IngestStatus.OK.value  # only ingested frames are solved or measured
        allowed = STAGE_TYPES[stage] if stage is not None else None
        if self.observation_type:
            chosen = [t for t in self.observation_type if allowed is None or t in allowed]
            query["observation_type"] = chosen[0] if len(chosen) == 1 else {"$in": chosen}
        elif allowed is not None:
            query["observation_type"] = {"$in": [str(t) for t in allowed]}
        return query

    def matches(self, filename: str) -> bool:
        """A glob matches the whole path or the file name (no glob: everything matches)."""
        if not self.pattern:
            return True
        name = os.path.basename(filename)
        return any(
            fnmatch.fnmatchcase(filename, glob) or fnmatch.fnmatchcase(name, glob) for glob in self.pattern
        )

    def describe(self) -> str:
        """``--night 2021-01-07 --camera X``: the flags as written (or as they would be)."""
        if self.typed:
            return " ".join(self.typed)
        return " ".join(
            f"{FIELDS[name][0]} {value}" for name in FIELDS for value in getattr(self, name)
        )


class _Select(argparse.Action):
    """Append the value, and keep the flag as typed (``--date`` or ``--night``) for messages."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])
        setattr(namespace, TYPED, [*getattr(namespace, TYPED, ()), f"{option_string} {values}"])


def add_selection(
    parser: argparse.ArgumentParser,
    *names: str,
    types: Sequence[str] = tuple(ObservationType),
    statuses: Sequence[str] = (),
    night_aliases: Sequence[str] = (),
    help_: dict[str, str] | None = None,
) -> None:
    """Add the selection flags ``names`` (fields of :class:`Selection`) to a command's parser.

    ``types`` and ``statuses`` are the accepted values of ``--type`` and ``--status``;
    ``night_aliases`` are older spellings of ``--night`` still accepted (``calib --date``).
    """
    helps = {**HELP, **(help_ or {})}
    for name in names:
        flag, _ = FIELDS[name]
        options: dict[str, Any] = {"metavar": METAVAR[name]} if name in METAVAR else {}
        if name == "night":
            options["type"] = iso_date
        elif name == "observation_type":
            options["choices"] = [str(t) for t in types]
        elif name == "status":
            options["choices"] = [str(s) for s in statuses]
        flags = [flag, *(night_aliases if name == "night" else ())]
        parser.add_argument(*flags, dest=name, action=_Select, help=helps[name], **options)
    parser.set_defaults(**{TYPED: ()})
