"""Synthetic Huntsman frames with known truth, for tests and benchmarks.

Frames carry the real Huntsman header keyword set (as written by the control software) and
pixel data stored the way the cameras store it: 16-bit unsigned via ``BZERO = 32768``, 12-bit
ADC range.  Stars are elliptical Moffat profiles integrated over the pixel by supersampling.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits

__all__ = [
    "CameraModel",
    "MoffatPSF",
    "StarField",
    "huntsman_header",
    "moffat_alpha",
    "render_frame",
    "render_stars",
    "write_raw",
]

FULL_SHAPE = (3672, 5496)
SATURATION_ADU = 4094


@dataclasses.dataclass(frozen=True)
class CameraModel:
    """Detector parameters of a synthetic ZWO ASI183MM Pro."""

    gain_e_per_adu: float = 1.145
    read_noise_e: float = 2.4
    bias_adu: float = 32.0
    dark_e_per_s: float = 0.005
    saturation_adu: int = SATURATION_ADU
    pixel_scale_arcsec: float = 1.24


@dataclasses.dataclass(frozen=True)
class MoffatPSF:
    """An elliptical Moffat profile: FWHM along the major axis, axis ratio b/a, angle (deg)."""

    fwhm_px: float
    beta: float = 3.0
    axis_ratio: float = 1.0
    theta_deg: float = 0.0


@dataclasses.dataclass(frozen=True)
class StarField:
    """Pixel positions (0-based) and total fluxes (ADU) of point sources."""

    x: np.ndarray
    y: np.ndarray
    flux_adu: np.ndarray


def moffat_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width alpha for a given FWHM (same units) and beta."""
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _moffat_stamp(
    dx: np.ndarray, dy: np.ndarray, psf: MoffatPSF
) -> np.ndarray:
    """Normalised (integral 1) elliptical Moffat evaluated at offsets dx, dy (px)."""
    alpha_a = moffat_alpha(psf.fwhm_px, psf.beta)
    alpha_b = alpha_a * psf.axis_ratio
    t = np.deg2rad(psf.theta_deg)
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    r2 = (u / alpha_a) ** 2 + (v / alpha_b) ** 2
    norm = (psf.beta - 1.0) / (np.pi * alpha_a * alpha_b)
    result: np.ndarray = norm * (1.0 + r2) ** (-psf.beta)
    return result


def render_stars(
    shape: tuple[int, int],
    stars: StarField,
    psf: MoffatPSF | Sequence[MoffatPSF],
    oversample: int = 5,
    radius_fwhm: float = 6.0,
) -> np.ndarray:
    """Render point sources into an image of expected counts.

    Parameters
    ----------
    shape : (ny, nx)
        Image shape in pixels.
    stars : StarField
        Positions (0-based pixel centres) and total fluxes in ADU.
    psf : MoffatPSF or sequence of MoffatPSF
        One PSF for all stars, or one per star (for a PSF that varies over the field).
    oversample : int
        Sub-pixels per pixel side used to integrate the profile over each pixel.
    radius_fwhm : float
        Stamp half-size in units of the FWHM; flux beyond it is dropped (< 0.5% for beta >= 2.5).

    Returns
    -------
    numpy.ndarray, float64, shape ``shape``
        Expected counts (ADU) per pixel, noiseless.
    """
    image = np.zeros(shape, dtype=np.float64)
    ny, nx = shape
    psfs = [psf] * len(stars.x) if isinstance(psf, MoffatPSF) else list(psf)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    for x0, y0, flux, p in zip(stars.x, stars.y, stars.flux_adu, psfs, strict=True):
        half = int(np.ceil(radius_fwhm * p.fwhm_px))
        xc, yc = round(x0), round(y0)
        xa, xb = max(xc - half, 0), min(xc + half + 1, nx)
        ya, yb = max(yc - half, 0), min(yc + half + 1, ny)
        if xa >= xb or ya >= yb:
            continue
        gx = (np.arange(xa, xb)[:, None] + sub[None, :]).ravel() - x0
        gy = (np.arange(ya, yb)[:, None] + sub[None, :]).ravel() - y0
        dx, dy = np.meshgrid(gx, gy)
        prof = _moffat_stamp(dx, dy, p)
        prof = prof.reshape(yb - ya, oversample, xb - xa, oversample).mean(axis=(1, 3))
        image[ya:yb, xa:xb] += flux * prof
    return image


