"""Everything a night report shows, read from the database (async; the only I/O of a report).

A *night* is a calibration date (``calib_date``): one UTC day covers exactly one Siding Spring
night.  Fields written by other stages (``qc.*``, ``wcs.*``) are read defensively: a missing
value stays ``None`` and is shown as "—"; plots skip it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from huntsman.models import Grade, IngestStatus, ObservationType, QCStatus, utcnow
from huntsman.store.database import Database
from huntsman.values import finite_or_none, get_path

__all__ = [
    "UNKNOWN_RANK",
    "NightData",
    "badness",
    "gather_night",
    "grade_of",
    "grade_rank",
    "last_completed_night",
    "worst_frames",
]

_SCIENCE_PROJECTION = {
    "_id": 0,
    "filename": 1,
    "camera": 1,
    "physical_filter": 1,
    "date_obs": 1,
    "exposure_time": 1,
    "field": 1,
    "airmass": 1,
    "ingest": 1,
    "metrics.fwhm_arcsec": 1,
    "metrics.ellipticity": 1,
    "metrics.n_sources": 1,
    "metrics.background": 1,
    "wcs.status": 1,
    "wcs.error": 1,
    "qc": 1,
    "timing": 1,
}

# An absent or unrecognised grade sorts after every graded frame (the worst-frames table shows
# frames known to be bad first); a frame that could not be measured ranks between fair and bad.
UNKNOWN_RANK = -1.0
UNMEASURED_RANK = Grade.BAD.rank - 0.5


def grade_of(value: Any) -> Grade | None:
    """``qc.grade`` as a :class:`Grade`; ``None`` when absent or not one of the grades."""
    if not isinstance(value, str):
        return None
    try:
        return Grade(value)
    except ValueError:
        return None


def grade_rank(value: Any) -> float:
    """:attr:`Grade.rank` (0 best), :data:`UNKNOWN_RANK` for anything that is not a grade."""
    grade = grade_of(value)
    return float(grade.rank) if grade is not None else UNKNOWN_RANK


def last_completed_night(now: dt.datetime, hour_utc: int) -> str:
    """The latest night that is over at ``now``: UTC day D is over from D ``hour_utc``:00 UTC."""
    now = now.astimezone(dt.UTC)
    day = now.date() if now.hour >= hour_utc else now.date() - dt.timedelta(days=1)
    return day.isoformat()


@dataclasses.dataclass
class NightData:
    """What one night report shows (plain data: handed to the plotting thread as is)."""

    night: str
    generated: dt.datetime
    science: list[dict[str, Any]]
    counts: list[dict[str, Any]]  # {observation_type, ingest_status, qc_status, n}
    failures: list[dict[str, Any]]  # ingest failures of the night (any type)
    masters: list[dict[str, Any]]  # calibs whose date is the night
    calib_status: list[dict[str, Any]]  # calib_status records of the night
    worst_n: int = 10

    @property
    def n_exposures(self) -> int:
        return sum(int(row["n"]) for row in self.counts)

    @property
    def empty(self) -> bool:
        return self.n_exposures == 0 and not self.masters and not self.calib_status

    @property
    def cameras(self) -> list[str]:
        return sorted({str(d.get("camera")) for d in self.science if d.get("camera")})


def badness(doc: Mapping[str, Any]) -> tuple[float, ...]:
    """Sort key of how bad a science frame is (larger is worse).

    The grade first (:attr:`Grade.rank`, bad worst); a frame that could not be measured (ingest
    or QC failed) ranks between fair and bad: often clouds or trailing, but unknown.  Then the
    number of flags, then FWHM.
    """
    grade = grade_rank(get_path(doc, "qc.grade"))
    if get_path(doc, "ingest.status") != IngestStatus.OK or get_path(doc, "qc.status") == QCStatus.FAILED:
        grade = max(grade, UNMEASURED_RANK)
    flags = get_path(doc, "qc.flags")
    n_flags = len(flags) if isinstance(flags, list) else 0
    fwhm = finite_or_none(get_path(doc, "qc.fwhm_arcsec"))
    if fwhm is None:
        fwhm = finite_or_none(get_path(doc, "metrics.fwhm_arcsec")) or 0.0
    return (grade, float(n_flags), fwhm)


def worst_frames(science: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` worst science frames, worst first (ties: the later frame first)."""
    ordered = sorted(science, key=lambda d: (badness(d), str(d.get("filename"))), reverse=True)
    return ordered[:n]


async def gather_night(database: Database, night: str, *, worst_n: int = 10) -> NightData:
    """Read the night's documents (``calib_date == night``) and its calibration records."""
    dt.date.fromisoformat(night)  # a bad night string fails here, with a clear message
    exposures = database.exposures.collection
    science = [
        doc
        async for doc in exposures.find(
            {"calib_date": night, "observation_type": ObservationType.SCIENCE}, _SCIENCE_PROJECTION
        ).sort([("date_obs", 1), ("filename", 1)])
    ]
    cursor = await exposures.aggregate(
        [
            {"$match": {"calib_date": night}},
            {
                "$group": {
                    "_id": {
                        "observation_type": "$observation_type",
                        "ingest_status": "$ingest.status",
                        "qc_status": "$qc.status",
                    },
                    "n": {"$sum": 1},
                }
            },
        ]
    )
    counts = []
    async for row in cursor:
        key = row["_id"] or {}
        counts.append(
            {
                "observation_type": key.get("observation_type"),
                "ingest_status": key.get("ingest_status"),
                "qc_status": key.get("qc_status"),
                "n": int(row["n"]),
            }
        )
    counts.sort(key=lambda r: tuple(str(r[k]) for k in ("observation_type", "ingest_status", "qc_status")))
    failures = [
        doc
        async for doc in exposures.find(
            {"calib_date": night,
             "ingest.status": {"$in": [IngestStatus.FAILED, IngestStatus.QUARANTINED]}},
            {"_id": 0, "filename": 1, "observation_type": 1, "camera": 1, "ingest": 1},
        ).sort("filename", 1)
    ]
    masters = [
        doc
        async for doc in database.calibs.collection.find(
            {"date": night}, {"_id": 0, "raw_filenames": 0, "excluded": 0}
        ).sort([("calib_type", 1), ("camera", 1), ("physical_filter", 1), ("version", 1)])
    ]
    status = [
        doc async for doc in database.calibs.status.find({"date": night}, {"failed_inputs": 0}).sort("_id", 1)
    ]
    return NightData(
        night=night,
        generated=utcnow(),
        science=science,
        counts=counts,
        failures=failures,
        masters=masters,
        calib_status=status,
        worst_n=worst_n,
    )
