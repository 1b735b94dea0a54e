"""Per-frame quality metrics of a raw file, computed at ingestion.

Every metric is computed independently, in a fixed order, inside its own ``try``: one metric
failing (a constant frame, an all-NaN frame, a flat with no stars) never loses the others, and
the reason is kept in :attr:`MetricsResult.failed`.  Values are plain Python ``float``/``int``/
``bool`` (never numpy scalars, NaN or inf), ready to store as an exposure document's
``metrics``.

Metric definitions (ADU are raw ADU, bias included, unless stated)
------------------------------------------------------------------
All frames
    ``clipped_mean``, ``clipped_median``, ``clipped_std``, ``minimum``, ``maximum``,
    ``saturated_fraction``, ``well_fullfrac``: see :func:`huntsman.science.stats.basic_stats`
    (3-sigma, 5 iterations; ``well_fullfrac`` = clipped median / saturation).
    ``background``, ``background_rms``: global level and noise of the service's background
    (:mod:`huntsman.science.background`: 64 px meshes, 3x3 median filter), ADU; the rms of a
    constant frame is 0.
    ``flip_asymmetry_lr``, ``flip_asymmetry_tb``: mean over mirrored pixel pairs of
    ``|img - fliplr(img)|`` (resp. ``flipud``) divided by the mean ``|difference|`` of
    horizontally (vertically) adjacent pixels, both capped at ``5 * sqrt(2) * clipped_std``
    (on a strided ~1 Mpix sample).  About 1 for a left/right (top/bottom)
    symmetric frame whatever its noise; larger when one side differs by more than the noise
    (gradient, amplifier glow, light leak).  0 for a noiseless constant frame.
    ``n_hot_pixels``, ``n_cold_pixels``: pixels of the whole frame above
    ``clipped_median + hot_sigma * s`` (below ``clipped_median - cold_sigma * s``), with
    ``s = max(clipped_std, 0.5 ADU)``.  On light frames star cores are counted as hot too.
    ``cosmic_ray_density``: sharp single-pixel outliers per megapixel of the frame (not per
    second): pixels higher than ``clipped_median + cosmic_sigma * s`` whose excess over the
    median is more than ``cosmic_sharpness`` times that of their brightest 4-neighbour.  Any
    star with FWHM >= 1.5 px fails the sharpness test; hot pixels pass it (one frame cannot
    tell them apart).  Estimated on evenly spaced row bands (about 2 Mpix).
Light frames (science, flat)
    ``n_sources``: ``sep.extract`` detections at ``detect_sigma`` x ``background_rms``,
    5 px minimum area.  ``fwhm_px``, ``fwhm_arcsec``, ``ellipticity``, ``psf_beta``,
    ``psf_n_stars``: :func:`huntsman.science.psf.measure_psf` (image FWHM of fitted Moffats).
    ``elongation_trail``: median ``a/b`` (``sep`` second moments) of unflagged sources with
    S/N >= 30 (1.0 round; > ~1.3 suggests trailing or wind shake); ``trail_coherence``:
    ``|median(exp(2i theta))|`` over the same sources, ~0 for random orientations, 1 when all
    are elongated the same way (trailing).
Flats
    ``illumination_level``: median ADU; ``illumination_fraction``: that over saturation;
    ``gradient_pct``: ``100 * (max - min) / median`` of the bias-subtracted medians of a
    coarse grid (``gradient_grid``) of blocks.
Bias and dark
    ``level_offset_adu``: clipped median minus the expected level (bias, plus for darks the
    expected dark current times exposure time).  ``noise_ratio``: clipped std over the
    expected noise ``sqrt(read_noise^2 + dark_e)`` / gain.  Darks: ``dark_current_adu_s`` =
    (clipped median - expected bias) / exposure time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

import numpy as np
from numpy.typing import NDArray

from huntsman.models import DetectorConstants, ObservationType
from huntsman.science.background import detect, sep_background
from huntsman.science.psf import PSFResult, measure_psf
from huntsman.science.stats import BasicStats, basic_stats, subsample

__all__ = ["OBSERVATION_TYPES", "MetricParams", "MetricsResult", "compute_metrics"]

Scalar = float | int | bool | None
#: What a metric function returns before :func:`_plain` makes it a :data:`Scalar`.
Measured = float | int | np.number[Any] | np.bool_ | None
_T = TypeVar("_T")
OBSERVATION_TYPES: Final = tuple(ObservationType)
_FLIP_CAP_SIGMA: Final = 5.0
_MIN_SIGMA_ADU: Final = 0.5  # floor for thresholds: raw ADU are integers


@dataclasses.dataclass(frozen=True)
class MetricParams:
    """The detector, the frame's exposure time and the thresholds of :func:`compute_metrics`.

    Attributes
    ----------
    detector : DetectorConstants
        Saturation, gain, read noise, bias level, dark current and pixel scale of the camera
        (no default: a hidden camera constant is a wrong answer for the next camera).
    exptime_s : float or None
        Exposure time of this frame, s (needed for darks).
    hot_sigma, cold_sigma, cosmic_sigma, cosmic_sharpness : float
        Outlier thresholds (see the module docstring).
    detect_sigma : float
        Source detection threshold, in background rms.
    max_psf_stars : int
        Cap on stars fitted by :func:`~huntsman.science.psf.measure_psf`.
    gradient_grid : (int, int)
        Blocks (ny, nx) for ``gradient_pct``.
    """

    detector: DetectorConstants
    exptime_s: float | None = None
    hot_sigma: float = 10.0
    cold_sigma: float = 10.0
    cosmic_sigma: float = 8.0
    cosmic_sharpness: float = 3.0
    detect_sigma: float = 5.0
    max_psf_stars: int = 150
    gradient_grid: tuple[int, int] = (6, 8)


@dataclasses.dataclass(frozen=True)
class MetricsResult:
    """Metric values (plain Python scalars) and the reasons of those that failed."""

    observation_type: str
    values: dict[str, Scalar]
    failed: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{metric: value}`` plus ``failed: {metric: reason}``, BSON-ready."""
        out: dict[str, Any] = dict(self.values)
        out["failed"] = dict(self.failed)
        return out


