"""The ``exposures`` collection: one document per raw file."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection

from huntsman.models import IngestResult, IngestStatus, utcnow
from huntsman.store.encoding import bson_safe

__all__ = ["ExposureCollection", "ExposureDocument", "FileState"]


@dataclasses.dataclass(frozen=True)
class FileState:
    """What the database knows of a file, enough to decide whether to (re)ingest it."""

    filename: str
    status: str | None
    tries: int
    file_size: int | None
    file_mtime_ns: int | None
    wcs_marker: str | None = None

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> FileState:
        ingest = doc.get("ingest") or {}
        wcs = doc.get("wcs") or {}
        return cls(
            filename=doc["filename"],
            status=ingest.get("status"),
            tries=int(ingest.get("tries") or 0),
            file_size=doc.get("file", {}).get("size"),
            file_mtime_ns=doc.get("file", {}).get("mtime_ns"),
            wcs_marker=wcs.get("marker"),
        )


# The document is a plain dict in the database; this alias names it where it is handled.
ExposureDocument = dict[str, Any]

_STATE_PROJECTION = {
    "filename": 1,
    "ingest.status": 1,
    "ingest.tries": 1,
    "file": 1,
    "wcs.marker": 1,
}


class ExposureCollection:
    """Repository of exposure documents; every write is an idempotent upsert by filename."""

    def __init__(self, collection: AsyncCollection[dict[str, Any]]) -> None:
        self.collection = collection

    async def ensure_indexes(self) -> None:
        await self.collection.create_indexes(
            [
                IndexModel([("filename", ASCENDING)], unique=True, name="filename_unique"),
                IndexModel([("ingest.status", ASCENDING)], name="ingest_status"),
                IndexModel(
                    [("observation_type", ASCENDING), ("camera", ASCENDING), ("date_obs", ASCENDING)],
                    name="type_camera_date",
                ),
                IndexModel([("calib_date", ASCENDING)], name="calib_date"),
                IndexModel([("qc.status", ASCENDING)], name="qc_status"),
                IndexModel([("qc.calibs.bias", ASCENDING)], name="qc_calibs_bias", sparse=True),
                IndexModel([("qc.calibs.dark", ASCENDING)], name="qc_calibs_dark", sparse=True),
                IndexModel([("qc.calibs.flat", ASCENDING)], name="qc_calibs_flat", sparse=True),
                IndexModel([("wcs.status", ASCENDING)], name="wcs_status"),
                IndexModel([("date_obs", DESCENDING)], name="date_obs_desc"),
            ]
        )

    async def get(self, filename: str) -> ExposureDocument | None:
        return await self.collection.find_one({"filename": filename}, {"_id": 0})

    async def state(self, filename: str) -> FileState | None:
        doc = await self.collection.find_one({"filename": filename}, _STATE_PROJECTION)
        return FileState.from_doc(doc) if doc is not None else None

    async def iter_states(self) -> AsyncIterator[FileState]:
        """Every file's state, streamed (used by the reconciliation scan)."""
        cursor = self.collection.find({}, _STATE_PROJECTION, batch_size=5000)
        async for doc in cursor:
            yield FileState.from_doc(doc)

    async def record_ingest(
        self,
        result: IngestResult,
        *,
        seen_at: dt.datetime,
        previous: FileState | None,
        max_tries: int,
        same_content: bool,
    ) -> str:
        """Write the outcome of one ingestion in a single atomic upsert; returns the status.

        ``tries`` counts attempts on the same content; a changed file starts again from one.
        A failure on the ``max_tries``-th attempt quarantines the file.
        """
        tries = (previous.tries if previous is not None and same_content else 0) + 1
        if result.ok:
            status = IngestStatus.OK
        elif tries >= max_tries:
            status = IngestStatus.QUARANTINED
        else:
            status = IngestStatus.FAILED
        now = utcnow()
        fields = dict(result.fields)
        shutter_close = fields.pop("shutter_close", None)
        update: dict[str, Any] = {
            **fields,
            "header": result.header,
            "metrics": result.metrics,
            "file": {"size": result.file_size, "mtime_ns": result.file_mtime_ns},
            "ingest": {
                "status": str(status),
                "error": result.error,
                "warnings": list(result.warnings),
                "tries": tries,
                "duration_s": result.duration_s,
            },
            "timing.shutter_close": shutter_close,
            "timing.file_seen": seen_at,
            "timing.ingested": now,
            "date_modified": now,
        }
        await self.collection.update_one(
            {"filename": result.filename},
            {
                "$set": bson_safe(update),
                "$setOnInsert": {"date_created": now},
            },
            upsert=True,
        )
        return str(status)

    async def set_fields(self, filename: str, fields: Mapping[str, Any]) -> None:
        """Set (dotted) fields of an existing document."""
        update = {**fields, "date_modified": utcnow()}
        await self.collection.update_one({"filename": filename}, {"$set": bson_safe(update)})

    async def find(
        self, query: Mapping[str, Any], *, limit: int = 0, projection: Mapping[str, Any] | None = None
    ) -> AsyncIterator[ExposureDocument]:
        cursor = self.collection.find(dict(query), projection or {"_id": 0})
        if limit:
            cursor = cursor.limit(limit)
        async for doc in cursor:
            yield doc

    async def count(self, query: Mapping[str, Any] | None = None) -> int:
        return await self.collection.count_documents(dict(query or {}))

    async def counts_by(self, *keys: str) -> list[dict[str, Any]]:
        """Document counts grouped by the given (dotted) fields."""
        group_id = {k.replace(".", "_"): f"${k}" for k in keys}
        cursor = await self.collection.aggregate(
            [{"$group": {"_id": group_id, "n": {"$sum": 1}}}, {"$sort": {"_id": 1}}]
        )
        rows = []
        async for row in cursor:
            rows.append({**row["_id"], "n": row["n"]})
        return rows
