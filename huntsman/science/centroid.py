"""Star centroids: from predicted positions to windowed centroids on the frame.

Used by the photometry to place apertures on catalogue stars projected through the WCS.
"""

from __future__ import annotations

import math

import numpy as np
import sep
from numpy.typing import NDArray
from scipy.ndimage import uniform_filter

__all__ = ["refine_positions"]

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def refine_positions(
    sub: NDArray[np.float32], bad: NDArray[np.bool_], x0: NDArray[np.float64],
    y0: NDArray[np.float64], search_px: float, fwhm_px: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:

    """Brightest 3×3 spot within ``search_px`` of each prediction, then a windowed centroid.

    Parameters
    ----------
    sub : numpy.ndarray, float32, shape (ny, nx)
        Background-subtracted frame, bad pixels 0.
    bad : numpy.ndarray of bool, shape (ny, nx)
        Pixels the centroid ignores.
    x0, y0 : numpy.ndarray, shape (n,)
        Predicted 0-based positions (px), e.g. catalogue stars through the WCS.
    search_px : float
        Largest offset of the measured from the predicted position (px).
    fwhm_px : float
        Stellar FWHM (px): the window of ``sep.winpos`` is its Gaussian σ.

    Returns
    -------
    x, y : numpy.ndarray, shape (n,)
        Windowed centroids (px).
    ok : numpy.ndarray of bool, shape (n,)
        The centroid converged, stayed near the peak and within ``search_px`` (+0.5) of the
        prediction.
    """
    ny, nx = sub.shape
    s = math.ceil(search_px)
    xp = np.array(x0, dtype=float)
    yp = np.array(y0, dtype=float)
    xc, yc = np.rint(xp).astype(np.intp), np.rint(yp).astype(np.intp)
    # Stars whose (2s+3)^2 cut-out lies inside the frame: all at once (in chunks); the rest
    # (cut-outs clipped at an edge, whose 3x3 filter sees a different border) one by one.
    whole = (xc - s - 1 >= 0) & (xc + s + 2 <= nx) & (yc - s - 1 >= 0) & (yc + s + 2 <= ny)
    off = np.arange(-s - 1, s + 2)
    width = off.size
    todo = np.flatnonzero(whole)
    for chunk in np.array_split(todo, max(1, todo.size * width * width // 2_000_000 + 1)):
        if chunk.size == 0:
            continue
        gx = xc[chunk, None] + off  # (n, w)
        gy = yc[chunk, None] + off
        cut = uniform_filter(sub[gy[:, :, None], gx[:, None, :]].astype(np.float64),
                             size=(1, 3, 3), mode="nearest")
        far = np.hypot((gx - xp[chunk, None])[:, None, :], (gy - yp[chunk, None])[:, :, None])
        cut[far > search_px] = -np.inf
        k = np.argmax(cut.reshape(chunk.size, -1), axis=1)
        yp[chunk] = gy[:, 0] + k // width
        xp[chunk] = gx[:, 0] + k % width
    for i in np.flatnonzero(~whole):
        xi, yi = x0[i], y0[i]
        xa, xb, ya, yb = max(xc[i] - s - 1, 0), min(xc[i] + s + 2, nx), max(yc[i] - s - 1, 0), \
            min(yc[i] + s + 2, ny)
        cut1 = uniform_filter(sub[ya:yb, xa:xb].astype(np.float64), size=3, mode="nearest")
        my, mx = np.mgrid[ya:yb, xa:xb]
        cut1[np.hypot(mx - xi, my - yi) > search_px] = -np.inf
        k1 = int(np.argmax(cut1))
        yp[i], xp[i] = ya + k1 // cut1.shape[1], xa + k1 % cut1.shape[1]
    sig = max(fwhm_px * _FWHM_TO_SIGMA, 0.5)
    xw, yw, flag = sep.winpos(sub, xp, yp, sig, mask=bad.view(np.uint8))
    ok = (flag == 0) & np.isfinite(xw) & np.isfinite(yw)
    ok &= np.hypot(xw - xp, yw - yp) <= max(2.0, 0.5 * fwhm_px)
    ok &= np.hypot(xw - x0, yw - y0) <= search_px + 0.5
    return np.asarray(xw, float), np.asarray(yw, float), ok