def render_frame(
    shape: tuple[int, int],
    *,
    exptime_s: float,
    camera: CameraModel = CameraModel(),
    sky_adu: float = 0.0,
    stars: StarField | None = None,
    psf: MoffatPSF | Sequence[MoffatPSF] | None = None,
    flat: np.ndarray | None = None,
    bias_pattern: np.ndarray | None = None,
    hot_pixels: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Render a raw frame in ADU (uint16, clipped at the ADC range).

    The signal chain is: (sky + stars) * flat + dark current, Poisson noise in electrons, read
    noise, then bias level (plus ``bias_pattern``).  ``hot_pixels`` is ``(y, x, rate_adu_per_s)``.
    All inputs are left unmodified.
    """
    rng = np.random.default_rng(seed)
    signal = np.full(shape, float(sky_adu), dtype=np.float64)
    if stars is not None and len(stars.x):
        if psf is None:
            raise ValueError("psf is required when stars are given")
        signal += render_stars(shape, stars, psf)
    if flat is not None:
        signal *= flat
    signal += camera.dark_e_per_s * exptime_s / camera.gain_e_per_adu
    if hot_pixels is not None:
        hy, hx, rate = hot_pixels
        signal[hy, hx] += rate * exptime_s
    electrons = rng.poisson(np.clip(signal, 0, None) * camera.gain_e_per_adu).astype(np.float64)
    adu = electrons / camera.gain_e_per_adu
    adu += rng.normal(0.0, camera.read_noise_e / camera.gain_e_per_adu, size=shape)
    adu += camera.bias_adu
    if bias_pattern is not None:
        adu += bias_pattern
    return np.clip(np.rint(adu), 0, camera.saturation_adu).astype(np.uint16)


def huntsman_header(
    *,
    observation_type: str,
    camera_id: str = "TESTCAM03",
    serial: str = "371d420013090900",
    filter_name: str = "g_band",
    exptime_s: float = 300.0,
    date_obs: dt.datetime | None = None,
    field: str | None = None,
    ra_deg: float | None = 65.0,
    dec_deg: float | None = -54.94,
    airmass: float | None = 1.1,
    ccd_temp_c: float = 0.5,
) -> fits.Header:
    """A header with the keyword set the Huntsman control software writes.

    ``observation_type`` is one of bias, dark, flat, science; it is encoded the Huntsman way
    (``IMAGETYP`` + ``FIELD``).  ``None`` pointing values are written as ``''`` as the control
    software does.
    """
    date_obs = date_obs or dt.datetime(2021, 1, 18, 11, 26, 32, 228000, tzinfo=dt.UTC)
    imagetyp, default_field = {
        "bias": ("Dark Frame", "Bias"),
        "dark": ("Dark Frame", "Dark"),
        "flat": ("Light Frame", "FlatDither00"),
        "science": ("Light Frame", "DoradoGroup-p0p0"),
    }[observation_type]
    if observation_type == "bias":
        exptime_s = 1e-32
    if observation_type in ("bias", "dark"):
        filter_name = "UNKNOWN"
    stamp = date_obs.strftime("%Y%m%dT%H%M%S")
    h = fits.Header()
    cards: list[tuple[str, object, str]] = [
        ("INSTRUME", serial, "Camera ID"),
        ("DATE-OBS", date_obs.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3], "Start of exposure"),
        ("EXPTIME", exptime_s, "Seconds"),
        ("IMAGETYP", imagetyp, ""),
        ("FILTER", filter_name, ""),
        ("EGAIN", 1.144744515419006, "Electrons/ADU"),
        ("BITDEPTH", 12, "ADC bit depth"),
        ("CCD-TEMP", ccd_temp_c, "Degrees C"),
        ("SET-TEMP", 0.0, "Degrees C"),
        ("COOL-POW", 27.0, "Percentage"),
        ("CAM-ID", camera_id, "Camera serial number"),
        ("CAM-NAME", "192.168.80.140", "Camera name"),
        ("CAM-MOD", "ZWO ASI183MM Pro", "Camera model"),
        ("FOC-NAME", "Birger Focuser", "Focuser name"),
        ("FOC-POS", 22181, "Focuser position"),
        ("LENSINFO", "400mm,f28", "Attached lens"),
        ("FW-NAME", "ZWO Filter Wheel", "Filter wheel name"),
        ("CAM-GAIN", 100, "Internal units"),
        ("XPIXSZ", 2.4, "Microns"),
        ("YPIXSZ", 2.4, "Microns"),
        ("IMAGEID", f"HUNTS01_{serial}_{stamp}", ""),
        ("SEQID", f"HUNTS01_{serial}_{stamp}", ""),
        ("FIELD", field if field is not None else default_field, ""),
        ("RA-MNT", "" if ra_deg is None else ra_deg, "Degrees"),
        ("HA-MNT", 0.9161478136952033, "Degrees"),
        ("DEC-MNT", "" if dec_deg is None else dec_deg, "Degrees"),
        ("EQUINOX", 2000.0, ""),
        ("AIRMASS", "" if airmass is None else airmass, "Sec(z)"),
        ("LAT-OBS", -31.16, "Degrees"),
        ("LONG-OBS", 149.13, "Degrees"),
        ("ELEV-OBS", 1160.0, "Meters"),
        ("CREATOR", "POCSvunknown", "POCS Software version"),
        ("OBSERVER", "Huntsman", "PANOPTES Unit ID"),
        ("ORIGIN", "Project PANOPTES", ""),
    ]
    for key, value, comment in cards:
        h[key] = (value, comment)
    return h


def write_raw(path: str | Path, data: np.ndarray, header: fits.Header) -> Path:
    """Write a raw frame as the cameras do: BITPIX 16 with BZERO 32768 (unsigned 16-bit)."""
    path = Path(path)
    hdu = fits.PrimaryHDU(data=np.asarray(data, dtype=np.uint16), header=header.copy())
    hdu.writeto(path, overwrite=True)
    return path
