"""Streamed sigma-clipped combination: identity with astropy, streaming, NaNs, errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import sigma_clip

from huntsman.science.stacking import (
    ArrayFrameSource,
    FitsFrameSource,
    plan_bands,
    sigma_clipped_combine,
)
from huntsman.testing.synthetic import huntsman_header, write_raw


def _stack(seed: int = 1, n: int = 15, shape: tuple[int, int] = (120, 160)) -> np.ndarray:
    """Integer-valued frames with outliers and scattered NaNs (float32, (n, ny, nx))."""
    rng = np.random.default_rng(seed)
    st = rng.normal(1000.0, 5.0, (n, *shape))
    hits = rng.random(st.shape) < 0.02
    st[hits] += rng.exponential(60.0, hits.sum())
    st = np.rint(st).astype(np.float32)
    st[rng.random(st.shape) < 0.01] = np.nan
    st[2, :7, :] = np.nan  # a frame with whole NaN rows
    st[:, 0, 0] = np.nan  # a pixel with no data at all
    st[:-1, 1, 1] = np.nan  # a pixel with a single value
    return st


def _astropy_reference(stack: np.ndarray, dtype: type, **kw: object) -> tuple:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clipped = sigma_clip(stack.astype(dtype), axis=0, cenfunc="median", stdfunc="std",
                             masked=True, **kw)
    return clipped.mean(axis=0).filled(np.nan), clipped.count(axis=0), clipped


def _assert_float32_identical(ours: np.ndarray, ref: np.ndarray, ulps: int = 2) -> None:
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    ok = ~np.isnan(ref)
    tol = ulps * np.spacing(np.abs(ref[ok]).astype(np.float32)).astype(np.float64)
    err = np.abs(ours[ok].astype(np.float64) - ref[ok])
    assert np.all(err <= tol), f"max error {err.max()} (tolerance {tol.max()})"


@pytest.mark.parametrize("ref_dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("sigma", "maxiters"), [(3.0, 3), (2.0, 5), (2.5, 1)])
def test_identical_to_astropy_sigma_clip(ref_dtype: type, sigma: float, maxiters: int) -> None:
    stack = _stack()
    ref, count, clipped = _astropy_reference(stack, ref_dtype, sigma=sigma, maxiters=maxiters)
    result = sigma_clipped_combine(list(stack), sigma=sigma, maxiters=maxiters)
    assert result.data.dtype == np.float32
    np.testing.assert_array_equal(result.n_used, count)
    _assert_float32_identical(result.data, ref)
    sem = (clipped.std(axis=0, ddof=1) / np.sqrt(count)).filled(np.nan)
    sem[count < 2] = np.nan
    np.testing.assert_allclose(result.uncertainty, sem, rtol=1e-5, equal_nan=True)
    assert np.isnan(result.data[0, 0]) and result.n_used[0, 0] == 0
    assert result.n_used[1, 1] == 1 and np.isnan(result.uncertainty[1, 1])


def test_inputs_not_modified() -> None:
    stack = _stack()
    frames = [f.copy() for f in stack]
    sigma_clipped_combine(frames, offsets=3.0, scales=2.0)
    for before, after in zip(stack, frames, strict=True):
        np.testing.assert_array_equal(before, after)


def _write_stack(tmp_path: Path, stack: np.ndarray) -> list[Path]:
    header = huntsman_header(observation_type="flat")
    return [write_raw(tmp_path / f"f{i:02d}.fits", frame, header) for i, frame in enumerate(stack)]


def test_streamed_files_match_in_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    stack = rng.poisson(900.0, (12, 300, 200)).astype(np.uint16)
    paths = _write_stack(tmp_path, stack)
    plan = plan_bands(12, (300, 200), memory_limit_mb=162)
    assert plan.n_bands > 3, plan  # the limit really forces several bands
    streamed = sigma_clipped_combine(paths, memory_limit_mb=162)
    assert streamed.plan == plan
    in_memory = sigma_clipped_combine(list(stack.astype(np.float32)))
    np.testing.assert_array_equal(streamed.data, in_memory.data)
    np.testing.assert_array_equal(streamed.n_used, in_memory.n_used)
    ref, count, _ = _astropy_reference(stack.astype(np.float32), np.float64, sigma=3, maxiters=3)
    np.testing.assert_array_equal(streamed.n_used, count)
    _assert_float32_identical(streamed.data, ref)


def test_band_reader_reads_exact_rows_plain_and_compressed(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 4095, (50, 70)).astype(np.uint16)
    plain = write_raw(tmp_path / "a.fits", data, huntsman_header(observation_type="dark"))
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data)]).writeto(tmp_path / "a.fits.fz")
    for path in (plain, tmp_path / "a.fits.fz"):
        src = FitsFrameSource(path)
        assert src.shape == (50, 70)
        band = src.read_rows(13, 29)
        assert band.dtype == np.float32
        np.testing.assert_array_equal(band, data[13:29].astype(np.float32))


def test_preprocessing_inside_stream_matches_precomputed(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    shape = (80, 90)
    bias = 200.0 + rng.normal(0, 3, shape)
    dark = 0.5 + rng.random(shape)
    exptimes = np.array([10.0, 20.0, 30.0, 40.0, 15.0])
    scales = np.array([1.0, 1.1, 0.9, 1.3, 1.05])
    raws = [np.rint(bias + dark * t + s * 1000 + rng.normal(0, 5, shape)).astype(np.uint16)
            for t, s in zip(exptimes, scales, strict=True)]
    paths = _write_stack(tmp_path, np.array(raws))
    result = sigma_clipped_combine(paths, bias=bias.astype(np.float32),
                                   dark_rate=dark.astype(np.float32), exptimes=exptimes,
                                   scales=scales, offsets=5.0)
    pre = [((r.astype(np.float32) - bias.astype(np.float32))
            - np.float32(t) * dark.astype(np.float32) - np.float32(5.0)) / np.float32(s)
           for r, t, s in zip(raws, exptimes, scales, strict=True)]
    expected = sigma_clipped_combine(pre)
    np.testing.assert_array_equal(result.data, expected.data)
    assert abs(float(np.median(result.data)) - 995.0) < 5.0


def test_all_nan_frame_is_ignored_and_reported() -> None:
    stack = _stack(seed=5, n=8)
    with_nan = np.concatenate([stack, np.full((1, *stack.shape[1:]), np.nan, np.float32)])
    result = sigma_clipped_combine(list(with_nan))
    without = sigma_clipped_combine(list(stack))
    assert result.frame_valid_fraction[-1] == 0.0
    assert all(f > 0.9 for f in result.frame_valid_fraction[:-1])
    np.testing.assert_array_equal(result.data, without.data)


def test_mixed_shapes_name_the_file(tmp_path: Path) -> None:
    header = huntsman_header(observation_type="bias")
    good = write_raw(tmp_path / "good.fits", np.zeros((20, 30), np.uint16), header)
    bad = write_raw(tmp_path / "odd_one.fits", np.zeros((20, 31), np.uint16), header)
    with pytest.raises(ValueError, match=r"odd_one\.fits"):
        sigma_clipped_combine([good, good, bad])


def test_master_shape_mismatch_and_bad_parameters() -> None:
    frames = [np.zeros((10, 10), np.float32)] * 3
    with pytest.raises(ValueError, match="master shape"):
        sigma_clipped_combine(frames, bias=np.zeros((10, 11), np.float32))
    with pytest.raises(ValueError, match="exptimes"):
        sigma_clipped_combine(frames, dark_rate=np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError, match="scales"):
        sigma_clipped_combine(frames, scales=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="stdfunc"):
        sigma_clipped_combine(frames, stdfunc="mad_std")
    with pytest.raises(ValueError, match="no frames"):
        sigma_clipped_combine([])


def test_band_plan_honours_memory_limit() -> None:
    full = (3672, 5496)
    plan = plan_bands(20, full, memory_limit_mb=1024)
    outputs = 10 * full[0] * full[1]
    assert plan.bytes_per_band + outputs <= 1024 * 2**20
    assert 100 <= plan.rows_per_band < full[0]
    small = plan_bands(20, full, memory_limit_mb=400)
    assert small.rows_per_band < plan.rows_per_band
    assert small.bytes_per_band + outputs <= 400 * 2**20
    assert small.n_bands == -(-full[0] // small.rows_per_band)
    with pytest.raises(ValueError, match="too small"):
        plan_bands(20, full, memory_limit_mb=300)


def test_cenfunc_mean_matches_astropy() -> None:
    stack = _stack(seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clipped = sigma_clip(stack.astype(np.float64), axis=0, sigma=3, maxiters=3,
                             cenfunc="mean", stdfunc="std", masked=True)
    result = sigma_clipped_combine([ArrayFrameSource(f) for f in stack], cenfunc="mean")
    np.testing.assert_array_equal(result.n_used, clipped.count(axis=0))
    _assert_float32_identical(result.data, clipped.mean(axis=0).filled(np.nan))
