"""The plate-solving job run in pool workers: read, extract sources, solve, write the WCS back.

The frame is read and its sources detected again here rather than reused from ingestion:
ingestion runs in another pool job, possibly minutes earlier, and sends back only small
records (no arrays cross processes, and the exposure document keeps the source *count*, not
a source list).  Both detections use :mod:`huntsman.science.background` (one mesh policy);
the solver's list is deblended more finely and keeps the brightest ``4 × max_sources``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import tempfile
import time
from typing import Any

import numpy as np

from huntsman.models import WcsStatus
from huntsman.science.astrometry import (
    SolveParams,
    SolveResult,
    extract_sources,
    pointing_metrics,
    solve_field,
)
from huntsman.science.frames import FrameError, read_frame
from huntsman.science.site import SITE
from huntsman.science.wcs_writer import WcsWriteRefused, solution_hash, write_wcs_into_raw
from huntsman.workers.guard import describe_exception

__all__ = ["SolveJob", "SolveOutcome", "solve_file"]


@dataclasses.dataclass(frozen=True, slots=True)
class SolveJob:
    """What a worker needs to solve one frame."""

    params: SolveParams
    write_wcs: bool
    hint_ra_deg: float | None
    hint_dec_deg: float | None
    date_obs: dt.datetime | None
    raw_root: str | None = None  # the write-back never writes outside it (None: never writes)


@dataclasses.dataclass(frozen=True, slots=True)
class SolveOutcome:
    """The solution (or the reason there is none) and what it did to the raw file."""

    result: SolveResult
    marker: str | None
    wrote_wcs: bool
    pointing: dict[str, Any]
    file_size: int | None
    file_mtime_ns: int | None
    error: str | None
    duration_s: float
    write_error: str | None = None  # why the solution was not written into the file


def _failed(reason: str, start: float) -> SolveOutcome:
    result = SolveResult(status=WcsStatus.FAILED, error=reason)
    return SolveOutcome(result, None, False, {}, None, None, reason, time.perf_counter() - start)


def solve_file(path: str, job: SolveJob) -> SolveOutcome:
    """Solve one raw frame; never raises (the reason is in ``error``)."""
    start = time.perf_counter()
    try:
        return _solve(path, job, start)
    except Exception as exc:  # MemoryError, a library's own exception type...
        return _failed(describe_exception(exc), start)


def _solve(path: str, job: SolveJob, start: float) -> SolveOutcome:
    try:
        frame = read_frame(path)
    except FrameError as exc:
        return _failed(f"cannot read frame: {exc}", start)
    data = np.asarray(frame.data, dtype=np.float32)
    try:
        sources = extract_sources(data, max_sources=max(job.params.max_sources * 4, 200))
    except Exception as exc:  # sep raises plain Exceptions for pathological frames
        return _failed(f"source extraction failed: {exc}", start)
    if len(sources[0]) < 8:
        return _failed(f"too few sources to solve ({len(sources[0])} detected)", start)
    with tempfile.TemporaryDirectory(prefix="huntsman-solve-") as workdir:
        result = solve_field(
            data.shape,
            sources,
            hint_ra_deg=job.hint_ra_deg,
            hint_dec_deg=job.hint_dec_deg,
            params=job.params,
            workdir=workdir,
        )
    if result.status != WcsStatus.SOLVED:
        return SolveOutcome(
            result, None, False, {}, None, None, result.error, time.perf_counter() - start
        )
    pointing: dict[str, Any] = {}
    if job.date_obs is not None:
        metrics = pointing_metrics(
            result.header,
            data.shape,
            job.date_obs,
            site=SITE,
            mount_ra_deg=job.hint_ra_deg,
            mount_dec_deg=job.hint_dec_deg,
        )
        pointing = dataclasses.asdict(metrics)
    marker = solution_hash(result.header)
    wrote, write_error = False, None
    if job.write_wcs:
        try:
            wrote = write_wcs_into_raw(path, result.header, root=job.raw_root)
        except WcsWriteRefused as exc:
            write_error = f"not written: {exc}"
        except (OSError, ValueError) as exc:  # the solution stands; the file could not take it
            write_error = f"write failed: {type(exc).__name__}: {exc}"
    st = os.stat(path)
    return SolveOutcome(
        result, marker, wrote, pointing, st.st_size, st.st_mtime_ns, None, time.perf_counter() - start,
        write_error,
    )