class _MetricError(Exception):
    """A metric that cannot be computed for a stated reason."""


def _plain(value: Measured) -> Scalar:
    """Convert to a plain Python scalar; non-finite numbers are a failure."""
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    number = float(value)
    if not math.isfinite(number):
        raise _MetricError(f"value is not finite ({number})")
    return number


class _Frame:
    """Shared intermediate products, each computed once; a failure is cached and re-raised."""

    def __init__(self, data: NDArray[np.number[Any]], params: MetricParams) -> None:
        self.data = data
        self.params = params
        self._cache: dict[str, object] = {}

    def _once(self, key: str, make: Callable[[], _T]) -> _T:
        if key not in self._cache:
            try:
                self._cache[key] = make()
            except Exception as exc:
                self._cache[key] = exc
        value = self._cache[key]
        if isinstance(value, Exception):
            raise _MetricError(f"{key}: {value}") from value
        return cast(_T, value)  # what make() returned for this key

    def float32(self) -> NDArray[np.float32]:
        def make() -> NDArray[np.float32]:
            arr = np.ascontiguousarray(self.data, dtype=np.float32)
            if self.data.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise ValueError("frame has non-finite pixels")
            return arr

        return self._once("float32", make)

    def stats(self) -> BasicStats:
        result: BasicStats = self._once(
            "stats", lambda: basic_stats(self.data, self.params.detector.saturation_adu)
        )
        return result

    def sigma(self) -> float:
        return max(self.stats().clipped_std, _MIN_SIGMA_ADU)

    def background(self) -> Any:
        return self._once("background", lambda: sep_background(self.float32()))

    def back_array(self) -> NDArray[np.float32]:
        result: NDArray[np.float32] = self._once(
            "background_map", lambda: self.background().back()
        )
        return result

    def catalogue(self) -> NDArray[np.void]:
        def make() -> NDArray[np.void]:
            bkg = self.background()
            rms = float(bkg.globalrms)
            if not rms > 0:
                raise ValueError(f"background rms is {rms}")
            sub = self.float32() - self.back_array()
            return detect(sub, self.params.detect_sigma, rms, minarea=5)

        return self._once("detection", make)

    def psf(self) -> PSFResult:
        def make() -> PSFResult:
            p = self.params
            return measure_psf(
                self.float32(),
                background=self.back_array(),
                background_rms=float(self.background().globalrms),
                saturation_adu=p.detector.saturation_adu,
                gain_e_per_adu=p.detector.gain_e_per_adu,
                pixel_scale_arcsec=p.detector.pixel_scale_arcsec,
                max_stars=p.max_psf_stars,
                catalogue=self.catalogue(),
            )

        result: PSFResult = self._once("psf", make)
        if result.n_stars == 0:
            raise _MetricError(f"psf: {result.error}")
        return result


