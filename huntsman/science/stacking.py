"""Streamed sigma-clipped combination of a stack of frames.

Never holds N full frames: the stack is processed in bands of rows.  For each band the rows
are read from every frame, optionally corrected (bias, scaled dark, offset, scale), clipped
along the frame axis and averaged, and the band of the output is written.

Reading a band
--------------
astropy refuses ``memmap=True`` for the cameras' BZERO-scaled uint16 data, so uncompressed
files are read directly: the header is parsed once with astropy, the byte offset of the data
(``HDUList.fileinfo(i)["datLoc"]``) gives where row ``r`` starts, and the band's bytes are read
with one ``readinto`` into a big-endian buffer that is scaled (``BSCALE``/``BZERO``) into
float32.  Tile-compressed images (``.fits.fz``) use astropy's ``CompImageHDU.section``, which
decompresses only the tiles that overlap the band.

Clipping algorithm
------------------
Per pixel this reproduces astropy's ``sigma_clip(axis=0, cenfunc='median', stdfunc='std')``
followed by the mean of the survivors.  Each band is sorted along the frame axis once (NaN
sorts last).  A symmetric or asymmetric clip around a centre only ever removes values from the
two ends of the sorted list, so the survivors of every iteration are a contiguous index range
``[lo, hi)``: the median is a gather, and the new range is found by stepping ``lo`` up while
the next sorted value is below the lower bound and ``hi`` down while the value below it is
above the upper bound -- one gather per end for every pixel, further steps only for the few
pixels that lose values.  Only pixels whose range changed are revisited in the next
iteration (a pixel that did not change has converged, exactly as in astropy's loop).

Each band is split into row blocks of about ``_BLOCK_PIXELS`` pixels that are clipped in a
thread pool (the sort and the ufuncs release the GIL) while the next band is read into the
second of two reused band buffers.  Sums are accumulated in float64
about the initial median, so the mean and the standard deviation are exact to float64
rounding; astropy keeps float32 input in float32, so a value lying within float32 rounding of a
clipping bound may be decided differently by the two (documented in the tests and benchmark).

Non-finite inputs (NaN, ±inf) are ignored per pixel, as astropy does.  A frame that is
entirely NaN therefore contributes nothing; its valid fraction (0.0) is reported in
:attr:`CombineResult.frame_valid_fraction` so callers can reject it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from astropy.io import fits
from numpy.typing import NDArray

from huntsman.science.fitsio import image_hdu_index

__all__ = [
    "ArrayFrameSource",
    "BandPlan",
    "CombineResult",
    "FitsFrameSource",
    "FrameSource",
    "as_source",
    "plan_bands",
    "sigma_clipped_combine",
]

# Memory model of one band, in bytes per pixel of the band: float32 stack of the band being
# clipped and of the band being prefetched (2 x 4 N, two buffers reused for every band), N
# bytes of slack (reading temporaries) and about 20 float64/intp per-pixel work vectors; plus
# master bands (4 bytes each).  The work vectors only exist for the row blocks being clipped
# (at most one per thread, never more than one band), so that term is an upper bound.
_WORK_BYTES_PER_PIXEL = 160
_STACK_BYTES_PER_PIXEL_PER_FRAME = 9
# Outputs held for the whole frame: float32 image + float32 uncertainty + uint16 count.
_OUTPUT_BYTES_PER_PIXEL = 10
# Pixels per row block: a band is clipped in blocks of whole rows, in parallel threads (numpy
# releases the GIL in the sort and the ufuncs), so that the per-pixel work vectors are small.
_BLOCK_PIXELS = 1 << 17
# Interpreter, numpy and astropy already resident before the first band is read.
_BASELINE_MB = 160

_F32 = NDArray[np.float32]  # frame bands and stacks (the clipping works in float32)
_F64 = NDArray[np.float64]  # per-pixel sums, centres and per-frame corrections
_Index = NDArray[np.intp]  # pixel numbers and positions in the sorted stack
_Flags = NDArray[np.bool_]

FrameTransform = Callable[[_F32, int, slice], NDArray[np.floating[Any]]]


@runtime_checkable
class FrameSource(Protocol):
    """Anything that can hand out row bands of one 2-D frame as float32."""

    @property
    def name(self) -> str:
        """Name used in error messages (usually the file path)."""
        ...

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of the frame."""
        ...

    def read_rows(self, start: int, stop: int) -> _F32:
        """Rows ``start:stop`` as a new float32 array of shape (stop - start, nx)."""
        ...


