"""The ingestion job run in pool workers: one file in, one small record out.

It never raises, whatever the file: anything that goes wrong (an exception astropy cannot send
back across processes, a ``MemoryError`` under the worker's memory cap included) becomes
``IngestResult.error`` with as much metadata as could be read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from numpy.typing import NDArray

from huntsman.models import IngestParams, IngestResult
from huntsman.science.frames import FrameError, header_to_dict, read_frame, salvage_header
from huntsman.science.metrics import MetricParams, compute_metrics
from huntsman.science.translator import (
    TranslationError,
    classify_observation_type,
    clean_header,
    translate,
)
from huntsman.values import finite_or_none
from huntsman.workers.guard import describe_exception

__all__ = ["ingest_file", "standard_fields"]


def standard_fields(
    header: Mapping[str, Any], filename: str, params: IngestParams
) -> dict[str, Any]:
    """The data-contract fields of an exposure document from its header."""
    info = translate(header, filename)
    # Guaranteed by translate()'s required properties.
    assert info.datetime_begin is not None and info.exposure_time is not None
    assert info.detector_name is not None
    begin: dt.datetime = info.datetime_begin.to_datetime(timezone=dt.UTC)
    exposure_time = float(info.exposure_time.to_value("s"))
    radec = info.tracking_radec
    camera = info.detector_name
    numbers = dict(params.camera_numbers)
    temperature = info.temperature
    fields: dict[str, Any] = {
        "observation_type": info.observation_type,
        "camera": camera,
        "camera_known": camera in numbers if numbers else None,
        "detector_num": numbers.get(camera),
        "camera_serial": info.detector_serial,
        "physical_filter": info.physical_filter,
        "exposure_time": exposure_time,
        "date_obs": begin,
        "field": info.object,
        "ra": finite_or_none(float(radec.ra.deg)) if radec is not None else None,
        "dec": finite_or_none(float(radec.dec.deg)) if radec is not None else None,
        "airmass": finite_or_none(info.boresight_airmass),
        "ccd_temp": finite_or_none(float(temperature.to_value("deg_C"))) if temperature is not None else None,
        "image_id": info.observation_id,
        "sequence_id": info.exposure_group,
        "calib_date": begin.date().isoformat(),
        "shutter_close": begin + dt.timedelta(seconds=exposure_time),
    }
    return fields


def _metrics(
    data: NDArray[np.number[Any]], fields: dict[str, Any], params: IngestParams
) -> dict[str, Any]:
    """Every per-frame metric; each one that fails is listed under ``failed`` with its reason."""
    metric_params = MetricParams(detector=params.detector, exptime_s=fields.get("exposure_time"))
    result = compute_metrics(data, fields["observation_type"], params=metric_params).to_dict()
    result["shape"] = [int(data.shape[0]), int(data.shape[1])]
    return result


def ingest_file(path: str, params: IngestParams) -> IngestResult:
    """Read, validate, translate and measure one raw file; never raises."""
    start = time.perf_counter()
    try:
        return _ingest(path, params, start)
    except Exception as exc:  # a failure while recording a failure: keep at least the reason
        return IngestResult(
            filename=path, fields={}, header=None, metrics={}, error=describe_exception(exc),
            warnings=(), duration_s=time.perf_counter() - start, file_size=None,
            file_mtime_ns=None,
        )


def _ingest(path: str, params: IngestParams, start: float) -> IngestResult:
    size = mtime = None
    header_dict: dict[str, Any] | None = None
    fields: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    notes: tuple[str, ...] = ()
    error: str | None = None
    try:
        st = _check_path(path, params.raw_root)
        size, mtime = st.st_size, st.st_mtime_ns
        frame = read_frame(path, with_data=params.metrics, max_pixels=params.max_pixels or None)
        notes = frame.warnings
        header_dict = header_to_dict(frame.header)
        try:
            fields = standard_fields(frame.header, path, params)
        except TranslationError as exc:
            fields = _partial_fields(frame.header, path, params)
            corrupt = "; ".join(f"corrupt header card {k}: {v}" for k, v in frame.corrupt_cards.items())
            prefix = f"{corrupt}; " if corrupt else ""
            raise FrameError(f"{prefix}header cannot be translated: {exc}") from None
        if params.metrics:
            metrics = _metrics(frame.data, fields, params)
    except FrameError as exc:
        error = str(exc)
        header = exc.header if exc.header is not None else _salvage(path, error)
        if header is not None and header_dict is None:
            header_dict = header_to_dict(header)
            fields = _partial_fields(header, path, params)
    except (OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # MemoryError, a library's own exception type...: still a record
        error = describe_exception(exc)
        if header_dict is None:
            with contextlib.suppress(Exception):  # the reason matters more than the cards
                header = _salvage(path, error)
                if header is not None:
                    header_dict = header_to_dict(header)
                    fields = _partial_fields(header, path, params)
    return IngestResult(
        filename=path,
        fields=fields,
        header=header_dict,
        metrics=metrics,
        error=error,
        warnings=notes,
        duration_s=time.perf_counter() - start,
        file_size=size,
        file_mtime_ns=mtime,
    )


def _check_path(path: str, raw_root: str | None) -> os.stat_result:
    """Stat the file, refusing symlinks that leave the raw root or never resolve."""
    p = Path(path)
    if p.is_symlink():
        try:
            target = p.resolve(strict=True)
        except RuntimeError:
            raise FrameError("symlink loop: the link never resolves to a file") from None
        except (FileNotFoundError, OSError):
            raise FrameError("dangling symlink: its target does not exist") from None
        if raw_root is not None and not target.is_relative_to(Path(raw_root).resolve()):
            raise FrameError(f"symlink points outside the raw directory (to {target})")
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FrameError("file vanished before it could be read") from None
    except OSError as exc:
        if "symbolic links" in str(exc):
            raise FrameError("symlink loop: the link never resolves to a file") from None
        raise FrameError(f"cannot stat file: {exc.strerror}") from None
    if not p.is_file():
        raise FrameError("not a regular file")
    return st


def _partial_fields(
    header: Mapping[str, Any], path: str, params: IngestParams
) -> dict[str, Any]:
    """As many standard fields as a damaged file's header still gives."""
    try:
        return standard_fields(header, path, params)
    except (TranslationError, ValueError, KeyError, TypeError):
        pass
    cleaned = clean_header(header)
    fields: dict[str, Any] = {}
    for name, key in (("camera", "CAM-ID"), ("field", "FIELD"), ("physical_filter", "FILTER")):
        value = cleaned.get(key)
        if isinstance(value, str):
            fields[name] = value
    with contextlib.suppress(TranslationError):
        fields["observation_type"] = classify_observation_type(
            cleaned.get("IMAGETYP"), cleaned.get("FIELD")
        )
    exptime = cleaned.get("EXPTIME")
    if isinstance(exptime, int | float) and not isinstance(exptime, bool):
        fields["exposure_time"] = finite_or_none(float(exptime))
    return fields


def _salvage(path: str, reason: str) -> fits.Header | None:
    """The readable cards of a file astropy refused, so its document says what it can."""
    if reason.startswith(("file vanished", "symlink", "dangling", "not a regular", "path is")):
        return None
    try:
        return salvage_header(path)
    except OSError:
        return None