# --- metric functions: each takes the shared frame and returns one value ---------------------


def _flip_asymmetry(frame: _Frame, axis: int) -> float:
    data = frame.data
    ny, nx = data.shape
    step = max(1, int(np.ceil(np.sqrt(data.size / 1_000_000))))
    a = data[::step, ::step].astype(np.float64)
    if axis == 1:
        mirror = data[::step, nx - 1 :: -step]
        neighbour = data[::step, 1::step]
    else:
        mirror = data[ny - 1 :: -step, ::step]
        neighbour = data[1::step, ::step]
    # Same estimator on mirrored pairs and on adjacent pairs: pure noise gives exactly 1 in
    # expectation, whatever the noise, and large-scale structure does not inflate the
    # denominator (as it would inflate clipped_std).  Means, not medians: raw ADU are integers
    # and a median of |diff| is quantised.  The cap keeps stars and hot pixels from dominating.
    cap = _FLIP_CAP_SIGMA * math.sqrt(2.0) * max(frame.stats().clipped_std, _MIN_SIGMA_ADU)
    d_mirror = np.abs(a - mirror)
    d_adjacent = np.abs(a[: neighbour.shape[0], : neighbour.shape[1]] - neighbour)
    d_mirror = np.minimum(d_mirror[np.isfinite(d_mirror)], cap)
    d_adjacent = np.minimum(d_adjacent[np.isfinite(d_adjacent)], cap)
    if d_mirror.size == 0 or d_adjacent.size == 0:
        raise _MetricError("no finite pixel pairs")
    noise = float(np.mean(d_adjacent))
    if noise == 0:
        if not np.any(d_mirror):
            return 0.0
        raise _MetricError("adjacent pixels are identical but mirrored pixels differ")
    return float(np.mean(d_mirror)) / noise


def _background_rms(frame: _Frame) -> float:
    # sep reports 1.0 for a noiseless constant frame (e.g. a synthetic bias); that is 0.
    if frame.stats().minimum == frame.stats().maximum:
        return 0.0
    return float(frame.background().globalrms)


def _count_beyond(frame: _Frame, sign: int, k: float) -> int:
    st = frame.stats()
    if sign > 0:
        return int(np.count_nonzero(frame.data > st.clipped_median + k * frame.sigma()))
    return int(np.count_nonzero(frame.data < st.clipped_median - k * frame.sigma()))