#: What a combination takes as a frame or a master: a FITS path, a 2-D array or a source.
FrameInput = str | Path | NDArray[np.number[Any]] | FrameSource
#: A per-frame value: one for every frame, or one per frame.
PerFrame = float | Sequence[float] | NDArray[np.floating[Any]]


@dataclasses.dataclass(frozen=True)
class ArrayFrameSource:
    """An in-memory 2-D array as a frame source (tests, masters already in memory)."""

    array: NDArray[np.number[Any]]
    label: str = "<array>"

    def __post_init__(self) -> None:
        if self.array.ndim != 2:
            raise ValueError(f"{self.label}: expected a 2-D array, got shape {self.array.shape}")

    @property
    def name(self) -> str:
        return self.label

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.array.shape[0]), int(self.array.shape[1]))

    def read_rows(self, start: int, stop: int) -> _F32:
        return np.array(self.array[start:stop], dtype=np.float32)


_BITPIX_DTYPES = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


class FitsFrameSource:
    """Row bands of the image in a FITS file, read without loading the whole frame.

    The header is parsed once at construction.  Plain images are read with ``readinto`` at the
    byte offset of the band; compressed images through ``CompImageHDU.section``.
    """

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        with fits.open(self._path) as hdul:
            self._hdu_index = image_hdu_index(hdul)
            hdu = hdul[self._hdu_index]
            header = hdu.header
            self._compressed = isinstance(hdu, fits.CompImageHDU)
            if header.get("NAXIS") != 2:
                raise ValueError(f"{self._path}: expected a 2-D image, NAXIS={header['NAXIS']}")
            self._shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
            self._bscale = float(header.get("BSCALE", 1.0))
            self._bzero = float(header.get("BZERO", 0.0))
            bitpix = int(header["BITPIX"])
            if bitpix not in _BITPIX_DTYPES:
                raise ValueError(f"{self._path}: unsupported BITPIX {bitpix}")
            self._dtype = np.dtype(_BITPIX_DTYPES[bitpix])
            self._blank = header.get("BLANK") if bitpix > 0 else None
            self._data_offset = (
                0 if self._compressed else int(hdul.fileinfo(self._hdu_index)["datLoc"])
            )

    @property
    def name(self) -> str:
        return str(self._path)

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def read_rows(self, start: int, stop: int) -> _F32:
        ny, nx = self._shape
        if not 0 <= start <= stop <= ny:
            raise IndexError(f"{self._path}: rows {start}:{stop} outside 0:{ny}")
        if self._compressed:
            with fits.open(self._path) as hdul:
                section = hdul[self._hdu_index].section[start:stop]
            return np.asarray(section, dtype=np.float32)
        raw = np.empty((stop - start, nx), dtype=self._dtype)
        with open(self._path, "rb") as stream:
            stream.seek(self._data_offset + start * nx * self._dtype.itemsize)
            n_read = stream.readinto(raw.data.cast("B"))
        if n_read != raw.nbytes:
            raise ValueError(f"{self._path}: truncated data (rows {start}:{stop})")
        out = np.empty(raw.shape, dtype=np.float32)
        if self._bscale == 1.0:
            np.add(raw, np.float32(self._bzero), out=out, casting="unsafe")
        else:
            np.multiply(raw, self._bscale, out=out, casting="unsafe")
            out += np.float32(self._bzero)
        if self._blank is not None:
            out[raw == self._blank] = np.nan
        return out


