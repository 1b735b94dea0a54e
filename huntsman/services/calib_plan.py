"""Which raw frames go into which master: pure selection logic of the CalibService.

For a unit (type, camera, [filter], date) the frames of that UTC day are judged (ingestion
status, metric windows, image shape); darks are split into temperature groups; a group with
fewer than the minimum usable frames borrows the nearest usable frames of the days within
``window_days``; a group with more than the maximum keeps the frames nearest in time to the
middle of the day.  Every excluded frame of the day is listed with its reason.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from huntsman.config import CalibConfig, DetectorConfig
from huntsman.models import IngestStatus, ObservationType
from huntsman.store.calibs import Unit, days_between

__all__ = ["RAW_PROJECTION", "Group", "RawFrame", "UnitPlan", "plan_unit", "rejection_reason", "units_of"]

RAW_PROJECTION = {
    "_id": 0,
    "filename": 1,
    "observation_type": 1,
    "camera": 1,
    "physical_filter": 1,
    "exposure_time": 1,
    "date_obs": 1,
    "calib_date": 1,
    "ccd_temp": 1,
    "ingest.status": 1,
    "ingest.error": 1,
    "metrics": 1,
    "file.missing": 1,
    "file.missing_since": 1,
}


@dataclasses.dataclass(frozen=True)
class RawFrame:
    """What the planner needs of one raw calibration exposure document."""

    filename: str
    calib_type: str
    camera: str
    physical_filter: str | None
    calib_date: str
    date_obs: dt.datetime | None
    exposure_time: float | None
    ccd_temp: float | None
    status: str | None
    error: str | None
    metrics: Mapping[str, Any]
    missing_since: dt.datetime | None = None  # the raw file is gone (deleted, moved out)
    missing: bool = False

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> RawFrame | None:
        """``None`` for documents that cannot be attributed to a unit (no camera or date)."""
        calib_type, camera, date = doc.get("observation_type"), doc.get("camera"), doc.get("calib_date")
        if calib_type not in ("bias", "dark", "flat") or not camera or not date:
            return None
        ingest = doc.get("ingest") or {}
        file = doc.get("file") or {}
        return cls(
            filename=doc["filename"],
            calib_type=calib_type,
            camera=camera,
            physical_filter=doc.get("physical_filter") if calib_type == "flat" else None,
            calib_date=date,
            date_obs=doc.get("date_obs"),
            exposure_time=doc.get("exposure_time"),
            ccd_temp=doc.get("ccd_temp"),
            status=ingest.get("status"),
            error=ingest.get("error"),
            metrics=doc.get("metrics") or {},
            missing_since=file.get("missing_since"),
            missing=bool(file.get("missing")),
        )

    @property
    def unit(self) -> Unit:
        return Unit(self.calib_type, self.camera, self.physical_filter, self.calib_date)

    @property
    def shape(self) -> tuple[int, ...] | None:
        shape = self.metrics.get("shape")
        return tuple(int(n) for n in shape) if shape else None


@dataclasses.dataclass(frozen=True)
class Group:
    """The raw frames of one master to build, in order of distance from the date."""

    unit: Unit
    frames: tuple[RawFrame, ...]
    ccd_temp: float | None

    @property
    def filenames(self) -> tuple[str, ...]:
        return tuple(f.filename for f in self.frames)


@dataclasses.dataclass(frozen=True)
class UnitPlan:
    """The groups to build for a unit, the frames excluded and why some group is missing."""

    unit: Unit
    groups: tuple[Group, ...]
    excluded: tuple[dict[str, str], ...]
    shortfalls: tuple[str, ...]  # one reason per temperature group with too few frames
    n_candidates: int


def units_of(frames: Iterable[RawFrame], dates: set[str] | None = None) -> list[Unit]:
    """The units with at least one frame, sorted (restricted to ``dates`` if given)."""
    return sorted({f.unit for f in frames if dates is None or f.calib_date in dates})


def _metric(frame: RawFrame, name: str) -> float | None:
    value = frame.metrics.get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def rejection_reason(frame: RawFrame, config: CalibConfig, detector: DetectorConfig) -> str | None:
    """Why a frame must not be used, or ``None`` if it may be."""
    reason = _record_reason(frame)
    if reason is not None or not frame.metrics:
        return reason  # no metrics (disabled at ingestion): nothing more to judge by
    median = _metric(frame, "clipped_median")
    if median is None:
        failed = (frame.metrics.get("failed") or {}).get("clipped_median", "not measured")
        return f"no pixel statistics: {failed}"
    if frame.calib_type == ObservationType.FLAT:
        return _flat_reason(frame, median, config, detector)
    if frame.calib_type in (ObservationType.BIAS, ObservationType.DARK):
        return _bias_dark_reason(frame, config)
    return None


def _record_reason(frame: RawFrame) -> str | None:
    """What the document alone rules out: a missing file, a failed ingestion, no exposure time."""
    if frame.missing:
        since = f" since {frame.missing_since:%Y-%m-%d %H:%M:%S} UTC" if frame.missing_since else ""
        return f"raw file missing{since} (deleted or moved out of the raw tree)"
    if frame.status != IngestStatus.OK:
        return f"ingestion {frame.status or 'incomplete'}: {frame.error or 'no reason recorded'}"
    exposed = frame.calib_type in (ObservationType.DARK, ObservationType.FLAT)
    if exposed and not (frame.exposure_time or 0) > 0:
        return f"exposure time {frame.exposure_time!r} s is not positive"
    return None


def _bias_dark_reason(frame: RawFrame, config: CalibConfig) -> str | None:
    """A bias whose level is off, or a bias or dark with sources (light leak, stars)."""
    if frame.calib_type == ObservationType.BIAS:
        offset = _metric(frame, "level_offset_adu")
        if offset is not None and abs(offset) > config.bias_max_level_offset_adu:
            return (f"bias level offset {offset:+.1f} ADU outside "
                    f"±{config.bias_max_level_offset_adu:g} ADU")
    sources, limit = _metric(frame, "n_sources"), config.max_sources_bias_dark
    if sources is not None and sources > limit:
        return f"{sources:.0f} sources detected (> {limit}): light leak or stars"
    return None


def _flat_reason(frame: RawFrame, median: float, config: CalibConfig, detector: DetectorConfig) -> str | None:
    """A flat too faint, near saturation, star-filled or trailed."""
    fraction = _metric(frame, "illumination_fraction")
    if fraction is None:
        fraction = median / detector.saturation_adu
    if fraction < config.flat_min_illumination_fraction:
        minimum = config.flat_min_illumination_fraction
        return f"too faint: illumination {fraction:.3f} of saturation < {minimum:g}"
    if fraction > config.flat_max_illumination_fraction:
        return (f"near saturation: illumination {fraction:.3f} of saturation > "
                f"{config.flat_max_illumination_fraction:g}")
    sources = _metric(frame, "n_sources")
    if sources is not None and sources > config.flat_max_sources:
        return f"star-filled: {sources:.0f} sources > {config.flat_max_sources}"
    elongation = _metric(frame, "elongation_trail")
    if elongation is not None and elongation > config.flat_max_elongation:
        return f"trailed: source elongation {elongation:.2f} > {config.flat_max_elongation:g}"
    return None


def _distance_s(frame: RawFrame, centre: dt.datetime) -> float:
    if frame.date_obs is None:
        return abs(days_between(centre.date(), frame.calib_date)) * 86400.0
    return abs((frame.date_obs - centre).total_seconds())


def _temperature_groups(frames: Sequence[RawFrame], tolerance_c: float) -> list[list[RawFrame]]:
    """Split by CCD temperature: a group spans at most ``tolerance_c`` (frames without a
    temperature form their own group)."""
    known = sorted((f for f in frames if f.ccd_temp is not None), key=lambda f: (f.ccd_temp, f.filename))
    groups: list[list[RawFrame]] = []
    for frame in known:
        assert frame.ccd_temp is not None
        if groups and frame.ccd_temp - (groups[-1][0].ccd_temp or 0.0) <= tolerance_c:
            groups[-1].append(frame)
        else:
            groups.append([frame])
    unknown = [f for f in frames if f.ccd_temp is None]
    if unknown:
        groups.append(unknown)
    return groups


def _median_temp(frames: Iterable[RawFrame]) -> float | None:
    temps = [f.ccd_temp for f in frames if f.ccd_temp is not None]
    return float(statistics.median(temps)) if temps else None


def plan_unit(
    unit: Unit,
    frames: Sequence[RawFrame],
    config: CalibConfig,
    detector: DetectorConfig,
) -> UnitPlan:
    """The groups to build for ``unit`` from ``frames`` (the unit's kind of frames of every day
    within ``window_days`` of its date; other frames are ignored)."""
    mine = [
        f for f in frames
        if (f.calib_type, f.camera, f.physical_filter) == (unit.calib_type, unit.camera, unit.physical_filter)
        and abs(days_between(unit.date, f.calib_date)) <= config.window_days
    ]
    reasons = {f.filename: rejection_reason(f, config, detector) for f in mine}
    usable = [f for f in mine if reasons[f.filename] is None]
    today = [f for f in usable if f.calib_date == unit.date]
    shapes = Counter(f.shape for f in (today or usable) if f.shape is not None)
    if shapes:
        # The most common shape wins; ties go to the larger frame.
        shape = max(shapes, key=lambda s: (shapes[s], s))
        for f in usable:
            if f.shape is not None and f.shape != shape:
                reasons[f.filename] = f"shape {f.shape} differs from the group's {shape}"
        usable = [f for f in usable if reasons[f.filename] is None]
        today = [f for f in today if reasons[f.filename] is None]
    excluded = tuple(
        {"filename": f.filename, "reason": reason}
        for f in sorted(mine, key=lambda f: f.filename)
        if f.calib_date == unit.date and (reason := reasons[f.filename]) is not None
    )
    limits = config.frames.of(unit.calib_type)
    low, high = limits.min, limits.max
    centre = dt.datetime.fromisoformat(unit.date).replace(hour=12, tzinfo=dt.UTC)
    tolerance = config.temperature_tolerance_c
    if unit.calib_type == "dark":
        clusters = _temperature_groups(today, tolerance)
    else:
        clusters = [today] if today else []
    groups: list[Group] = []
    shortfalls: list[str] = []
    for cluster in clusters:
        temp = _median_temp(cluster)
        chosen = list(cluster)
        if len(chosen) < low and config.window_days > 0:
            borrowed = [
                f for f in usable
                if f.calib_date != unit.date
                and (unit.calib_type != "dark" or temp is None or f.ccd_temp is None
                     or abs(f.ccd_temp - temp) <= tolerance)
            ]
            chosen += borrowed
        chosen.sort(key=lambda f: (_distance_s(f, centre), f.filename))
        chosen = chosen[:high]
        where = f" at {temp:.1f} °C" if unit.calib_type == "dark" and temp is not None else ""
        if len(chosen) < low:
            shortfalls.append(
                f"{len(chosen)} usable {unit.calib_type} frame(s){where} within ±{config.window_days} "
                f"day(s), need {low} ({len(excluded)} excluded)"
            )
            continue
        groups.append(Group(unit, tuple(chosen), _median_temp(chosen)))
    if not clusters:
        shortfalls.append(
            f"no usable {unit.calib_type} frames on {unit.date} "
            f"({len([f for f in mine if f.calib_date == unit.date])} found, {len(excluded)} excluded)"
        )
    return UnitPlan(unit, tuple(groups), excluded, tuple(shortfalls), len(mine))
