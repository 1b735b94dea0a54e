"""Frozen records that cross queues and process boundaries.

Worker functions take paths and these small records, and return small records: no arrays
travel between processes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_serializer, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

__all__ = [
    "FINAL_WCS",
    "CatalogueSpec",
    "DetectorConstants",
    "FileSource",
    "Grade",
    "GradeThresholds",
    "IngestParams",
    "IngestRequest",
    "IngestResult",
    "IngestStatus",
    "MasterParams",
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


@pydantic_dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class DetectorConstants:
    """Nominal detector constants (ZWO ASI183MM Pro behind a Canon 400 mm f/2.8), for worker jobs.

    A pydantic dataclass: the ``detector`` config section validates it directly.
    """

    saturation_adu: Annotated[float, Field(gt=0)] = 4094.0
    gain_e_per_adu: Annotated[float, Field(gt=0)] = 1.145
    read_noise_e: Annotated[float, Field(gt=0)] = 2.4
    bias_level_adu: Annotated[float, Field(ge=0)] = 32.0
    dark_current_e_per_s: Annotated[float, Field(ge=0)] = 0.005
    pixel_scale_arcsec: Annotated[float, Field(gt=0)] = 1.24


CatalogueFormat = Literal["skymapper", "csv", "fits"]
_Pairs = tuple[tuple[str, str], ...]


def _pairs(value: Mapping[str, str] | Sequence[tuple[str, str]] | None) -> _Pairs:
    """A hashable, order-independent form of a filter → column mapping."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), str(v)) for k, v in items))


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class CatalogueSpec:
    """Column names and quality cuts of a reference catalogue file.

    The defaults describe a SkyMapper DR3 CSV extract with the original pipeline's cuts.
    ``mag_columns`` / ``err_columns`` accept a mapping ``{filter_name: column}`` and are stored
    as sorted tuples of pairs so that the spec is hashable (it is part of the cache key).
    A pydantic dataclass: the ``qc.refcat`` config section validates it directly; it lives
    here, not in :mod:`huntsman.science.refcat`, so that the configuration imports no astropy.

    Attributes
    ----------
    format : {'skymapper', 'csv', 'fits'}
        ``skymapper`` and ``csv`` are comma-separated text with a header line (empty fields are
        missing values); ``fits`` is the first binary-table HDU.
    ra_column, dec_column : str
        ICRS/J2000 right ascension and declination, degrees.
    mag_columns : mapping of str to str
        Filter name (as in the frame's ``physical_filter``) → magnitude column (mag).
    err_columns : mapping of str to str
        Filter name → magnitude-error column (mag); filters without one get NaN errors.
    stellarity_column, min_stellarity : str or None, float
        Rows with stellarity below the minimum (or missing) are dropped.
    flags_column, flags_allowed : str or None, tuple of int
        Rows whose flag value is not one of ``flags_allowed`` (or is missing) are dropped.
    mag_range : (float, float) or None
        Magnitudes outside ``[min, max]`` are set to NaN for that filter; rows left with no
        finite magnitude in any configured filter are dropped.
    min_separation_arcsec : float or None
        Rows with any other catalogue row (before the quality cuts, so galaxies and flagged
        objects count as neighbours) closer than this are dropped.
    """

    format: CatalogueFormat = "skymapper"
    ra_column: str = "raj2000"
    dec_column: str = "dej2000"
    mag_columns: Mapping[str, str] | _Pairs = (("g_band", "g_psf"), ("r_band", "r_psf"))
    err_columns: Mapping[str, str] | _Pairs = (("g_band", "e_g_psf"), ("r_band", "e_r_psf"))
    stellarity_column: str | None = "class_star"
    min_stellarity: float = 0.9
    flags_column: str | None = "flags"
    flags_allowed: tuple[int, ...] = (0,)
    mag_range: tuple[float, float] | None = None
    min_separation_arcsec: Annotated[float, Field(gt=0)] | None = None

    def __post_init__(self) -> None:
        if self.format not in ("skymapper", "csv", "fits"):
            raise ValueError(f"unknown catalogue format {self.format!r}")
        object.__setattr__(self, "mag_columns", _pairs(self.mag_columns))
        object.__setattr__(self, "err_columns", _pairs(self.err_columns))
        object.__setattr__(self, "flags_allowed", tuple(int(f) for f in self.flags_allowed))
        if not self.mag_columns:
            raise ValueError("mag_columns must name at least one filter")

    @field_serializer("mag_columns", "err_columns")
    def _as_mapping(self, value: Mapping[str, str] | _Pairs) -> dict[str, str]:
        return dict(_pairs(value))  # dumped (config files, service-config.json) as a mapping

    @property
    def magnitude_map(self) -> dict[str, str]:
        """Filter name → magnitude column."""
        return dict(_pairs(self.mag_columns))

    @property
    def error_map(self) -> dict[str, str]:
        """Filter name → magnitude-error column."""
        return dict(_pairs(self.err_columns))

    def required_columns(self) -> list[str]:
        """Every column this spec reads, in a stable order."""
        cols = [self.ra_column, self.dec_column]
        cols += list(self.magnitude_map.values()) + list(self.error_map.values())
        cols += [c for c in (self.stellarity_column, self.flags_column) if c]
        return list(dict.fromkeys(cols))


@pydantic_dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class GradeThresholds:
    """Limits that turn measurements into a grade and flags (see :func:`grade`).

    A pydantic dataclass: the ``qc.grade`` config section validates it directly (all but the
    nominal zeropoint, which is the frame's own, from ``qc.nominal_zeropoint``).
    """

    fwhm_arcsec_good: Annotated[float, Field(gt=0)] = 3.5
    fwhm_arcsec_bad: Annotated[float, Field(gt=0)] = 5.0
    zeropoint_drop_mag: Annotated[float, Field(gt=0)] = 0.5
    nominal_zeropoint: float | None = None
    sky_mag_min: float = 18.0
    min_stars: Annotated[int, Field(ge=0)] = 10

    @model_validator(mode="after")
    def _check_fwhm(self) -> GradeThresholds:
        if self.fwhm_arcsec_good >= self.fwhm_arcsec_bad:
            raise ValueError("fwhm_arcsec_good must be below fwhm_arcsec_bad")
        return self


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class MasterParams:
    """Parameters of master building (all explicit; hashed into the provenance by callers).

    A pydantic dataclass: the ``calib.stack`` config section validates it directly.

    Attributes
    ----------
    sigma, maxiters : float, int
        Sigma clipping of the stack (the original pipeline used 3σ, 3 iterations).
    memory_limit_mb : float
        Memory ceiling of the streamed combination.
    hot_sigma : float
        A dark pixel is hot if its rate exceeds the median by this many robust std.
    dead_fraction : float
        A flat pixel is dead/cold if its normalised response is below this.
    flat_region_fraction : float
        Side fraction of the central region whose median normalises each flat frame.
    io_threads : int
        Threads reading frames while the previous band is clipped.
    """

    sigma: Annotated[float, Field(gt=0)] = 3.0
    maxiters: Annotated[int, Field(ge=0)] = 3
    memory_limit_mb: Annotated[float, Field(gt=0)] = 1024.0
    hot_sigma: Annotated[float, Field(gt=0)] = 5.0
    dead_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5
    flat_region_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    io_threads: Annotated[int, Field(ge=1)] = 2


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
