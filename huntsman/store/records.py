"""The typed records the stages write on an exposure document, and the fields each one sets.

Each stage owns sub-documents and one ``timing`` field (:data:`STAGE_DOCUMENTS`); one
``ExposureCollection.record_*`` function per stage is their only writer:

- ingestion: :class:`~huntsman.models.IngestResult` → ``ingest``, ``metrics`` (and the
  standard fields, ``header``, ``file.*``), ``timing.{shutter_close,file_seen,ingested}``;
- plate solving: :class:`SolveRecord` → ``wcs``, ``pointing``, ``timing.solved``;
- QC: :class:`QCRecord` → ``qc``, ``timing.qc_done``.

The builders here turn a record into the ``$set`` of its write (pure: no database); the field
reference is docs/schema.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from huntsman.models import Grade, QCStatus, WcsStatus

__all__ = [
    "STAGE_DOCUMENTS",
    "QCRecord",
    "SolveRecord",
    "StageDocument",
    "WcsSolution",
    "qc_fields",
    "solve_fields",
]


@dataclasses.dataclass(frozen=True, slots=True)
class StageDocument:
    """What one stage writes: its sub-documents and its ``timing`` field."""

    fields: tuple[str, ...]
    timing: str


STAGE_DOCUMENTS: Mapping[str, StageDocument] = {
    "ingest": StageDocument(("ingest", "metrics"), "ingested"),
    "solve": StageDocument(("wcs", "pointing"), "solved"),
    "qc": StageDocument(("qc",), "qc_done"),
}


@dataclasses.dataclass(frozen=True, slots=True)
class WcsSolution:
    """A plate solution as stored in ``wcs`` (field order is the document's)."""

    header: Mapping[str, str | int | float]
    ra_center: float | None
    dec_center: float | None
    pixel_scale_arcsec: float | None
    rotation_deg: float | None
    solve_time_s: float
    index_used: str | None
    n_matched: int | None
    residual_arcsec: float | None
    pointing_offset_arcsec: float | None
    blind: bool
    marker: str | None
    written_to_file: bool
    write_error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class SolveRecord:
    """One write of ``wcs`` (and, for a solution, ``pointing``): build it with the constructors.

    ``pending`` with ``keep_solution`` (a re-run asked for) only resets the status and the
    tries: the marker of a solution written into the raw file stays, so the ingestor still
    recognises its own write-back.
    """

    status: WcsStatus
    tries: int = 0
    error: str | None = None
    solve_time_s: float | None = None  # a failed attempt's solver time
    solution: WcsSolution | None = None
    pointing: Mapping[str, Any] | None = None
    file_size: int | None = None  # the raw file after the WCS write-back
    file_mtime_ns: int | None = None
    keep_solution: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", WcsStatus(self.status))  # a plain string is checked
        if (self.solution is not None) != (self.status is WcsStatus.SOLVED):
            raise ValueError("a solution is recorded with the status solved, and only then")
        if self.keep_solution and self.status is not WcsStatus.PENDING:
            raise ValueError("keep_solution is for a pending reset only")

    @classmethod
    def pending(cls, *, keep_solution: bool = False) -> SolveRecord:
        return cls(WcsStatus.PENDING, tries=0, keep_solution=keep_solution)

    @classmethod
    def skipped(cls, reason: str) -> SolveRecord:
        return cls(WcsStatus.SKIPPED, error=reason)

    @classmethod
    def failed(cls, *, tries: int, error: str, solve_time_s: float | None) -> SolveRecord:
        return cls(WcsStatus.FAILED, tries=tries, error=error, solve_time_s=solve_time_s)

    @classmethod
    def solved(
        cls,
        solution: WcsSolution,
        *,
        tries: int,
        pointing: Mapping[str, Any],
        file_size: int | None = None,
        file_mtime_ns: int | None = None,
    ) -> SolveRecord:
        return cls(WcsStatus.SOLVED, tries=tries, solution=solution, pointing=pointing,
                   file_size=file_size, file_mtime_ns=file_mtime_ns)


def solve_fields(record: SolveRecord, now: dt.datetime) -> dict[str, Any]:
    """The ``$set`` of one :class:`SolveRecord`; ``timing.solved`` only for an attempt's outcome."""
    status = record.status
    if status is WcsStatus.PENDING:
        if record.keep_solution:
            return {"wcs.status": status, "wcs.tries": record.tries}
        return {"wcs": {"status": status, "tries": record.tries}}
    if status is WcsStatus.SKIPPED:
        return {"wcs": {"status": status, "error": record.error}}
    if status is WcsStatus.FAILED:
        return {
            "wcs": {"status": status, "tries": record.tries, "error": record.error,
                    "solve_time_s": record.solve_time_s},
            "timing.solved": now,
        }
    assert record.solution is not None  # __post_init__
    solution = {f.name: getattr(record.solution, f.name) for f in dataclasses.fields(WcsSolution)}
    fields: dict[str, Any] = {
        "wcs": {"status": status, "tries": record.tries, "error": None, **solution},
        "pointing": dict(record.pointing or {}),
        "timing.solved": now,
    }
    if record.file_size is not None:
        fields["file.size"] = record.file_size
        fields["file.mtime_ns"] = record.file_mtime_ns
    return fields


@dataclasses.dataclass(frozen=True, slots=True)
class QCRecord:
    """One write of ``qc``: a frame waiting for its masters, or a measurement's outcome.

    ``measurements`` are the worker's numbers (``fwhm_arcsec``, ``zeropoint``, …, see
    docs/schema.md); the record's own fields win over a measurement of the same name.
    """

    status: QCStatus
    tries: int = 0
    error: str | None = None
    calibs: Mapping[str, str] | None = None
    measurements: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    failed: Mapping[str, str] = dataclasses.field(default_factory=dict)
    duration_s: float | None = None
    wcs_status: WcsStatus | None = None
    grade: Grade | None = None
    flags: tuple[str, ...] = ()
    calibrated_filename: str | None = None
    filter: str | None = None
    refcat: str | None = None
    config_hash: str | None = None
    software_version: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", QCStatus(self.status))  # a plain string is checked
        if self.grade is not None:
            object.__setattr__(self, "grade", Grade(self.grade))

    @classmethod
    def waiting(cls, reason: str) -> QCRecord:
        """No complete set of masters yet; ``reason`` says which are missing."""
        return cls(QCStatus.WAITING_CALIBS, tries=0, error=reason)


def qc_fields(record: QCRecord, now: dt.datetime) -> dict[str, Any]:
    """The ``$set`` of one :class:`QCRecord` (the whole ``qc`` object: two runs never mix)."""
    if record.status is QCStatus.WAITING_CALIBS:
        return {"qc": {"status": record.status, "error": record.error, "tries": record.tries,
                       "calibs": None, "date_checked": now}}
    qc = {
        **record.measurements,
        "status": record.status,
        "error": record.error,
        "failed": dict(record.failed),
        "tries": record.tries,
        "duration_s": record.duration_s,
        "calibs": dict(record.calibs) if record.calibs is not None else None,
        "wcs_status": record.wcs_status,
        "grade": record.grade,
        "flags": list(record.flags),
        "calibrated_filename": record.calibrated_filename,
        "filter": record.filter,
        "refcat": record.refcat,
        "config_hash": record.config_hash,
        "software_version": record.software_version,
        "date": now,
    }
    return {"qc": qc, "timing.qc_done": now}
