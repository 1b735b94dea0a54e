"""The masters repository: the ``calibs`` and ``calib_status`` collections.

``calibs`` holds one document per master frame; ``calib_status`` one record per calibration
group and date: what was built, or why nothing was.

A *unit* is what one status record describes: ``(calib_type, camera, physical_filter, date)``
with ``physical_filter`` ``None`` for bias and dark.  A unit normally has one current master;
darks at clearly different CCD temperatures give several.  Field reference: docs/calibs.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection

from huntsman.models import ObservationType, utcnow
from huntsman.store.encoding import bson_safe

__all__ = ["CALIB_TYPES", "CalibCollection", "CalibDocument", "Unit", "calib_date_of", "days_between"]

CALIB_TYPES: tuple[ObservationType, ...] = (
    ObservationType.BIAS, ObservationType.DARK, ObservationType.FLAT,
)
DEFAULT_MAX_AGE_DAYS = 14.0

CalibDocument = dict[str, Any]


@dataclasses.dataclass(frozen=True, order=True)
class Unit:
    """One calibration group and date: the key of a status record."""

    calib_type: str
    camera: str
    physical_filter: str | None
    date: str  # calibration date, YYYY-MM-DD (UTC day)

    @property
    def key(self) -> str:
        return f"{self.calib_type}/{self.camera}/{self.physical_filter or '-'}/{self.date}"

    def query(self) -> dict[str, Any]:
        return {
            "calib_type": self.calib_type,
            "camera": self.camera,
            "physical_filter": self.physical_filter,
            "date": self.date,
        }


def calib_date_of(value: dt.datetime | dt.date | str) -> dt.date:
    """The calibration date (UTC day) of a datetime, date or ``YYYY-MM-DD`` string."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: times are aware UTC")
        return value.astimezone(dt.UTC).date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(value[:10])


def days_between(a: dt.date | str, b: dt.date | str) -> int:
    """``b - a`` in whole days."""
    return (calib_date_of(b) - calib_date_of(a)).days


def _shift(date: dt.date, days: float) -> str:
    return (date + dt.timedelta(days=int(days))).isoformat()


def _choice_key(
    doc: Mapping[str, Any], date: dt.date, ccd_temp: float | None
) -> tuple[int, int, float, int, str]:
    """Sort key of candidate masters: nearest date, then the earlier one (a master made before
    the observation), then the closest CCD temperature, then more frames, then the filename."""
    delta = days_between(date, doc["date"])
    temp = doc.get("ccd_temp")
    temp_gap = abs(temp - ccd_temp) if ccd_temp is not None and temp is not None else 0.0
    return (abs(delta), 1 if delta > 0 else 0, temp_gap, -int(doc.get("n_frames") or 0), doc["filename"])


