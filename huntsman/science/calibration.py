"""Calibration of a raw frame with master bias, dark and flat."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from numpy.typing import NDArray

from huntsman.science.fitsio import find_image_hdu

__all__ = ["MAX_CROP_PX", "CalibratedFrame", "calibrate", "load_master"]

# Pipeline masters may be one row/column larger than the raw frame (LSST ExposureF: 801x801
# for an 800x800 raw); a larger mismatch is an error.
MAX_CROP_PX = 1


@dataclasses.dataclass(frozen=True, eq=False)
class CalibratedFrame:
    """A calibrated frame.

    Attributes
    ----------
    data : numpy.ndarray, float32, shape (ny, nx)
        (raw − bias − dark_rate × exptime) / flat in ADU (flat has median 1); NaN where the
        flat is not positive or not finite.
    mask : numpy.ndarray, bool, shape (ny, nx)
        True for saturated, bad (master mask) and non-finite pixels.
    """

    data: NDArray[np.float32]
    mask: NDArray[np.bool_]


def calibrate(
    raw: NDArray[np.number[Any]],
    exptime_s: float,
    bias: NDArray[np.floating[Any]],
    dark_rate: NDArray[np.floating[Any]],
    flat: NDArray[np.floating[Any]],
    *,
    saturation_adu: float,
    bad_mask: NDArray[np.bool_ | np.integer[Any]] | None = None,
) -> CalibratedFrame:
    """Bias-, dark- and flat-correct a raw frame; no input is modified.

    Parameters
    ----------
    raw : numpy.ndarray, shape (ny, nx)
        Raw frame in ADU (uint16 or float).
    exptime_s : float
        Exposure time in seconds (the dark rate is scaled by it).
    bias : numpy.ndarray, shape (ny, nx)
        Master bias in ADU.
    dark_rate : numpy.ndarray, shape (ny, nx)
        Master dark current in ADU/s.
    flat : numpy.ndarray, shape (ny, nx)
        Master flat normalised to median 1.
    saturation_adu : float
        Raw pixels at or above this value are masked (the detector's, no default).
    bad_mask : numpy.ndarray of bool or int, shape (ny, nx), optional
        Non-zero for known bad pixels (e.g. the union of the masters' masks).

    Returns
    -------
    CalibratedFrame
    """
    shape = raw.shape
    if raw.ndim != 2:
        raise ValueError(f"raw frame must be 2-D, got shape {shape}")
    named: dict[str, NDArray[np.generic]] = {"bias": bias, "dark_rate": dark_rate, "flat": flat}
    if bad_mask is not None:
        named["bad_mask"] = bad_mask
    for name, arr in named.items():
        if arr.shape != shape:
            raise ValueError(f"{name} shape {arr.shape} differs from raw shape {shape}")
    if not np.isfinite(exptime_s) or exptime_s < 0:
        raise ValueError(f"exposure time must be finite and >= 0, got {exptime_s}")
    # Row blocks of ~1 MB keep every temporary in cache (the full-frame version made eight
    # frame-sized temporaries); each pixel is computed exactly as before, in float32.
    data = np.empty(shape, dtype=np.float32)
    mask = np.empty(shape, dtype=bool)
    t = np.float32(exptime_s)
    step = max(1, (1 << 18) // max(shape[1], 1))
    for r0 in range(0, shape[0], step):
        rows = slice(r0, r0 + step)
        raw32 = np.asarray(raw[rows], dtype=np.float32)
        d = data[rows]
        np.subtract(raw32, bias[rows].astype(np.float32, copy=False), out=d)
        d -= t * dark_rate[rows].astype(np.float32, copy=False)
        flat32 = flat[rows].astype(np.float32, copy=False)
        good_flat = np.isfinite(flat32) & (flat32 > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            d /= flat32
        d[~good_flat] = np.nan
        m = mask[rows]
        np.greater_equal(raw32, saturation_adu, out=m)
        m |= ~np.isfinite(d)
        if bad_mask is not None:
            m |= bad_mask[rows].astype(bool, copy=False)
    return CalibratedFrame(data=data, mask=mask)


def load_master(
    path: str | Path, shape: tuple[int, int] | None = None
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """A master's image (float32) and bad-pixel mask (bool), cut to the raw ``shape`` if given.

    Reads both the masters written by :mod:`huntsman.science.masters` (image in the primary
    HDU, ``MASK`` extension: non-zero is bad) and the original pipeline's LSST ``ExposureF``
    masters (empty primary, image in HDU 1; their ``MASK`` bit planes are not used).  The image
    HDU is :func:`~huntsman.science.fitsio.find_image_hdu`'s.

    Parameters
    ----------
    path : str or Path
        Master FITS file.
    shape : (ny, nx) or None
        Raw frame shape: pipeline masters may be up to :data:`MAX_CROP_PX` row/column larger
        (LSST ``ExposureF``: 801x801 for an 800x800 raw) and are cut to it; a larger mismatch
        is a :class:`ValueError`.  None: the master as stored.

    Returns
    -------
    image : numpy.ndarray, float32, shape (ny, nx)
    mask : numpy.ndarray, bool, shape (ny, nx)
        True where the ``MASK`` extension is non-zero (all False if there is none).
    """
    with fits.open(path) as hdul:
        index = find_image_hdu(hdul)
        if index is None or hdul[index].data is None:
            raise ValueError(f"{path}: no 2-D image")
        image = np.asarray(hdul[index].data, dtype=np.float32)
        if image.ndim != 2:
            raise ValueError(f"{path}: image HDU is not a 2-D image")
        native = index == 0 and "MASK" in hdul
        mask = np.asarray(hdul["MASK"].data) != 0 if native else np.zeros(image.shape, bool)
    if shape is None:
        return image, mask
    ny, nx = shape
    dy, dx = image.shape[0] - ny, image.shape[1] - nx
    if not (0 <= dy <= MAX_CROP_PX and 0 <= dx <= MAX_CROP_PX):
        raise ValueError(f"{path}: master shape {image.shape} does not fit the raw shape {shape}")
    return image[:ny, :nx], mask[:ny, :nx]
