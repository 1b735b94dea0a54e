"""Robust statistics: the one MAD constant, MAD σ, and iterative MAD clipping of values and rows.

Every MAD-based estimate in the science layer (PSF scatter, master noise, annulus background,
curve of growth, zeropoint combination) uses :data:`MAD_TO_SIGMA` and the functions here.

:func:`clipped_rows` clips every row of a 2-D array at once (one row per star annulus) with the
numbers of a plain per-row loop (median, MAD, keep ``|v − median| <= nσ``, repeat): each row is
sorted once and every clipping pass is a bisection for an interval of the sorted row (no
re-sort, no copy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["MAD_TO_SIGMA", "clipped_rows", "mad_std"]

#: σ of a normal distribution per unit median absolute deviation, 1 / Φ⁻¹(3/4).
MAD_TO_SIGMA = 1.482602218505602

_Values = NDArray[np.floating[Any]]  # float32 or float64, the caller's precision is kept
_Index = NDArray[np.intp]  # row numbers and positions within sorted rows



def mad_std(
    values: NDArray[np.floating[Any]], center: float | np.floating[Any] | None = None
) -> float:
    """``MAD_TO_SIGMA · median(|values − center|)``, the centre being the median by default.

    Parameters
    ----------
    values : numpy.ndarray
        Finite values (any shape; the median is over all of them).
    center : float or None
        Centre of the deviations; ``np.median(values)`` when None.
    """
    med = np.median(values) if center is None else center
    return float(MAD_TO_SIGMA * np.median(np.abs(values - med)))


def _bisect(
    pred: Callable[[_Index, _Index], NDArray[np.bool_]], lo: _Index, hi: _Index
) -> _Index:
    """Per row, the first ``j`` in ``[lo, hi)`` with ``pred(rows, j)`` true, else ``hi``.

    ``pred`` must be monotone (False then True) along each row; it is called with the indices
    of the rows still searching and a candidate ``j`` for each.
    """
    lo, hi = lo.copy(), hi.copy()
    act = np.flatnonzero(lo < hi)
    while act.size:
        mid = (lo[act] + hi[act]) // 2
        t = pred(act, mid)
        hi[act[t]] = mid[t]
        lo[act[~t]] = mid[~t] + 1
        act = act[lo[act] < hi[act]]
    return lo


def _sorted_median(v: _Values, rows: _Index, lo: _Index, hi: _Index) -> _Values:
    """``np.median`` of ``v[rows, lo:hi]`` for rows sorted ascending (non-empty intervals)."""
    k = hi - lo
    a = v[rows, lo + (k - 1) // 2]
    b = v[rows, lo + k // 2]
    out: _Values = (a + b) / 2  # same rounding as np.median (mean of the middle pair)
    return out


def _sorted_mad(
    v: _Values, rows: _Index, lo: _Index, hi: _Index, med: _Values
) -> _Values:
    """``np.median(np.abs(v[rows, lo:hi] - med))`` for rows sorted ascending.

    The deviations left of the median and right of it are two sorted sequences; their k-th
    smallest element is found by bisection (no sort, no copy of the rows).
    """
    p = _bisect(lambda a, j: v[rows[a], j] - med[a] >= 0, lo, hi)
    n_left, n_right = p - lo, hi - p

    def left(a: _Index, t: _Index) -> _Values:  # t-th smallest deviation on the left
        out: _Values = -(v[rows[a], p[a] - 1 - t] - med[a])
        return out

    def right(a: _Index, t: _Index) -> _Values:
        out: _Values = v[rows[a], p[a] + t] - med[a]
        return out

    def kth(q: _Index) -> _Values:
        # i = how many of the q+1 smallest deviations lie on the left.
        i_lo = np.maximum(0, q + 1 - n_right)
        i_hi = np.minimum(q + 1, n_left)

        def enough(a: _Index, i: _Index) -> NDArray[np.bool_]:
            j = q[a] + 1 - i
            few = (i < n_left[a]) & (j > 0)
            f = np.flatnonzero(few)
            few[f] = right(a[f], j[f] - 1) > left(a[f], i[f])
            return ~few

        i = _bisect(enough, i_lo, i_hi)
        j = q + 1 - i
        every = np.arange(q.size)
        out = np.full(q.size, -np.inf, dtype=v.dtype)
        h = np.flatnonzero(i > 0)
        out[h] = left(every[h], i[h] - 1)
        h = np.flatnonzero(j > 0)
        out[h] = np.maximum(out[h], right(every[h], j[h] - 1))
        return out

    k = hi - lo
    out: _Values = (kth((k - 1) // 2) + kth(k // 2)) / 2
    return out


def _kept_interval(
    v: _Values, rows: _Index, lo: _Index, hi: _Index, med: _Values, thr: _Values,
) -> tuple[_Index, _Index]:
    """The part ``[new_lo, new_hi)`` of sorted ``v[rows, lo:hi]`` with ``|v - med| <= thr``."""
    new_lo = _bisect(lambda a, j: v[rows[a], j] - med[a] >= -thr[a], lo, hi)
    new_hi = _bisect(lambda a, j: v[rows[a], j] - med[a] > thr[a], lo, hi)
    return new_lo, new_hi


def clipped_rows(
    values: _Values, valid: NDArray[np.bool_], nsigma: float, iters: int = 5
) -> tuple[NDArray[np.float64], NDArray[np.float64], _Index]:
    """Median and mean after iterative MAD clipping of the ``valid`` values of every row.

    Per row: drop non-finite and invalid values; then at most ``iters`` times, stopping when
    fewer than 3 values remain, the MAD is 0 or nothing is clipped, keep the values within
    ``nsigma`` · :data:`MAD_TO_SIGMA` · MAD of the median.

    Parameters
    ----------
    values : numpy.ndarray, shape (n, m)
        One row per sample (e.g. the annulus pixels of one star).
    valid : numpy.ndarray of bool, shape (n, m)
        Which values of each row take part; non-finite values never do.
    nsigma : float
        A value is kept when its deviation from the row median is within ``nsigma`` MAD-σ
        (an interval of the sorted row).
    iters : int
        Clipping passes at most.

    Returns
    -------
    median, mean, count : numpy.ndarray, shape (n,)
        Clipped median (as ``values.dtype`` arithmetic, like ``np.median``), mean and count
        per row (NaN, NaN, 0 for an empty row).
    """
    v = np.where(valid & np.isfinite(values), values, np.inf).astype(values.dtype, copy=False)
    v.sort(axis=1)
    n = v.shape[0]
    lo = np.zeros(n, dtype=np.intp)
    hi = np.count_nonzero(np.isfinite(v), axis=1).astype(np.intp)
    active = np.ones(n, dtype=bool)
    for _ in range(iters):
        active &= hi - lo >= 3
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        rlo, rhi = lo[rows], hi[rows]
        med = _sorted_median(v, rows, rlo, rhi)
        sig = MAD_TO_SIGMA * _sorted_mad(v, rows, rlo, rhi, med)
        thr = nsigma * sig
        new_lo, new_hi = _kept_interval(v, rows, rlo, rhi, med, thr)
        stop = (sig == 0) | ((new_lo == rlo) & (new_hi == rhi))
        go = ~stop
        lo[rows[go]], hi[rows[go]] = new_lo[go], new_hi[go]
        active[rows[stop]] = False
    count = hi - lo
    median = np.full(n, np.nan)
    mean = np.full(n, np.nan)
    rows = np.flatnonzero(count > 0)
    if rows.size:
        median[rows] = _sorted_median(v, rows, lo[rows], hi[rows])
        csum = np.zeros((n, v.shape[1] + 1))
        np.cumsum(np.where(np.isfinite(v), v, 0.0), axis=1, out=csum[:, 1:])
        r = rows
        mean[r] = (csum[r, hi[r]] - csum[r, lo[r]]) / count[r]
    return median, mean, count
