"""Master bias, dark and flat frames built from raw files.

These functions run inside a worker process: they take paths and small frozen records, stream
the raw frames through :func:`~huntsman.science.stacking.sigma_clipped_combine`, write the master
atomically and return a small :class:`MasterResult`.

Output file layout (every master):

- primary HDU: float32 image — bias in ADU, dark in ADU/s, flat normalised to median 1;
  header with ``CALTYPE``, ``BUNIT``, ``NCOMBINE``, clipping parameters, the camera keywords of
  the first input and the provenance cards of :mod:`huntsman.science.provenance`;
- ``UNCERT``: float32 standard error of each pixel (same unit; NaN where < 2 frames survived);
- ``NUSED``: uint16 number of frames that survived clipping per pixel;
- ``MASK``: uint8 bad-pixel mask, bit 1 = hot (darks: rate above the median by more than
  ``hot_sigma`` robust standard deviations), bit 2 = dead/cold (flats: response below
  ``dead_fraction``), bit 4 = no valid value.  Bias masks only carry bit 4.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from numpy.typing import NDArray

from huntsman.models import MasterParams  # the calib.stack config section validates it
from huntsman.science.fitsio import image_hdu_index, write_fits_atomic
from huntsman.science.provenance import Provenance, stamp_header
from huntsman.science.robust import mad_std
from huntsman.science.stacking import CombineResult, FitsFrameSource, sigma_clipped_combine
from huntsman.science.stats import subsample

__all__ = [
    "MASK_DEAD",
    "MASK_HOT",
    "MASK_NODATA",
    "MasterParams",
    "MasterResult",
    "MasterStatistics",
    "build_master_bias",
    "build_master_dark",
    "build_master_flat",
    "frame_level",
]

MASK_HOT = 1
MASK_DEAD = 2
MASK_NODATA = 4

# Camera identity copied from the first input so a master is self-describing.
_COPIED_KEYWORDS = ("INSTRUME", "CAM-ID", "CAM-MOD", "FILTER", "CAM-GAIN", "SET-TEMP")


@dataclasses.dataclass(frozen=True)
class MasterStatistics:
    """Summary of a master: ``level`` median, ``noise`` robust std (MAD σ,
    :func:`~huntsman.science.robust.mad_std`), in the master's unit; bad-pixel counts from the
    mask."""

    level: float
    noise: float
    bad_pixel_fraction: float
    n_hot: int
    n_dead: int


@dataclasses.dataclass(frozen=True)
class MasterResult:
    """What a worker returns after writing a master."""

    out_path: str
    calib_type: str
    n_frames: int
    shape: tuple[int, int]
    statistics: MasterStatistics
    input_paths: tuple[str, ...]


def _first_header(path: str | Path) -> fits.Header:
    with fits.open(path) as hdul:
        return hdul[image_hdu_index(hdul)].header.copy()


def _robust(image: NDArray[np.floating[Any]]) -> tuple[float, float]:
    sample = subsample(image)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return float("nan"), float("nan")
    med = float(np.median(sample))
    return med, mad_std(sample, med)


def _write_master(
    calib_type: str,
    unit: str,
    image: NDArray[np.floating[Any]],
    combined: CombineResult,
    mask: NDArray[np.uint8],
    paths: Sequence[str | Path],
    out_path: str | Path,
    params: MasterParams,
    provenance: Provenance,
    masters: dict[str, str],
    uncertainty: NDArray[np.floating[Any]] | None = None,
) -> MasterResult:
    used = [p for p, f in zip(paths, combined.frame_valid_fraction, strict=True) if f > 0]
    header = fits.Header()
    first = _first_header(paths[0])
    for key in _COPIED_KEYWORDS:
        if key in first:
            header[key] = (first[key], first.comments[key])
    header["CALTYPE"] = (calib_type, "master calibration type")
    header["BUNIT"] = (unit, "unit of the image")
    header["NCOMBINE"] = (len(used), "frames combined")
    header["CLIPSIG"] = (params.sigma, "sigma-clipping threshold")
    header["CLIPITER"] = (params.maxiters, "sigma-clipping max iterations")
    header = stamp_header(header, provenance, [str(p) for p in paths], masters)
    uncert = combined.uncertainty if uncertainty is None else uncertainty
    hdul = fits.HDUList(
        [
            fits.PrimaryHDU(np.asarray(image, dtype=np.float32), header=header),
            fits.ImageHDU(np.asarray(uncert, dtype=np.float32), name="UNCERT"),
            fits.ImageHDU(combined.n_used, name="NUSED"),
            fits.ImageHDU(mask.astype(np.uint8), name="MASK"),
        ]
    )
    write_fits_atomic(out_path, hdul)
    level, noise = _robust(image)
    n_hot = int(np.count_nonzero(mask & MASK_HOT))
    n_dead = int(np.count_nonzero(mask & MASK_DEAD))
    return MasterResult(
        out_path=str(out_path),
        calib_type=calib_type,
        n_frames=len(used),
        shape=(int(image.shape[0]), int(image.shape[1])),
        statistics=MasterStatistics(
            level=level,
            noise=noise,
            bad_pixel_fraction=float(np.count_nonzero(mask)) / mask.size,
            n_hot=n_hot,
            n_dead=n_dead,
        ),
        input_paths=tuple(str(p) for p in paths),
    )


def _check_inputs(paths: Sequence[str | Path], exptimes: Sequence[float] | None) -> None:
    if not paths:
        raise ValueError("no input frames")
    if exptimes is not None:
        if len(exptimes) != len(paths):
            raise ValueError(f"{len(exptimes)} exposure times for {len(paths)} frames")
        if not all(np.isfinite(t) and t > 0 for t in exptimes):
            raise ValueError("exposure times must be positive")


def _nodata_mask(combined: CombineResult) -> NDArray[np.uint8]:
    mask = np.zeros(combined.data.shape, dtype=np.uint8)
    mask[combined.n_used == 0] = MASK_NODATA
    return mask


def build_master_bias(
    paths: Sequence[str | Path],
    out_path: str | Path,
    params: MasterParams,
    provenance: Provenance,
) -> MasterResult:
    """Sigma-clipped mean of raw bias frames, in ADU; written to ``out_path``.

    Parameters
    ----------
    paths : sequence of path
        Raw bias frames of one camera, all of shape (ny, nx).
    """
    _check_inputs(paths, None)
    combined = sigma_clipped_combine(
        list(paths),
        sigma=params.sigma,
        maxiters=params.maxiters,
        memory_limit_mb=params.memory_limit_mb,
        io_threads=params.io_threads,
    )
    return _write_master(
        "bias", "adu", combined.data, combined, _nodata_mask(combined),
        paths, out_path, params, provenance, {},
    )


def build_master_dark(
    paths: Sequence[str | Path],
    exptimes: Sequence[float],
    out_path: str | Path,
    master_bias_path: str | Path,
    params: MasterParams,
    provenance: Provenance,
) -> MasterResult:
    """Dark-current rate master in ADU/s: each frame bias-subtracted and divided by its
    exposure time (s), so darks of different exposure times combine; hot pixels masked.

    Parameters
    ----------
    paths, exptimes : sequences of the same length
        Raw dark frames (ny, nx) and their exposure times in seconds (> 0).
    master_bias_path : path
        Master bias (ADU) of the same camera and shape.
    """
    _check_inputs(paths, exptimes)
    combined = sigma_clipped_combine(
        list(paths),
        sigma=params.sigma,
        maxiters=params.maxiters,
        bias=FitsFrameSource(master_bias_path),
        scales=np.asarray(exptimes, dtype=np.float64),
        memory_limit_mb=params.memory_limit_mb,
        io_threads=params.io_threads,
    )
    mask = _nodata_mask(combined)
    level, noise = _robust(combined.data)
    with np.errstate(invalid="ignore"):
        mask[combined.data > level + params.hot_sigma * noise] |= MASK_HOT
    return _write_master(
        "dark", "adu/s", combined.data, combined, mask,
        paths, out_path, params, provenance, {"bias": str(master_bias_path)},
    )


def frame_level(
    source: FitsFrameSource,
    *,
    region_fraction: float = 0.5,
    bias: FitsFrameSource | None = None,
    dark_rate: FitsFrameSource | None = None,
    exptime_s: float = 0.0,
) -> float:
    """Median (ADU) of the central region of a frame after bias and dark subtraction.

    Only the central ``region_fraction`` of the rows is read, so memory stays at a fraction of
    one frame; columns are restricted to the same central fraction.
    """
    ny, nx = source.shape
    y0 = int(ny * (1 - region_fraction) / 2)
    x0 = int(nx * (1 - region_fraction) / 2)
    y1, x1 = max(ny - y0, y0 + 1), max(nx - x0, x0 + 1)
    region = source.read_rows(y0, y1)[:, x0:x1]
    if bias is not None:
        region -= bias.read_rows(y0, y1)[:, x0:x1]
    if dark_rate is not None:
        region -= np.float32(exptime_s) * dark_rate.read_rows(y0, y1)[:, x0:x1]
    sample = subsample(region)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        raise ValueError(f"{source.name}: no finite pixels in the central region")
    return float(np.median(sample))


def build_master_flat(
    paths: Sequence[str | Path],
    out_path: str | Path,
    master_bias_path: str | Path,
    master_dark_path: str | Path | None,
    exptimes: Sequence[float],
    params: MasterParams,
    provenance: Provenance,
) -> MasterResult:
    """Flat-field master normalised to median 1, with dead/cold pixels masked.

    Each frame is bias- and dark-subtracted (dark rate × exposure time), divided by the median
    of its central region (:func:`frame_level`), the normalised frames are sigma-clip
    combined, and the result is divided by its median.

    Parameters
    ----------
    paths, exptimes : sequences of the same length
        Raw flat frames of one camera and filter, (ny, nx), and exposure times in seconds.
    master_bias_path, master_dark_path : path
        Master bias (ADU) and dark rate (ADU/s); the dark may be ``None`` (no dark
        subtraction, e.g. when the dark current is negligible for twilight flats).

    Raises
    ------
    ValueError
        A frame whose bias-subtracted level is not positive.
    """
    _check_inputs(paths, exptimes)
    bias = FitsFrameSource(master_bias_path)
    dark = None if master_dark_path is None else FitsFrameSource(master_dark_path)
    levels = []
    for path, t in zip(paths, exptimes, strict=True):
        level = frame_level(
            FitsFrameSource(path), region_fraction=params.flat_region_fraction,
            bias=bias, dark_rate=dark, exptime_s=t,
        )
        if not level > 0:
            raise ValueError(f"{path}: calibrated flat level {level:.3g} ADU is not positive")
        levels.append(level)
    combined = sigma_clipped_combine(
        list(paths),
        sigma=params.sigma,
        maxiters=params.maxiters,
        bias=bias,
        dark_rate=dark,
        exptimes=np.asarray(exptimes, dtype=np.float64),
        scales=np.asarray(levels),
        memory_limit_mb=params.memory_limit_mb,
        io_threads=params.io_threads,
    )
    finite = combined.data[np.isfinite(combined.data)]
    if finite.size == 0:
        raise ValueError("master flat has no valid pixels")
    norm = np.float32(np.median(finite))
    del finite
    image = combined.data / norm
    uncert = combined.uncertainty / norm
    mask = _nodata_mask(combined)
    with np.errstate(invalid="ignore"):
        mask[image < params.dead_fraction] |= MASK_DEAD
    masters = {"bias": str(master_bias_path)}
    if master_dark_path is not None:
        masters["dark"] = str(master_dark_path)
    return _write_master(
        "flat", "", image, combined, mask, paths, out_path, params, provenance, masters,
        uncertainty=uncert,
    )
