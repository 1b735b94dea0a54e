"""The quality-control job run in pool workers: calibrate, measure and grade one frame.

It calibrates a raw science frame with its masters, writes the calibrated frame (optional),
measures PSF, sky, zeropoint and depth, and grades it.

Paths and a small frozen :class:`QCJob` in, a small :class:`QCOutcome` out.  Never raises for a
bad frame: a measurement that cannot be made is ``None`` with its reason in ``failed``, and
every other measurement is kept.  Only an unreadable raw frame or master (or one of the wrong
shape) fails the whole job (``status == "failed"``).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales
from numpy.typing import NDArray

from huntsman.models import DetectorConstants, Grade, GradeThresholds, QCStatus
from huntsman.paths import UnsafePathError
from huntsman.science.background import SkyBackground, estimate_background
from huntsman.science.calibration import CalibratedFrame, calibrate, load_master
from huntsman.science.fitsio import read_raw, write_fits_atomic
from huntsman.science.photometry import PhotometryParams, PhotometryResult, measure_photometry
from huntsman.science.provenance import Provenance, stamp_header
from huntsman.science.psf import PSFResult, measure_psf
from huntsman.science.refcat import CatalogueSpec, load_catalogue
from huntsman.values import finite_or_none
from huntsman.workers.guard import describe_exception

__all__ = [
    "DetectorConstants",
    "GradeThresholds",
    "QCJob",
    "QCOutcome",
    "grade",
    "qc_frame",
]

@dataclasses.dataclass(frozen=True, slots=True)
class QCJob:
    """What a worker needs to measure one science frame."""

    bias_path: str
    dark_path: str
    flat_path: str
    exptime_s: float
    filter_name: str | None
    wcs_header: Mapping[str, Any] | None
    wcs_note: str | None  # why there is no WCS (plate solution failed/skipped), for the record
    refcat_path: str | None
    catalogue: CatalogueSpec
    detector: DetectorConstants
    grades: GradeThresholds
    out_path: str | None  # calibrated frame, or None not to write one
    provenance: Provenance
    min_flat_value: float = 0.2
    psf_max_stars: int = 150
    photometry: PhotometryParams = dataclasses.field(default_factory=PhotometryParams)
    out_root: str | None = None  # out_path must lie inside it (None: its own directory)


@dataclasses.dataclass(frozen=True, slots=True)
class QCOutcome:
    """``status`` done|failed, the ``qc.*`` measurements (plain numbers or None), the reasons
    for missing ones (``failed``: {measurement: reason}), grade and flags."""

    status: str  # a QCStatus (DONE or FAILED); str while services/quality.py passes literals
    error: str | None
    metrics: dict[str, Any]
    failed: dict[str, str]
    grade: Grade | None
    flags: tuple[str, ...]
    calibrated_filename: str | None
    duration_s: float


def _wcs_of(header: Mapping[str, Any] | None) -> WCS | None:
    if not header:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(fits.Header(dict(header)))
    return wcs if wcs.has_celestial else None


def _scale_of(wcs: WCS | None, nominal: float) -> float:
    if wcs is None:
        return nominal
    return float(np.sqrt(np.prod(proj_plane_pixel_scales(wcs.celestial))) * 3600.0)


def grade(metrics: Mapping[str, Any], g: GradeThresholds) -> tuple[Grade, tuple[str, ...]]:
    """Grade (``good``, ``fair`` or ``bad``) and flags of a frame's measurements.

    ``bad``: no PSF, FWHM above ``fwhm_arcsec_bad``, or zeropoint more than
    ``zeropoint_drop_mag`` below the nominal (cloud).  ``fair``: FWHM above
    ``fwhm_arcsec_good``, sky brighter than ``sky_mag_min``, fewer than ``min_stars`` PSF stars,
    or no zeropoint.  Otherwise ``good``.
    """
    flags: list[str] = []
    bad = fair = False
    fwhm = metrics.get("fwhm_arcsec")
    if fwhm is None:
        flags.append("no_psf")
        bad = True
    elif fwhm > g.fwhm_arcsec_bad:
        flags.append("fwhm_very_high")
        bad = True
    elif fwhm > g.fwhm_arcsec_good:
        flags.append("fwhm_high")
        fair = True
    if int(metrics.get("n_psf_stars") or 0) < g.min_stars:
        flags.append("few_stars")
        fair = True
    zp = metrics.get("zeropoint")
    if zp is None:
        flags.append("no_zeropoint")
        fair = True
    elif g.nominal_zeropoint is not None and g.nominal_zeropoint - zp > g.zeropoint_drop_mag:
        flags.append("zeropoint_low")
        bad = True
    sky_mag = metrics.get("sky_mag_arcsec2")
    if sky_mag is not None and sky_mag < g.sky_mag_min:
        flags.append("sky_bright")
        fair = True
    if metrics.get("wcs") is False:
        flags.append("no_wcs")
    return (Grade.BAD if bad else Grade.FAIR if fair else Grade.GOOD), tuple(flags)


def _psf_metrics(psf: PSFResult, scale: float) -> dict[str, Any]:
    grid = [[None if v is None else finite_or_none(v * scale) for v in row]
            for row in psf.grid_fwhm_px]
    cells = [v for row in grid for v in row if v is not None]
    variation = None
    if len(cells) >= 2 and psf.fwhm_arcsec:
        variation = finite_or_none(100.0 * (max(cells) - min(cells)) / psf.fwhm_arcsec)
    return {
        "fwhm_px": finite_or_none(psf.fwhm_px),
        "fwhm_arcsec": finite_or_none(psf.fwhm_px * scale) if psf.fwhm_px is not None else None,
        "fwhm_scatter_px": finite_or_none(psf.fwhm_scatter_px),
        "ellipticity": finite_or_none(psf.ellipticity),
        "psf_beta": finite_or_none(psf.beta),
        "n_psf_stars": int(psf.n_stars),
        "fwhm_grid_arcsec": grid,
        "fwhm_variation_pct": variation,
    }


def _phot_metrics(r: PhotometryResult) -> dict[str, Any]:
    return {
        "sky_adu": finite_or_none(r.sky_adu),
        "sky_rms_adu": finite_or_none(r.sky_rms_adu),
        "sky_mag_arcsec2": finite_or_none(r.sky_mag_arcsec2),
        "zeropoint": finite_or_none(r.zeropoint),
        "zeropoint_err": finite_or_none(r.zeropoint_err),
        "n_zeropoint_stars": int(r.n_zeropoint_stars),
        "limiting_mag_5sigma": finite_or_none(r.limiting_mag_5sigma),
        "aperture_correction_mag": finite_or_none(r.aperture_correction_mag),
        "astrometric_median_arcsec": finite_or_none(r.astrometric_median_arcsec),
        "astrometric_rms_arcsec": finite_or_none(r.astrometric_rms_arcsec),
        "n_astrometric_stars": int(r.n_astrometric_stars),
        "n_catalogue_in_field": int(r.n_catalogue_in_field),
    }


def _write_calibrated(
    path: str, data: NDArray[np.float32], mask: NDArray[np.bool_], raw_header: fits.Header,
    wcs: WCS | None, raw_path: str, job: QCJob,
) -> str:
    header = raw_header.copy()
    for key in ("BZERO", "BSCALE", "BLANK"):
        header.remove(key, ignore_missing=True)
    if wcs is not None:
        header.update(wcs.to_header(relax=True))
    header["BUNIT"] = ("adu", "calibrated: (raw - bias - dark*t) / flat")
    header = stamp_header(
        header, job.provenance, [raw_path],
        {"bias": job.bias_path, "dark": job.dark_path, "flat": job.flat_path},
    )
    primary = fits.PrimaryHDU(data=np.asarray(data, dtype=np.float32), header=header)
    mask_hdu = fits.ImageHDU(data=mask.astype(np.uint8), name="MASK")
    root = job.out_root if job.out_root is not None else os.path.dirname(path)
    write_fits_atomic(path, fits.HDUList([primary, mask_hdu]), root=root)
    return path


def _failed(reason: str, start: float) -> QCOutcome:
    return QCOutcome(QCStatus.FAILED, reason, {}, {}, None, (), None, time.perf_counter() - start)


def qc_frame(path: str, job: QCJob) -> QCOutcome:
    """Calibrate and measure one raw science frame; never raises."""
    start = time.perf_counter()
    try:
        return _qc(path, job, start)
    except Exception as exc:  # MemoryError, a library's own exception type...
        return _failed(describe_exception(exc), start)


def _qc(path: str, job: QCJob, start: float) -> QCOutcome:
    try:
        raw, raw_header = read_raw(path)
        masters = [load_master(p, raw.shape)
                   for p in (job.bias_path, job.dark_path, job.flat_path)]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return _failed(f"cannot read frame or masters: {exc}", start)
    if not job.exptime_s > 0:
        return _failed(f"exposure time must be positive, got {job.exptime_s}", start)
    cal = _calibrated(raw, masters, job)
    del raw, masters
    failed: dict[str, str] = {}
    wcs = _wcs_of(job.wcs_header)
    scale = _scale_of(wcs, job.detector.pixel_scale_arcsec)
    metrics: dict[str, Any] = {"pixel_scale_arcsec": scale, "wcs": wcs is not None,
                               "masked_fraction": float(np.mean(cal.mask))}
    if wcs is None:
        failed["wcs"] = job.wcs_note or "no plate solution"

    # One background (sep.Background over the unmasked pixels) for both PSF and photometry.
    background: SkyBackground | None
    try:
        background = estimate_background(cal.data, cal.mask)
    except Exception:  # each measurement then estimates it, and reports a failure, by itself
        background = None
    _measure_psf(cal, job, scale, background, metrics, failed)
    _measure_photometry(cal, job, wcs, scale, background, metrics, failed)

    calibrated = None
    if job.out_path is not None:
        try:
            calibrated = _write_calibrated(job.out_path, cal.data, cal.mask, raw_header, wcs,
                                           path, job)
        except (OSError, UnsafePathError) as exc:
            failed["calibrated_file"] = f"cannot write {job.out_path}: {exc}"
    letter, flags = grade(metrics, job.grades)
    error = "; ".join(f"{k}: {v}" for k, v in failed.items()) or None
    return QCOutcome(QCStatus.DONE, error, metrics, failed, letter, flags, calibrated,
                     time.perf_counter() - start)


def _calibrated(
    raw: NDArray[np.float32], masters: list[tuple[NDArray[np.float32], NDArray[np.bool_]]],
    job: QCJob,
) -> CalibratedFrame:

    """The calibrated frame, its mask the union of the masters' and the low/NaN flat pixels."""
    (bias, bias_bad), (dark, dark_bad), (flat, flat_bad) = masters
    masters.clear()  # the caller's list is ours: the masks below are freed as they are used
    bad = bias_bad | dark_bad  # in place from here on: frame-sized temporaries are costly
    bad |= flat_bad
    flat_ok = np.greater_equal(flat, job.min_flat_value)
    bad |= np.invert(flat_ok, out=flat_ok)  # below min_flat_value or NaN
    del bias_bad, dark_bad, flat_bad, flat_ok
    return calibrate(raw, job.exptime_s, bias, dark, flat,
                     saturation_adu=job.detector.saturation_adu, bad_mask=bad)