class CalibCollection:
    """Repository of master calibrations and of the per-unit build status."""

    def __init__(
        self,
        collection: AsyncCollection[dict[str, Any]],
        status: AsyncCollection[dict[str, Any]] | None = None,
        *,
        max_age_days: float = DEFAULT_MAX_AGE_DAYS,
    ) -> None:
        self.collection = collection
        self.status = status if status is not None else collection.database["calib_status"]
        # The composition root sets this from calib.max_age_days.
        self.max_age_days = max_age_days

    async def ensure_indexes(self) -> None:
        await self.collection.create_indexes(
            [
                IndexModel([("filename", ASCENDING)], unique=True, name="filename_unique"),
                IndexModel(
                    [("calib_type", ASCENDING), ("camera", ASCENDING), ("physical_filter", ASCENDING),
                     ("superseded", ASCENDING), ("date", ASCENDING)],
                    name="match",
                ),
                IndexModel([("date", DESCENDING)], name="date_desc"),
            ]
        )
        await self.status.create_indexes(
            [
                IndexModel([("date", DESCENDING)], name="date_desc"),
                IndexModel([("state", ASCENDING)], name="state"),
            ]
        )

    # -- masters ----------------------------------------------------------------------------
    async def get(self, filename: str) -> CalibDocument | None:
        return await self.collection.find_one({"filename": filename}, {"_id": 0})

    async def insert(self, doc: Mapping[str, Any]) -> None:
        await self.collection.insert_one(bson_safe(dict(doc)))

    async def find(
        self, query: Mapping[str, Any] | None = None, *, sort: list[tuple[str, int]] | None = None
    ) -> AsyncIterator[CalibDocument]:
        cursor = self.collection.find(dict(query or {}), {"_id": 0})
        if sort:
            cursor = cursor.sort(sort)
        async for doc in cursor:
            yield doc

    async def count(self, query: Mapping[str, Any] | None = None) -> int:
        return await self.collection.count_documents(dict(query or {}))

    async def current(self, unit: Unit) -> list[CalibDocument]:
        """The masters of a unit that are not superseded."""
        return [d async for d in self.find({**unit.query(), "superseded": False}, sort=[("version", 1)])]

    async def versions(self, unit: Unit) -> int:
        """How many masters (superseded or not) the unit ever had."""
        return await self.count(unit.query())

    async def supersede(self, filenames: Iterable[str], by: list[str]) -> int:
        """Mark masters superseded by the masters ``by``; returns how many changed."""
        names = list(filenames)
        if not names:
            return 0
        result = await self.collection.update_many(
            {"filename": {"$in": names}, "superseded": False},
            {"$set": {"superseded": True, "superseded_by": by, "date_superseded": utcnow()}},
        )
        return int(result.modified_count)

    async def match_one(
        self,
        calib_type: str,
        camera: str,
        date: dt.datetime | dt.date | str,
        physical_filter: str | None = None,
        *,
        ccd_temp: float | None = None,
        max_age_days: float | None = None,
    ) -> CalibDocument | None:
        """The non-superseded master of a type nearest in time to ``date`` within the max age.

        Ties are broken deterministically: the earlier date, then the closest CCD temperature
        (when ``ccd_temp`` is given), then more frames, then the filename.
        """
        age = self.max_age_days if max_age_days is None else max_age_days
        day = calib_date_of(date)
        query: dict[str, Any] = {
            "calib_type": calib_type,
            "camera": camera,
            "superseded": False,
            "date": {"$gte": _shift(day, -age), "$lte": _shift(day, age)},
        }
        if calib_type == ObservationType.FLAT:
            if physical_filter is None:
                return None
            query["physical_filter"] = physical_filter
        candidates = [d async for d in self.find(query)]
        if not candidates:
            return None
        return min(candidates, key=lambda d: _choice_key(d, day, ccd_temp))

    async def match(
        self,
        camera: str,
        physical_filter: str | None,
        date_obs: dt.datetime | dt.date | str,
        *,
        ccd_temp: float | None = None,
        max_age_days: float | None = None,
    ) -> dict[str, CalibDocument] | None:
        """The complete calibration set of a science frame, or ``None`` if one is missing.

        Complete means a bias and a dark of the camera and a flat of the camera and filter,
        none superseded, each dated within ``max_age_days`` of the frame's calibration date
        (the UTC day of ``date_obs``); each is the nearest in time (see :meth:`match_one`).
        Returns ``{"bias": doc, "dark": doc, "flat": doc}``.
        """
        chosen: dict[str, CalibDocument] = {}
        for calib_type in CALIB_TYPES:
            doc = await self.match_one(
                calib_type, camera, date_obs, physical_filter,
                ccd_temp=ccd_temp if calib_type == ObservationType.DARK else None, max_age_days=max_age_days,
            )
            if doc is None:
                return None
            chosen[calib_type] = doc
        return chosen

    # -- status records ------------------------------------------------------------------------
    async def set_status(self, unit: Unit, fields: Mapping[str, Any]) -> None:
        """Create or update the status record of a unit."""
        await self.status.update_one(
            {"_id": unit.key},
            {"$set": bson_safe({**unit.query(), **fields, "updated": utcnow()})},
            upsert=True,
        )

    async def get_status(self, unit: Unit) -> dict[str, Any] | None:
        return await self.status.find_one({"_id": unit.key})

    async def find_status(
        self, query: Mapping[str, Any] | None = None, *, limit: int = 0
    ) -> AsyncIterator[dict[str, Any]]:
        cursor = self.status.find(dict(query or {})).sort(
            [("date", -1), ("calib_type", 1), ("camera", 1), ("physical_filter", 1)]
        )
        if limit:
            cursor = cursor.limit(limit)
        async for doc in cursor:
            yield doc
