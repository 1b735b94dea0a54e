"""Read-only views of the exposures for the status page and /metrics, each within a deadline.

The HTTP layer renders; it never builds a query.  Every view here takes ``timeout_s``: it is
sent to the server as ``maxTimeMS`` where the read is a cursor and awaited here with the same
deadline, past which :class:`QueryTimeout` is raised (the status server answers ``503``), so a
frozen database never holds a request open.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

from huntsman.models import IngestStatus, QCStatus, WcsStatus
from huntsman.store.exposures import ExposureCollection
from huntsman.values import finite_or_none, get_path

__all__ = [
    "DURATION_FIELDS",
    "LATENCY_STAGES",
    "ExposureCount",
    "QueryTimeout",
    "StageError",
    "StageTimes",
    "exposure_counts",
    "recent_errors",
    "recent_exposures",
    "recent_stage_times",
]

_T = TypeVar("_T")

# stage label -> the ``timing`` field that marks it done
LATENCY_STAGES: tuple[tuple[str, str], ...] = (
    ("seen", "file_seen"),
    ("ingested", "ingested"),
    ("solved", "solved"),
    ("qc", "qc_done"),
)
# stage label -> the field holding its work time (seconds)
DURATION_FIELDS: tuple[tuple[str, str], ...] = (
    ("ingest", "ingest.duration_s"),
    ("solve", "wcs.solve_time_s"),
    ("qc", "qc.duration_s"),
)
# sub-document -> the statuses that count as a failure of that stage
_FAILED: dict[str, frozenset[str]] = {
    "ingest": frozenset({IngestStatus.FAILED, IngestStatus.QUARANTINED}),
    "wcs": frozenset({WcsStatus.FAILED}),
    "qc": frozenset({QCStatus.FAILED}),
}


class QueryTimeout(Exception):
    """A view's query missed its deadline."""


@dataclasses.dataclass(frozen=True)
class ExposureCount:
    """Number of exposure documents of one observation type and ingest status."""

    observation_type: str | None
    ingest_status: str | None
    n: int


@dataclasses.dataclass(frozen=True)
class StageError:
    """One failed stage of one exposure: ``stage`` is ``ingest``, ``wcs`` or ``qc``."""

    filename: str
    stage: str
    error: str | None


@dataclasses.dataclass(frozen=True)
class StageTimes:
    """Per-stage samples (seconds) over the most recent exposures."""

    durations: dict[str, list[float]]  # DURATION_FIELDS label -> work time of each exposure
    latencies: dict[str, list[float]]  # LATENCY_STAGES label -> shutter close (else seen) to done


async def _within(query: Awaitable[_T], timeout_s: float) -> _T:
    try:
        return await asyncio.wait_for(query, timeout_s)
    except TimeoutError:
        raise QueryTimeout(f"database did not answer within {timeout_s:g} s") from None


def _max_time_ms(timeout_s: float) -> int:
    return max(1, int(timeout_s * 1000))


async def _newest(
    exposures: ExposureCollection,
    query: Mapping[str, Any],
    projection: Mapping[str, Any],
    sort: str,
    limit: int,
    timeout_s: float,
) -> list[dict[str, Any]]:
    cursor = (
        exposures.collection.find(dict(query), dict(projection))
        .sort(sort, -1)
        .limit(limit)
        .max_time_ms(_max_time_ms(timeout_s))
    )
    return await _within(cursor.to_list(), timeout_s)


async def exposure_counts(exposures: ExposureCollection, *, timeout_s: float) -> list[ExposureCount]:
    """Documents by observation type and ingest status, sorted by both."""
    rows = await _within(exposures.counts_by("observation_type", "ingest.status"), timeout_s)
    return [ExposureCount(r.get("observation_type"), r.get("ingest_status"), int(r["n"])) for r in rows]


async def recent_exposures(
    exposures: ExposureCollection, fields: Sequence[str], n: int, *, timeout_s: float
) -> list[dict[str, Any]]:
    """The ``n`` most recent exposures (by ``date_obs``), with ``filename`` and ``fields`` only."""
    projection = {"_id": 0, "filename": 1, **dict.fromkeys(fields, 1)}
    return await _newest(exposures, {}, projection, "date_obs", n, timeout_s)


async def recent_errors(exposures: ExposureCollection, n: int, *, timeout_s: float) -> list[StageError]:
    """Failed stages of the ``n`` most recently modified exposures with a failure, newest first."""
    query = {
        "$or": [{f"{stage}.status": {"$in": sorted(map(str, failed))}} for stage, failed in _FAILED.items()]
    }
    projection = {"_id": 0, "filename": 1, "date_modified": 1}
    projection |= {f"{stage}.{field}": 1 for stage in _FAILED for field in ("status", "error")}
    errors = []
    for doc in await _newest(exposures, query, projection, "date_modified", n, timeout_s):
        for stage, failed in _FAILED.items():
            if get_path(doc, f"{stage}.status") in failed:
                error = get_path(doc, f"{stage}.error")
                errors.append(StageError(str(doc.get("filename")), stage, str(error) if error else None))
    return errors


async def recent_stage_times(exposures: ExposureCollection, n: int, *, timeout_s: float) -> StageTimes:
    """Work time and latency of each stage over the ``n`` most recent exposures (by ``date_obs``)."""
    projection = {"_id": 0, "timing": 1, **{field: 1 for _, field in DURATION_FIELDS}}
    docs = await _newest(exposures, {}, projection, "date_obs", n, timeout_s)
    durations = {
        stage: [v for d in docs if (v := finite_or_none(get_path(d, field))) is not None]
        for stage, field in DURATION_FIELDS
    }
    latencies = {
        stage: [v for d in docs if (v := _latency(d, field)) is not None] for stage, field in LATENCY_STAGES
    }
    return StageTimes(durations, latencies)


def _latency(doc: Mapping[str, Any], field: str) -> float | None:
    """Seconds from shutter close (else from the file being seen) to ``timing.<field>``."""
    timing = doc.get("timing") or {}
    start = timing.get("shutter_close") or (timing.get("file_seen") if field != "file_seen" else None)
    end = timing.get(field)
    if isinstance(start, dt.datetime) and isinstance(end, dt.datetime):
        return (end - start).total_seconds()
    return None
