"""Synthetic raw science frames with known truth, and masters built from synthetic raw
calibration frames, for the QC tests and benchmark."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import math
from pathlib import Path

import numpy as np
from astropy.wcs import WCS

from huntsman.science.masters import MasterParams, build_master_bias, build_master_dark, build_master_flat
from huntsman.science.provenance import Provenance
from huntsman.testing.synthetic import (
    CameraModel,
    MoffatPSF,
    StarField,
    huntsman_header,
    render_frame,
    write_raw,
)

CAM = CameraModel()
SCALE = 1.24
PROV = Provenance("test", "000000000000")
DATE = dt.datetime(2022, 3, 1, 20, 0, tzinfo=dt.UTC)


def flat_pattern(shape: tuple[int, int]) -> np.ndarray:
    """Vignetting-like flat: a gradient and a radial fall-off, median 1."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    r2 = ((xx - nx / 2) / nx) ** 2 + ((yy - ny / 2) / ny) ** 2
    flat = (1.0 + 0.04 * xx / nx - 0.03 * yy / ny) * (1.0 - 0.15 * r2)
    return flat / np.median(flat)


def bias_pattern(shape: tuple[int, int], seed: int = 99) -> np.ndarray:
    """Fixed column structure of a few ADU (the same in every frame)."""
    rng = np.random.default_rng(seed)
    return np.broadcast_to(rng.normal(0.0, 3.0, shape[1]), shape).copy()


@dataclasses.dataclass(frozen=True)
class Masters:
    bias: str
    dark: str
    flat: str


EXPTIMES = {"bias": 0.0, "dark": 120.0, "flat": 5.0}


def write_calib_frames(
    directory: Path, shape: tuple[int, int], *, n: int = 5, camera: str = "TESTCAM01",
    filter_name: str = "g_band", seed: int = 0, date_obs: dt.datetime = DATE,
    kinds: tuple[str, ...] = ("bias", "dark", "flat"),
) -> dict[str, list[str]]:
    """Raw bias, dark and flat frames with the fixed bias and flat patterns."""
    directory.mkdir(parents=True, exist_ok=True)
    bp, fp = bias_pattern(shape), flat_pattern(shape)
    paths: dict[str, list[str]] = {k: [] for k in kinds}
    for kind in kinds:
        for i in range(n):
            t = EXPTIMES[kind]
            data = render_frame(
                shape, exptime_s=t, camera=CAM, sky_adu=2000.0 if kind == "flat" else 0.0,
                flat=fp if kind == "flat" else None, bias_pattern=bp,
                seed=seed * 1000 + 100 * len(kind) + i,
            )
            header = huntsman_header(observation_type=kind, camera_id=camera, exptime_s=t,
                                     filter_name=filter_name,
                                     date_obs=date_obs + dt.timedelta(minutes=i))
            name = f"{kind}_{camera}_{seed}_{i}.fits"
            paths[kind].append(str(write_raw(directory / name, data, header)))
    return paths


def make_masters(
    directory: Path, shape: tuple[int, int], *, n: int = 5, camera: str = "TESTCAM01",
    filter_name: str = "g_band", seed: int = 0,
) -> Masters:
    """Masters combined by :mod:`huntsman.science.masters` from synthetic raw frames, as the
    CalibService does."""
    paths = write_calib_frames(directory, shape, n=n, camera=camera, filter_name=filter_name,
                               seed=seed)
    params = MasterParams(memory_limit_mb=1024)
    bias = str(directory / "master_bias.fits")
    dark = str(directory / "master_dark.fits")
    flat = str(directory / "master_flat.fits")
    build_master_bias(paths["bias"], bias, params, PROV)
    build_master_dark(paths["dark"], [EXPTIMES["dark"]] * n, dark, bias, params, PROV)
    build_master_flat(paths["flat"], flat, bias, dark, [EXPTIMES["flat"]] * n, params, PROV)
    return Masters(bias, dark, flat)


def tan_wcs(shape: tuple[int, int], rotation_deg: float, ra: float = 65.0, dec: float = -55.0) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    s, t = SCALE / 3600.0, math.radians(rotation_deg)
    w.wcs.cd = [[-s * math.cos(t), s * math.sin(t)], [s * math.sin(t), s * math.cos(t)]]
    return w


@dataclasses.dataclass(frozen=True)
class Truth:
    path: str
    refcat: str
    wcs: WCS
    fwhm_px: float  # intrinsic FWHM at the field centre
    beta: float
    axis_ratio: float
    zeropoint: float
    sky_adu: float
    exptime_s: float
    variation: float  # fractional FWHM change from centre to the left/right edges


def make_science(
    directory: Path, shape: tuple[int, int], seed: int, *, zeropoint: float = 25.0,
    sky_adu: float = 300.0, exptime_s: float = 60.0, camera: str = "TESTCAM01",
    n_stars: int = 500, n_faint: int = 1500, date_obs: dt.datetime = DATE + dt.timedelta(hours=2),
) -> Truth:
    """A raw science frame (bias pattern, dark, flat pattern, Moffat PSF varying ±5 % across the
    field) and a SkyMapper-like reference catalogue of its stars."""
    rng = np.random.default_rng(seed)
    beta = float(rng.uniform(2.5, 4.5))
    fwhm_px = float(rng.uniform(2.0, 4.5)) / SCALE
    q, theta, variation = 0.93, float(rng.uniform(0, 180)), 0.05
    wcs = tan_wcs(shape, float(rng.uniform(0, 360)))
    ny, nx = shape
    x = rng.uniform(-20, nx + 20, n_stars + n_faint)
    y = rng.uniform(-20, ny + 20, n_stars + n_faint)
    mag = np.concatenate([rng.uniform(zeropoint - 9.5, zeropoint - 3.5, n_stars),
                          rng.uniform(zeropoint - 3.5, zeropoint - 1.0, n_faint)])
    flux = exptime_s * 10 ** (-0.4 * (mag - zeropoint))
    psfs = [MoffatPSF(fwhm_px * (1 + variation * (xi - nx / 2) / (nx / 2)), beta, q, theta) for xi in x]
    raw = render_frame(shape, exptime_s=exptime_s, camera=CAM, sky_adu=sky_adu,
                       stars=StarField(x, y, flux), psf=psfs, flat=flat_pattern(shape),
                       bias_pattern=bias_pattern(shape), seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    header = huntsman_header(observation_type="science", camera_id=camera, exptime_s=exptime_s,
                             date_obs=date_obs)
    path = write_raw(directory / f"science_{seed}.fits", raw, header)
    refcat = directory / f"refcat_{seed}.csv"
    ra, dec = wcs.all_pix2world(x[:n_stars], y[:n_stars], 0)
    with refcat.open("w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["raj2000", "dej2000", "g_psf", "e_g_psf", "r_psf", "e_r_psf", "class_star", "flags"])
        for i in range(n_stars):
            err = float(rng.uniform(0.005, 0.02))
            wr.writerow([ra[i], dec[i], mag[i] + rng.normal(0, err), err, "", "", 0.98, 0])
    return Truth(str(path), str(refcat), wcs, fwhm_px, beta, q, zeropoint, sky_adu, exptime_s,
                 variation)