def _cosmic_ray_density(frame: _Frame) -> float:
    p = frame.params
    data = frame.data
    ny, nx = data.shape
    if ny < 3 or nx < 3:
        raise _MetricError("frame too small")
    band = 64
    n_bands = max(1, min((ny - 2) // band, int(np.ceil(2_000_000 / (band * nx)))))
    starts = np.linspace(1, ny - 1 - min(band, ny - 2), n_bands).astype(int)
    level = frame.stats().clipped_median
    thresh = p.cosmic_sigma * frame.sigma()
    hits, pixels = 0, 0
    for y0 in starts:
        y1 = min(y0 + band, ny - 1)
        block = data[y0 - 1 : y1 + 1].astype(np.float32) - np.float32(level)
        centre = block[1:-1, 1:-1]
        neigh = np.maximum.reduce(
            [block[:-2, 1:-1], block[2:, 1:-1], block[1:-1, :-2], block[1:-1, 2:]]
        )
        sharp = (centre > thresh) & (centre > p.cosmic_sharpness * np.maximum(neigh, 0))
        hits += int(np.count_nonzero(sharp))
        pixels += centre.size
    return hits / pixels * 1e6


def _elongation(frame: _Frame) -> tuple[float, float]:
    cat = frame.catalogue()
    rms = float(frame.background().globalrms)
    snr = cat["flux"] / np.sqrt(
        cat["npix"] * rms**2 + np.clip(cat["flux"], 0, None) / frame.params.detector.gain_e_per_adu
    )
    good = (cat["flag"] == 0) & (snr >= 30) & (cat["b"] > 0)
    if np.count_nonzero(good) < 3:
        raise _MetricError("fewer than 3 bright unflagged sources")
    ratio = cat["a"][good] / cat["b"][good]
    two_theta = 2.0 * cat["theta"][good]
    coherence = np.hypot(np.median(np.cos(two_theta)), np.median(np.sin(two_theta)))
    return float(np.median(ratio)), float(min(coherence, 1.0))


def _exptime(frame: _Frame) -> float:
    t = frame.params.exptime_s
    if t is None or not t > 0:
        raise _MetricError(f"exposure time {t!r} is not positive")
    return float(t)


def _expected_dark_adu(frame: _Frame) -> float:
    p = frame.params
    return p.detector.dark_current_e_per_s * _exptime(frame) / p.detector.gain_e_per_adu


def _expected_noise_adu(frame: _Frame, dark: bool) -> float:
    p = frame.params
    dark_e = p.detector.dark_current_e_per_s * _exptime(frame) if dark else 0.0
    return math.sqrt(p.detector.read_noise_e**2 + dark_e) / p.detector.gain_e_per_adu


def _block_medians(frame: _Frame) -> NDArray[np.float64]:
    gy, gx = frame.params.gradient_grid
    sample = subsample(frame.data).astype(np.float64)
    ny, nx = sample.shape
    if ny < gy or nx < gx:
        raise _MetricError("frame smaller than the gradient grid")
    sample = sample[: ny - ny % gy, : nx - nx % gx]
    blocks = sample.reshape(gy, sample.shape[0] // gy, gx, sample.shape[1] // gx)
    return np.nanmedian(blocks.transpose(0, 2, 1, 3).reshape(gy, gx, -1), axis=2)


def _gradient_pct(frame: _Frame) -> float:
    med = _block_medians(frame) - frame.params.detector.bias_level_adu
    centre = float(np.median(med))
    if not centre > 0:
        raise _MetricError(f"illumination above bias is {centre} ADU")
    return 100.0 * float(med.max() - med.min()) / centre


def _illumination_level(frame: _Frame) -> float:
    return float(np.median(subsample(frame.float32())))


MetricFn = Callable[[_Frame], Measured]

_ALL: list[tuple[str, MetricFn]] = [
    ("clipped_mean", lambda f: f.stats().clipped_mean),
    ("clipped_median", lambda f: f.stats().clipped_median),
    ("clipped_std", lambda f: f.stats().clipped_std),
    ("minimum", lambda f: f.stats().minimum),
    ("maximum", lambda f: f.stats().maximum),
    ("saturated_fraction", lambda f: f.stats().saturated_fraction),
    ("well_fullfrac", lambda f: f.stats().well_fullfrac),
    ("background", lambda f: f.background().globalback),
    ("background_rms", lambda f: _background_rms(f)),
    ("flip_asymmetry_lr", lambda f: _flip_asymmetry(f, axis=1)),
    ("flip_asymmetry_tb", lambda f: _flip_asymmetry(f, axis=0)),
    ("n_hot_pixels", lambda f: _count_beyond(f, +1, f.params.hot_sigma)),
    ("n_cold_pixels", lambda f: _count_beyond(f, -1, f.params.cold_sigma)),
    ("cosmic_ray_density", _cosmic_ray_density),
]
_LIGHT: list[tuple[str, MetricFn]] = [
    ("n_sources", lambda f: len(f.catalogue())),
    ("fwhm_px", lambda f: f.psf().fwhm_px),
    ("fwhm_arcsec", lambda f: f.psf().fwhm_arcsec),
    ("ellipticity", lambda f: f.psf().ellipticity),
    ("psf_beta", lambda f: f.psf().beta),
    ("psf_n_stars", lambda f: f.psf().n_stars),
    ("elongation_trail", lambda f: _elongation(f)[0]),
    ("trail_coherence", lambda f: _elongation(f)[1]),
]
_FLAT: list[tuple[str, MetricFn]] = [
    ("illumination_level", _illumination_level),
    ("illumination_fraction", lambda f: _illumination_level(f) / f.params.detector.saturation_adu),
    ("gradient_pct", _gradient_pct),
]
_BIAS: list[tuple[str, MetricFn]] = [
    ("level_offset_adu", lambda f: f.stats().clipped_median - f.params.detector.bias_level_adu),
    ("noise_ratio", lambda f: f.stats().clipped_std / _expected_noise_adu_bias(f)),
]
_DARK: list[tuple[str, MetricFn]] = [
    (
        "level_offset_adu",
        lambda f: f.stats().clipped_median - f.params.detector.bias_level_adu - _expected_dark_adu(f),
    ),
    ("noise_ratio", lambda f: f.stats().clipped_std / _expected_noise_adu(f, dark=True)),
    (
        "dark_current_adu_s",
        lambda f: (f.stats().clipped_median - f.params.detector.bias_level_adu) / _exptime(f),
    ),
]


def _expected_noise_adu_bias(frame: _Frame) -> float:
    p = frame.params
    return p.detector.read_noise_e / p.detector.gain_e_per_adu


_BY_TYPE: dict[str, list[tuple[str, MetricFn]]] = {
    ObservationType.BIAS: _ALL + _BIAS,
    ObservationType.DARK: _ALL + _DARK,
    ObservationType.FLAT: _ALL + _LIGHT + _FLAT,
    ObservationType.SCIENCE: _ALL + _LIGHT,
}


def metric_names(observation_type: str) -> tuple[str, ...]:
    """Metric keys computed for an observation type, in computation order."""
    return tuple(name for name, _ in _BY_TYPE[observation_type])


def compute_metrics(
    data: NDArray[np.number[Any]], observation_type: str, *, params: MetricParams
) -> MetricsResult:
    """All quality metrics of one raw frame.

    Parameters
    ----------
    data : numpy.ndarray, shape (ny, nx)
        Raw pixel values in ADU (uint16 or float); not modified.
    observation_type : {"bias", "dark", "flat", "science"}
        Selects the metric set (see the module docstring for every definition).
    params : MetricParams
        The detector, the frame's exposure time and thresholds.

    Returns
    -------
    MetricsResult
        Every metric of the type is a key of ``values``: a plain Python scalar, or None with
        the reason in ``failed``; none is lost because another failed.

    Raises
    ------
    ValueError
        For an unknown ``observation_type`` or an input that is not a 2-D array.
    """
    if observation_type not in _BY_TYPE:
        raise ValueError(
            f"observation_type must be one of {OBSERVATION_TYPES}, got {observation_type!r}"
        )
    if np.ndim(data) != 2:
        raise ValueError(f"expected a 2-D image, got shape {np.shape(data)}")
    frame = _Frame(np.asarray(data), params)
    values: dict[str, Scalar] = {}
    failed: dict[str, str] = {}
    for name, fn in _BY_TYPE[observation_type]:
        try:
            values[name] = _plain(fn(frame))
        except Exception as exc:  # isolation: one metric never loses the others
            values[name] = None
            failed[name] = str(exc) or type(exc).__name__
    return MetricsResult(observation_type=observation_type, values=values, failed=failed)
