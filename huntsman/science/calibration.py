"""Calibration of a raw frame with master bias, dark and flat."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from astropy.io import fits

__all__ = ["CalibratedFrame", "calibrate", "load_master"]


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

    data: np.ndarray
    mask: np.ndarray


def calibrate(
    raw: np.ndarray,
    exptime_s: float,
    bias: np.ndarray,
    dark_rate: np.ndarray,
    flat: np.ndarray,
    *,
    saturation_adu: float = 4094,
    bad_mask: np.ndarray | None = None,
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
        Raw pixels at or above this value are masked.
    bad_mask : numpy.ndarray of bool or int, shape (ny, nx), optional
        Non-zero for known bad pixels (e.g. the union of the masters' masks).

    Returns
    -------
    CalibratedFrame
    """
    shape = raw.shape
    if raw.ndim != 2:
        raise ValueError(f"raw frame must be 2-D, got shape {shape}")
    named = {"bias": bias, "dark_rate": dark_rate, "flat": flat}
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


def load_master(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a master written by :mod:`huntsman.science.masters`.

    Returns
    -------
    image : numpy.ndarray, float32, shape (ny, nx)
        The primary image.
    mask : numpy.ndarray, bool, shape (ny, nx)
        True where the ``MASK`` extension is non-zero (all False if there is none).
    """
    with fits.open(path) as hdul:
        image = np.asarray(hdul[0].data, dtype=np.float32)
        if image.ndim != 2:
            raise ValueError(f"{path}: primary HDU is not a 2-D image")
        mask = (
            np.asarray(hdul["MASK"].data) != 0
            if "MASK" in hdul
            else np.zeros(image.shape, dtype=bool)
        )
    return image, mask