def as_source(item: FrameInput, label: str | None = None) -> FrameSource:
    """Wrap a path or a 2-D array as a :class:`FrameSource` (sources pass through)."""
    if isinstance(item, str | Path):
        return FitsFrameSource(item)
    if isinstance(item, np.ndarray):
        return ArrayFrameSource(item, label or "<array>")
    if isinstance(item, FrameSource):
        return item
    raise TypeError(f"cannot read frames from {type(item).__name__}")


@dataclasses.dataclass(frozen=True)
class BandPlan:
    """How a combination is split into row bands to stay under a memory ceiling."""

    rows_per_band: int
    n_bands: int
    bytes_per_band: int
    memory_limit_mb: float


def plan_bands(
    n_frames: int, shape: tuple[int, int], memory_limit_mb: float, n_masters: int = 0
) -> BandPlan:
    """Band height for combining ``n_frames`` frames of ``shape`` within ``memory_limit_mb``.

    The ceiling covers the outputs (10 bytes per output pixel), a fixed interpreter baseline
    and, per band pixel, two float32 frame stacks (the band being clipped and the one being
    prefetched), reading temporaries, the per-pixel work vectors (an upper bound: they are
    held only for the row blocks being clipped) and ``n_masters`` master bands.

    Raises
    ------
    ValueError
        If not even one row fits.
    """
    ny, nx = shape
    per_pixel = (
        _STACK_BYTES_PER_PIXEL_PER_FRAME * n_frames + _WORK_BYTES_PER_PIXEL + 4 * n_masters
    )
    budget = memory_limit_mb * 2**20 - _BASELINE_MB * 2**20 - _OUTPUT_BYTES_PER_PIXEL * ny * nx
    rows = int(budget // (per_pixel * nx)) if budget > 0 else 0
    if rows < 1:
        raise ValueError(
            f"memory_limit_mb={memory_limit_mb} is too small to combine {n_frames} frames "
            f"of shape {shape}"
        )
    rows = min(rows, ny)
    return BandPlan(
        rows_per_band=rows,
        n_bands=math.ceil(ny / rows),
        bytes_per_band=rows * nx * per_pixel,
        memory_limit_mb=memory_limit_mb,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class CombineResult:
    """Output of :func:`sigma_clipped_combine`.

    Attributes
    ----------
    data : numpy.ndarray, shape (ny, nx)
        Mean of the surviving values (NaN where none survived).
    uncertainty : numpy.ndarray, float32, shape (ny, nx)
        Standard error of that mean: sample standard deviation (ddof=1) of the survivors over
        sqrt(n_used); NaN where fewer than two values survived.
    n_used : numpy.ndarray, uint16, shape (ny, nx)
        Number of surviving values per pixel.
    frame_valid_fraction : tuple of float
        Per input frame, the fraction of its pixels that were finite after preprocessing.
    names : tuple of str
        The input names, in order.
    plan : BandPlan
        The band layout used.
    """

    data: NDArray[np.floating[Any]]
    uncertainty: _F32
    n_used: NDArray[np.uint16]
    frame_valid_fraction: tuple[float, ...]
    names: tuple[str, ...]
    plan: BandPlan

    @property
    def n_frames(self) -> int:
        return len(self.names)


def _per_frame(values: PerFrame | None, n: int, what: str, default: float) -> _F64:
    if values is None:
        return np.full(n, default, dtype=np.float64)
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(n, float(arr), dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{what} must be a scalar or have one value per frame ({n})")
    return arr


def _round_up_f32(x: _F64) -> _F32:
    """Smallest float32 >= x, so that ``f32 < x`` is the same test as ``f32 < result``."""
    r = x.astype(np.float32)
    np.nextafter(r, np.float32(np.inf), out=r, where=r < x)
    return r


def _round_down_f32(x: _F64) -> _F32:
    """Largest float32 <= x, so that ``f32 <= x`` is the same test as ``f32 <= result``."""
    r = x.astype(np.float32)
    np.nextafter(r, np.float32(-np.inf), out=r, where=r > x)
    return r


def _walk_lo(flat: _F32, npix: int, n_frames: int, pix: _Index, start: _Index,
             lower: _F32, first: _Flags) -> _Index:
    """Number of sorted values below ``lower`` per pixel, or ``start`` if that is larger.

    ``first`` is ``value[start] < lower``.  Values are sorted ascending (NaN last) along the
    frame axis, so the count is found by stepping up from ``start`` while the next value is
    still below the bound; only the few pixels that are still stepping are revisited.
    """
    new = start.copy()
    cand = np.flatnonzero(first)
    while cand.size:
        new[cand] += 1
        cand = cand[new[cand] < n_frames]
        if not cand.size:
            break
        cand = cand[flat[new[cand] * npix + pix[cand]] < lower[cand]]
    return new


def _walk_hi(flat: _F32, npix: int, pix: _Index, start: _Index,
             upper: _F32, first: _Flags) -> _Index:
    """Number of sorted values ``<= upper`` per pixel, or ``start`` if that is smaller.

    ``first`` is ``not value[start - 1] <= upper`` (True where a step down is needed).
    """
    new = start.copy()
    cand = np.flatnonzero(first & (start > 0))
    while cand.size:
        new[cand] -= 1
        cand = cand[new[cand] > 0]
        if not cand.size:
            break
        with np.errstate(invalid="ignore"):
            cand = cand[~(flat[(new[cand] - 1) * npix + pix[cand]] <= upper[cand])]
    return new


def _median_of(
    flat: _F32, npix: int, idx: _Index, start: _Index, m: _Index
) -> _F64:
    """Median of the ``m`` sorted values from ``start`` of pixels ``idx`` (NaN where m == 0)."""
    a = flat[(start + np.maximum(m - 1, 0) // 2) * npix + idx].astype(np.float64)
    b = flat[(start + m // 2) * npix + idx]
    with np.errstate(invalid="ignore"):
        med: _F64 = np.where(m > 0, 0.5 * (a + b), np.nan)
    return med


def _initial_state(
    stack: _F32,
) -> tuple[_Index, int, _F64, _F64, _F64, _F64]:
    """Sort ``stack`` in place; valid counts, minimum count, median, and sums about it.

    Returns ``(n_valid, min_valid, ref, ref_finite, s1, s2)``: sums of the deviations (and
    their squares) of every valid value from the initial median ``ref`` (NaN→0 in
    ``ref_finite``), so that they are well conditioned.
    """
    n_frames, npix = stack.shape
    stack.sort(axis=0)  # NaN last
    pix = np.arange(npix)
    # NaN sorts last: a pixel has a NaN only if its last sorted value is NaN.
    has_nan = np.isnan(stack[n_frames - 1])
    n_valid = np.full(npix, n_frames, dtype=np.intp)
    if has_nan.any():
        nan_pix = np.flatnonzero(has_nan)
        n_valid[nan_pix] -= np.count_nonzero(np.isnan(stack[:, nan_pix]), axis=0)
        min_valid = int(n_valid.min())
        ref = _median_of(stack.reshape(-1), npix, pix, np.zeros(npix, dtype=np.intp), n_valid)
    else:
        min_valid = n_frames
        ref = stack[(n_frames - 1) // 2].astype(np.float64)
        ref += stack[n_frames // 2]
        ref *= 0.5
    ref_finite = np.where(np.isfinite(ref), ref, 0.0)
    s1 = np.zeros(npix)
    s2 = np.zeros(npix)
    d = np.empty(npix)
    for k in range(n_frames):
        np.subtract(stack[k], ref_finite, out=d)
        if k >= min_valid:
            d[k >= n_valid] = 0.0
        s1 += d
        d *= d
        s2 += d
    return n_valid, min_valid, ref, ref_finite, s1, s2


def _clip_band(
    stack: _F32,
    sigma_lower: float,
    sigma_upper: float,
    maxiters: int,
    median_centre: bool,
) -> tuple[_F64, _F64, _Index]:
    """Clip and average a block stack in place.

    Parameters
    ----------
    stack : numpy.ndarray, float32, shape (N, P), C-contiguous
        N frames of P pixels; non-finite values must already be NaN.  Sorted in place.

    Returns
    -------
    mean, sem : numpy.ndarray, float64, shape (P,)
    n_used : numpy.ndarray, intp, shape (P,)
    """
    n_frames, npix = stack.shape
    n_valid, min_valid, ref, ref_finite, s1, s2 = _initial_state(stack)
    flat = stack.reshape(-1)
    pix = np.arange(npix)

    lo = np.zeros(npix, dtype=np.intp)
    hi = n_valid
    active: _Index | None = None  # None: every pixel of the block
    centre: _F64 | None = ref if median_centre else None
    for _ in range(maxiters):
        if active is None:
            cur_lo, cur_hi, act_pix = lo, hi, pix
            s1a, s2a = s1, s2
        else:
            if active.size == 0:
                break
            cur_lo, cur_hi, act_pix = lo[active], hi[active], active
            s1a, s2a = s1[active], s2[active]
        m = cur_hi - cur_lo
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_d = s1a / m
            std = np.sqrt(np.maximum(s2a / m - mean_d * mean_d, 0.0))
        if not median_centre:
            centre = (ref_finite if active is None else ref_finite[active]) + mean_d
        elif centre is None:
            centre = _median_of(flat, npix, act_pix, cur_lo, m)
        with np.errstate(invalid="ignore"):
            lower = _round_up_f32(centre - sigma_lower * std)
            upper = _round_down_f32(centre + sigma_upper * std)
        centre = None
        del mean_d, std
        # First step of each walk with one gather (or a row) over every active pixel.
        first_lo, first_hi = _first_steps(stack, active is None and min_valid == n_frames,
                                          act_pix, cur_lo, cur_hi, lower, upper)
        if not (first_lo.any() or first_hi.any()):
            break
        new_lo = _walk_lo(flat, npix, n_frames, act_pix, cur_lo, lower, first_lo)
        new_hi = _walk_hi(flat, npix, act_pix, cur_hi, upper, first_hi)
        changed = np.flatnonzero((new_lo != cur_lo) | (new_hi != cur_hi))
        if changed.size == 0:
            break
        active = changed if active is None else active[changed]
        new_lo, new_hi = new_lo[changed], new_hi[changed]
        lo[active], hi[active] = new_lo, new_hi
        sub = stack[:, active]
        frame_index = np.arange(n_frames)[:, None]
        inside = (frame_index >= new_lo) & (frame_index < new_hi)
        dd = np.where(inside, sub - ref_finite[active], 0.0)
        s1[active] = dd.sum(axis=0)
        s2[active] = (dd * dd).sum(axis=0)

    n_used = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = ref_finite + s1 / n_used
        var = (s2 - s1 * s1 / n_used) / (n_used - 1)
        sem = np.sqrt(np.maximum(var, 0.0) / n_used)
    mean[n_used == 0] = np.nan
    sem[n_used < 2] = np.nan
    return mean, sem, n_used


def _first_steps(
    stack: _F32, whole_rows: bool, act_pix: _Index, cur_lo: _Index,
    cur_hi: _Index, lower: _F32, upper: _F32,
) -> tuple[_Flags, _Flags]:
    """Whether the lowest (highest) kept value of each active pixel falls outside the interval.

    ``whole_rows``: every pixel is active and has every frame valid, so the first and last
    sorted rows are read directly instead of gathered.
    """
    n_frames, npix = stack.shape
    flat = stack.reshape(-1)
    with np.errstate(invalid="ignore"):
        if whole_rows:
            return stack[0] < lower, ~(stack[n_frames - 1] <= upper)
        safe_lo = np.minimum(cur_lo, n_frames - 1)
        first_lo = (flat[safe_lo * npix + act_pix] < lower) & (cur_lo < n_frames)
        safe_hi = np.maximum(cur_hi - 1, 0)
        first_hi = ~(flat[safe_hi * npix + act_pix] <= upper)
    return first_lo, first_hi


def sigma_clipped_combine(
    paths_or_loaders: Sequence[FrameInput],
    *,
    sigma: float = 3.0,
    sigma_lower: float | None = None,
    sigma_upper: float | None = None,
    maxiters: int = 3,
    cenfunc: str = "median",
    stdfunc: str = "std",
    scales: PerFrame | None = None,
    offsets: PerFrame | None = None,
    bias: FrameInput | None = None,
    dark_rate: FrameInput | None = None,
    exptimes: PerFrame | None = None,
    transform: FrameTransform | None = None,
    memory_limit_mb: float = 1024,
    dtype: type[np.floating[Any]] | np.dtype[np.floating[Any]] = np.float32,
    io_threads: int = 2,
    threads: int | None = None,
) -> CombineResult:
    """Sigma-clipped mean of a stack of frames, streamed in row bands.

    Each frame ``i`` is first corrected, band by band, as::

        x_i = (raw_i - bias - dark_rate * exptimes[i] - offsets[i]) / scales[i]

    then ``transform(x_i, i, rows)`` if given (it must return a new array of the same shape).
    Per pixel, values are clipped iteratively around the median with the standard deviation
    (ddof=0) as astropy's ``sigma_clip(axis=0, sigma, maxiters, cenfunc, stdfunc)`` does, and
    the survivors are averaged.

    Parameters
    ----------
    paths_or_loaders : sequence of path, 2-D array or FrameSource
        The frames, all of the same shape (ny, nx); values in ADU.
    sigma, sigma_lower, sigma_upper : float
        Clipping thresholds in standard deviations (lower/upper default to ``sigma``).
    maxiters : int
        Maximum number of clipping iterations (>= 0; 0 means a plain NaN-ignoring mean).
    cenfunc : {'median', 'mean'}
        Centre of the clipping interval.
    stdfunc : {'std'}
        Width of the clipping interval (population standard deviation).
    scales, offsets : float or sequence of float, optional
        Per-frame divisor (default 1) and additive offset in ADU (default 0).
    bias : path, 2-D array or FrameSource, optional
        Master bias in ADU, shape (ny, nx), subtracted from every frame.
    dark_rate : path, 2-D array or FrameSource, optional
        Master dark in ADU/s, shape (ny, nx); ``exptimes`` (s, per frame) is then required.
    transform : callable(band, frame_index, rows) -> band, optional
        Extra per-frame correction of a float32 band of shape (rows, nx).
    memory_limit_mb : float
        Ceiling on the memory used, which sets the band height (see :func:`plan_bands`).
    dtype : numpy float dtype
        dtype of the output image (the uncertainty is always float32).
    io_threads : int
        Threads reading frames; the next band is read while the current one is clipped.
    threads : int, optional
        Threads clipping the row blocks of a band (default: one per CPU).  The result does
        not depend on it.

    Returns
    -------
    CombineResult

    Raises
    ------
    ValueError
        No frames, frames (or masters) of different shapes (the message names the file), bad
        parameters, or a memory limit too small for one row.
    """
    _check_clipping(cenfunc, stdfunc, maxiters)
    s_lo = float(sigma if sigma_lower is None else sigma_lower)
    s_hi = float(sigma if sigma_upper is None else sigma_upper)
    sources, bias_src, dark_src = _open_sources(paths_or_loaders, bias, dark_rate)
    if dark_src is not None and exptimes is None:
        raise ValueError("exptimes are required to subtract a dark rate")
    n = len(sources)
    corrections = _Corrections(
        scales=_per_frame(scales, n, "scales", 1.0),
        offsets=_per_frame(offsets, n, "offsets", 0.0),
        exptimes=_per_frame(exptimes, n, "exptimes", 0.0),
        transform=transform,
    )
    if np.any(corrections.scales == 0) or not np.all(np.isfinite(corrections.scales)):
        raise ValueError("scales must be finite and non-zero")
    n_masters = int(bias_src is not None) + int(dark_src is not None)
    plan = plan_bands(n, sources[0].shape, memory_limit_mb, n_masters)
    combiner = _BandCombiner(sources, bias_src, dark_src, corrections, plan, dtype,
                             (s_lo, s_hi, maxiters, cenfunc == "median"))
    return combiner.run(io_threads, threads)


def _check_clipping(cenfunc: str, stdfunc: str, maxiters: int) -> None:
    if cenfunc not in ("median", "mean"):
        raise ValueError(f"cenfunc must be 'median' or 'mean', not {cenfunc!r}")
    if stdfunc != "std":
        raise ValueError(f"stdfunc must be 'std', not {stdfunc!r}")
    if maxiters < 0:
        raise ValueError("maxiters must be >= 0")


def _open_sources(
    items: Sequence[FrameInput],
    bias: FrameInput | None,
    dark_rate: FrameInput | None,
) -> tuple[list[FrameSource], FrameSource | None, FrameSource | None]:
    """The frames and masters as sources, all checked to have the first frame's shape."""
    if not items:
        raise ValueError("no frames to combine")
    sources = [as_source(s, f"<frame {i}>") for i, s in enumerate(items)]
    shape = sources[0].shape
    for src in sources[1:]:
        if src.shape != shape:
            raise ValueError(
                f"{src.name}: shape {src.shape} differs from {shape} of {sources[0].name}"
            )
    bias_src = None if bias is None else as_source(bias, "<bias>")
    dark_src = None if dark_rate is None else as_source(dark_rate, "<dark rate>")
    for master in (bias_src, dark_src):
        if master is not None and master.shape != shape:
            raise ValueError(f"{master.name}: master shape {master.shape} differs from {shape}")
    return sources, bias_src, dark_src


@dataclasses.dataclass(frozen=True)
class _Corrections:
    """Per-frame corrections ``(raw - bias - dark·t - offset) / scale``, then ``transform``."""

    scales: _F64
    offsets: _F64
    exptimes: _F64
    transform: FrameTransform | None

    def apply(self, band: _F32, i: int, rows: slice, mbias: _F32 | None,
              mdark: _F32 | None, name: str) -> _F32:
        """Correct frame ``i``'s float32 ``band`` (in place where it can) and return it."""
        if mbias is not None:
            band -= mbias
        if mdark is not None:
            band -= np.float32(self.exptimes[i]) * mdark
        if self.offsets[i] != 0.0:
            band -= np.float32(self.offsets[i])
        if self.scales[i] != 1.0:
            band /= np.float32(self.scales[i])
        if self.transform is not None:
            shape = band.shape
            band = np.asarray(self.transform(band, i, rows), dtype=np.float32)
            if band.shape != shape:
                raise ValueError(f"transform changed the band shape of {name}")
        return band


_Block = tuple[slice, _F32]


class _BandCombiner:
    """The streamed combination: bands read by I/O threads while row blocks are clipped."""

    def __init__(
        self, sources: list[FrameSource], bias_src: FrameSource | None,
        dark_src: FrameSource | None, corrections: _Corrections, plan: BandPlan,
        dtype: type[np.floating[Any]] | np.dtype[np.floating[Any]], clipping: tuple[float, float, int, bool],
    ) -> None:
        self.sources, self.bias_src, self.dark_src = sources, bias_src, dark_src
        self.corrections, self.plan, self.clipping = corrections, plan, clipping
        self.n = len(sources)
        self.shape = sources[0].shape
        ny, nx = self.shape
        self.nx = nx
        self.out = np.empty(self.shape, dtype=dtype)
        self.uncert = np.empty(self.shape, dtype=np.float32)
        self.n_used = np.empty(self.shape, dtype=np.uint16)
        self.n_finite = np.zeros(self.n, dtype=np.int64)
        self.bands = [slice(r, min(r + plan.rows_per_band, ny))
                      for r in range(0, ny, plan.rows_per_band)]
        self.block_rows = max(1, _BLOCK_PIXELS // nx)
        # Two band buffers, reused: one is clipped while the next band is read into the other.
        self.buffers = [np.empty(self.n * plan.rows_per_band * nx, dtype=np.float32)
                        for _ in range(min(2, len(self.bands)))]

    def band_blocks(self, rows: slice, buffer: _F32) -> list[_Block]:
        """Row blocks of a band: (rows in the band, C-contiguous (n, pixels) stack view)."""
        n, nx = self.n, self.nx
        height = rows.stop - rows.start
        blocks = []
        for a in range(0, height, self.block_rows):
            b = min(a + self.block_rows, height)
            view = buffer[n * a * nx:n * b * nx].reshape(n, (b - a) * nx)
            blocks.append((slice(a, b), view))
        return blocks

    def read_frame(self, i: int, rows: slice, blocks: list[_Block],
                   masters: tuple[_F32 | None, _F32 | None]) -> int:
        band = self.sources[i].read_rows(rows.start, rows.stop)
        band = self.corrections.apply(band, i, rows, *masters, self.sources[i].name)
        finite = np.isfinite(band)
        n_ok = int(np.count_nonzero(finite))
        if n_ok != band.size:
            band[~finite] = np.nan
        for block, stack in blocks:
            stack[i] = band[block].reshape(-1)
        return n_ok

    def load_band(self, pool: ThreadPoolExecutor, rows: slice,
                  buffer: _F32) -> tuple[list[_Block], list[Future[int]]]:
        bias_src, dark_src = self.bias_src, self.dark_src
        mbias = None if bias_src is None else bias_src.read_rows(rows.start, rows.stop)
        mdark = None if dark_src is None else dark_src.read_rows(rows.start, rows.stop)
        blocks = self.band_blocks(rows, buffer)
        futures = [pool.submit(self.read_frame, i, rows, blocks, (mbias, mdark))
                   for i in range(self.n)]
        return blocks, futures

    def clip_block(self, rows: slice, block: slice, stack: _F32) -> None:
        mean, sem, n_used = _clip_band(stack, *self.clipping)
        out_rows = slice(rows.start + block.start, rows.start + block.stop)
        height = block.stop - block.start
        self.out[out_rows] = mean.reshape(height, self.nx)
        self.uncert[out_rows] = sem.reshape(height, self.nx)
        self.n_used[out_rows] = n_used.reshape(height, self.nx)

    def run(self, io_threads: int, threads: int | None) -> CombineResult:
        cpus = os.cpu_count() or 1
        io_workers = max(1, min(io_threads, cpus))
        # At most one thread per block, so the work vectors in flight never exceed one band's.
        clip_workers = max(1, min(cpus if threads is None else threads,
                                  math.ceil(self.plan.rows_per_band / self.block_rows)))
        bands = self.bands
        with ThreadPoolExecutor(max_workers=io_workers, thread_name_prefix="stack-io") as io_pool, \
                ThreadPoolExecutor(max_workers=clip_workers,
                                   thread_name_prefix="stack-clip") as clip_pool:
            pending = self.load_band(io_pool, bands[0], self.buffers[0])
            for b, rows in enumerate(bands):
                blocks, futures = pending
                for i, fut in enumerate(futures):
                    self.n_finite[i] += fut.result()
                if b + 1 < len(bands):
                    pending = self.load_band(io_pool, bands[b + 1], self.buffers[(b + 1) % 2])
                clips = [clip_pool.submit(self.clip_block, rows, block, stack)
                         for block, stack in blocks]
                for clip in clips:
                    clip.result()
        ny, nx = self.shape
        return CombineResult(
            data=self.out,
            uncertainty=self.uncert,
            n_used=self.n_used,
            frame_valid_fraction=tuple(float(c) / (ny * nx) for c in self.n_finite),
            names=tuple(s.name for s in self.sources),
            plan=self.plan,
        )