def _measure_psf(
    cal: CalibratedFrame, job: QCJob, scale: float, background: SkyBackground | None,
    metrics: dict[str, Any], failed: dict[str, str],
) -> None:
    """PSF metrics into ``metrics`` (its reason into ``failed``); one failure keeps the others."""
    det = job.detector
    try:
        # Unmasked data: saturated stars must keep their high peaks to be rejected as such.
        psf = measure_psf(
            cal.data, saturation_adu=det.saturation_adu - det.bias_level_adu,
            gain_e_per_adu=det.gain_e_per_adu, pixel_scale_arcsec=scale,
            max_stars=job.psf_max_stars,
            background=None if background is None else background.back,
            background_rms=None if background is None else background.global_rms,
        )
        metrics.update(_psf_metrics(psf, scale))
        if psf.error:
            failed["psf"] = psf.error
    except Exception as exc:  # one measurement failing keeps the others
        metrics.update({"fwhm_px": None, "fwhm_arcsec": None, "n_psf_stars": 0})
        failed["psf"] = f"{type(exc).__name__}: {exc}"


def _measure_photometry(
    cal: CalibratedFrame, job: QCJob, wcs: WCS | None, scale: float,
    background: SkyBackground | None, metrics: dict[str, Any], failed: dict[str, str],
) -> None:
    """Sky, zeropoint and depth into ``metrics`` (reasons into ``failed``)."""
    catalogue = None
    if job.refcat_path is None:
        failed["zeropoint"] = "no reference catalogue configured (qc.refcat.path)"
    elif wcs is not None:
        try:
            catalogue = load_catalogue(job.refcat_path, job.catalogue)
        except (OSError, ValueError) as exc:
            failed["zeropoint"] = f"reference catalogue: {exc}"
    det = job.detector
    try:
        phot = measure_photometry(
            cal.data, cal.mask, exptime_s=job.exptime_s, wcs=wcs, catalogue=catalogue,
            filter_name=job.filter_name or "", fwhm_px=metrics.get("fwhm_px"),
            pixel_scale_arcsec=scale, gain_e_per_adu=det.gain_e_per_adu,
            read_noise_e=det.read_noise_e, params=job.photometry, background=background,
        )
        metrics.update(_phot_metrics(phot))
        if phot.error and "zeropoint" not in failed:
            reason = phot.error
            if wcs is None and job.wcs_note:
                reason = f"no WCS ({job.wcs_note}): zeropoint not measured"
            failed["zeropoint"] = reason
    except Exception as exc:
        failed["photometry"] = f"{type(exc).__name__}: {exc}"
