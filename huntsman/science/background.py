"""Sky background and source detection: the one ``sep`` mesh policy of the science layer.

Every background in the service (ingest metrics, PSF, plate-solve source lists, QC photometry)
is a :class:`sep.Background` with :data:`BOX_PX`-pixel meshes and a :data:`FILTER_SIZE`-mesh
median filter, built by :func:`sep_background`; detections are :func:`detect` on the
background-subtracted frame.  64 px meshes are ~15 FWHM of a 3.5 px Huntsman PSF: large enough
that a star does not pull its mesh up, small enough to follow vignetting and twilight gradients.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import sep
from numpy.typing import NDArray

from huntsman.science.stats import subsample

__all__ = [
    "BOX_PX",
    "FILTER_SIZE",
    "SkyBackground",
    "detect",
    "estimate_background",
    "sep_background",
]

BOX_PX = 64  # mesh size, px
FILTER_SIZE = 3  # median filter over meshes


def sep_background(image: NDArray[np.float32], bad: NDArray[np.bool_] | None = None) -> Any:
    """:class:`sep.Background` of a C-contiguous float32 ``image`` with the service's mesh.

    ``bad`` (bool, same shape) marks pixels the meshes ignore.
    """
    mask = None if bad is None else bad.view(np.uint8)
    return sep.Background(image, mask=mask, bw=BOX_PX, bh=BOX_PX, fw=FILTER_SIZE, fh=FILTER_SIZE)


def detect(
    sub: NDArray[np.float32], threshold_sigma: float, rms: float, *, minarea: int = 5,
    deblend_cont: float | None = None,
) -> NDArray[np.void]:
    """``sep.extract`` of a background-subtracted float32 frame at ``threshold_sigma``·``rms``.

    The pixel stack grows with the frame (a full 20 Mpx frame of a dense field overflows sep's
    default), so a crowded frame is measured rather than refused.  ``deblend_cont`` None keeps
    sep's default.
    """
    sep.set_extract_pixstack(max(300_000, sub.size // 20))
    if deblend_cont is None:
        cat: NDArray[np.void] = sep.extract(sub, threshold_sigma, err=rms, minarea=minarea)
    else:
        cat = sep.extract(sub, threshold_sigma, err=rms, minarea=minarea,
                          deblend_cont=deblend_cont)
    return cat


@dataclasses.dataclass(frozen=True)
class SkyBackground:
    """The background of a calibrated frame (see :func:`estimate_background`).

    Computed once per frame and shared: :func:`~huntsman.science.photometry.measure_photometry`
    takes it as ``background=`` and :func:`huntsman.science.psf.measure_psf` takes ``back`` and
    ``global_rms`` as ``background=`` and ``background_rms=``.
    """

    image: NDArray[np.float32]  # the frame, float32, bad pixels 0 (aperture sums use local annuli)
    sub: NDArray[np.float32]  # background-subtracted frame, float32, bad pixels 0 (centroiding)
    back: NDArray[np.float32]  # background map, float32
    rms: NDArray[np.float32]  # RMS map, float32
    bad: NDArray[np.bool_]  # bool, masked or non-finite
    sky_adu: float
    sky_rms_adu: float
    global_rms: float  # sep's global RMS of the unmasked pixels (a detection threshold)


def estimate_background(
    data: NDArray[np.number[Any]], mask: NDArray[np.bool_ | np.integer[Any]] | None
) -> SkyBackground:
    """Background (:func:`sep_background` over the unmasked, finite pixels) of a calibrated frame.

    Parameters
    ----------
    data : numpy.ndarray, shape (ny, nx)
        Calibrated frame; not modified.
    mask : numpy.ndarray of bool, shape (ny, nx), or None
        True for pixels to ignore; non-finite pixels are always ignored.

    Returns
    -------
    SkyBackground
        ``sky_adu`` and ``sky_rms_adu`` are the medians of the background and RMS maps over
        the unmasked pixels (ADU per pixel).
    """
    if data.ndim != 2:
        raise ValueError(f"data must be 2-D, got shape {data.shape}")
    work = np.array(data, dtype=np.float32, order="C", copy=True)
    bad = ~np.isfinite(work)
    if mask is not None:
        if mask.shape != work.shape:
            raise ValueError(f"mask shape {mask.shape} != data shape {work.shape}")
        bad |= mask if mask.dtype == bool else mask.astype(bool)
    np.putmask(work, bad, np.float32(0.0))
    bkg = sep_background(work, bad)
    back = bkg.back()
    rms = bkg.rms()
    good = ~subsample(bad)
    sky = float(np.median(subsample(back)[good])) if good.any() else math.nan
    sky_rms = float(np.median(subsample(rms)[good])) if good.any() else math.nan
    sub = np.subtract(work, back, dtype=np.float32)
    np.putmask(sub, bad, np.float32(0.0))
    return SkyBackground(work, sub, back, rms, bad, sky, sky_rms, float(bkg.globalrms))
