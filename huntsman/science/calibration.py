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
    raw32 = np.asarray(raw, dtype=np.float32)
    data = raw32 - bias.astype(np.float32, copy=False)
    data -= np.float32(exptime_s) * dark_rate.astype(np.float32, copy=False)
    flat32 = flat.astype(np.float32, copy=False)
    good_flat = np.isfinite(flat32) & (flat32 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        data /= flat32
    data[~good_flat] = np.nan
    mask = raw32 >= saturation_adu
    mask |= ~np.isfinite(data)
    if bad_mask is not None:
        mask |= bad_mask.astype(bool)
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
