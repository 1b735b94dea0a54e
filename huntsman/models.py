"""Frozen records that cross queues and process boundaries.

Worker functions take paths and these small records, and return small records: no arrays
travel between processes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from typing import Any

__all__ = [
    "FINAL_WCS",
    "DetectorConstants",
    "FileSource",
    "Grade",
    "IngestParams",
    "IngestRequest",
    "IngestResult",
    "IngestStatus",
    "ObservationType",
    "QCStatus",
    "WcsStatus",
    "utcnow",
]


def utcnow() -> dt.datetime:
    """Timezone-aware UTC now, truncated to the millisecond BSON keeps."""
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class ObservationType(enum.StrEnum):
    BIAS = "bias"
    DARK = "dark"
    FLAT = "flat"
    SCIENCE = "science"


OBSERVATION_TYPES: tuple[ObservationType, ...] = tuple(ObservationType)


class IngestStatus(enum.StrEnum):
    OK = "ok"
    FAILED = "failed"
    QUARANTINED = "quarantined"


class WcsStatus(enum.StrEnum):
    """``wcs.status``: pending until the solver records an outcome."""

    PENDING = "pending"
    SOLVED = "solved"
    FAILED = "failed"
    SKIPPED = "skipped"


FINAL_WCS: frozenset[WcsStatus] = frozenset({WcsStatus.SOLVED, WcsStatus.FAILED, WcsStatus.SKIPPED})


class QCStatus(enum.StrEnum):
    """``qc.status``."""

    WAITING_CALIBS = "waiting_calibs"
    DONE = "done"
    FAILED = "failed"


class Grade(enum.StrEnum):
    """``qc.grade``, best first; :attr:`rank` orders them (0 is best)."""

    GOOD = "good"
    FAIR = "fair"
    BAD = "bad"

    @property
    def rank(self) -> int:
        return list(Grade).index(self)


class FileSource(enum.StrEnum):
    """How a file came to the ingestor's attention."""

    EVENT = "event"  # CLOSE_WRITE / MOVED_TO: the writer is done
    SCAN = "scan"  # found by a directory scan: may still be being written
    RECONCILE = "reconcile"  # found by the start-up scan: failed files are retried
    CLI = "cli"  # named on the command line


@dataclasses.dataclass(frozen=True, slots=True)
class IngestRequest:
    """A file to ingest, as put on the ingest queue."""

    path: str
    seen_at: dt.datetime
    source: FileSource = FileSource.EVENT
    force: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class DetectorConstants:
    """Nominal detector constants (the ``detector`` config section), for worker jobs."""

    saturation_adu: float = 4094.0
    gain_e_per_adu: float = 1.145
    read_noise_e: float = 2.4
    bias_level_adu: float = 32.0
    dark_current_e_per_s: float = 0.005
    pixel_scale_arcsec: float = 1.24


@dataclasses.dataclass(frozen=True, slots=True)
class IngestParams:
    """Parameters of the ingestion worker, fixed at start-up."""

    camera_numbers: tuple[tuple[str, int], ...] = ()
    metrics: bool = True
    raw_root: str | None = None
    detector: DetectorConstants = DetectorConstants()
    max_pixels: int = 0  # larger frames are refused before their data are read; 0: no limit


@dataclasses.dataclass(frozen=True, slots=True)
class IngestResult:
    """What a worker learnt about one file: standard metadata, header, metrics or the error.

    ``fields`` holds the data-contract fields (observation_type, camera, ...); ``error`` is
    ``None`` on success.  ``file_size``/``file_mtime_ns`` identify the content that was read;
    ``file_dev``/``file_ino`` (its inode) are added by the ingestor when the file still holds
    that content after the read.
    """

    filename: str
    fields: dict[str, Any]
    header: dict[str, Any] | None
    metrics: dict[str, Any]
    error: str | None
    warnings: tuple[str, ...]
    duration_s: float
    file_size: int | None
    file_mtime_ns: int | None
    file_dev: int | None = None
    file_ino: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
