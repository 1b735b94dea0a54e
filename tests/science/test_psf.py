"""PSF measurement against synthetic frames of known Moffat PSF and the real science frame."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy.optimize import brentq

from huntsman.models import DetectorConstants
from huntsman.science.psf import image_fwhm, measure_psf, true_image_fwhm
from huntsman.testing import synthetic as syn
from tests.support.psfex_runner import run_psfex

RAW = Path(__file__).parent.parent / "data" / "huntsman-drp" / "raw"
SCALE = 1.24
DET = DetectorConstants()
# The camera of the synthetic frames (measure_psf has no camera default).
CAMERA = {"saturation_adu": DET.saturation_adu, "gain_e_per_adu": DET.gain_e_per_adu}

# (FWHM arcsec, beta, axis ratio, theta deg, sky ADU in 300 s): spans 2-4.5", beta 2.5-4.5.
CASES = [
    (2.0, 2.5, 1.00, 0.0, 150.0),
    (2.0, 4.5, 0.90, 30.0, 800.0),
    (2.6, 3.0, 1.00, 0.0, 400.0),
    (3.0, 3.5, 0.85, 120.0, 1000.0),
    (3.5, 4.0, 0.95, 75.0, 250.0),
    (4.5, 2.5, 0.90, 10.0, 600.0),
    (4.5, 4.5, 1.00, 0.0, 100.0),
]


def _frame(case: tuple[float, float, float, float, float], seed: int) -> tuple[np.ndarray, syn.MoffatPSF]:
    fwhm_arcsec, beta, q, theta, sky = case
    rng = np.random.default_rng(seed)
    shape, n = (1200, 1200), 260
    stars = syn.StarField(
        rng.uniform(0, shape[1], n), rng.uniform(0, shape[0], n), 10 ** rng.uniform(3.0, 5.3, n)
    )
    psf = syn.MoffatPSF(fwhm_arcsec / SCALE, beta, q, theta)
    img = syn.render_frame(shape, exptime_s=300.0, sky_adu=sky, stars=stars, psf=psf, seed=seed)
    return img, psf


@pytest.fixture(scope="module")
def measured() -> list[tuple[float, float, float, float]]:
    """(measured FWHM, true image FWHM, measured ellipticity, true ellipticity) per case."""
    out = []
    for seed, case in enumerate(CASES):
        img, psf = _frame(case, seed)
        res = measure_psf(img, pixel_scale_arcsec=SCALE, **CAMERA)
        assert res.fwhm_px is not None and res.ellipticity is not None, res.error
        true = true_image_fwhm(psf.fwhm_px, psf.beta, psf.axis_ratio, psf.theta_deg)
        out.append((res.fwhm_px, true, res.ellipticity, 1.0 - psf.axis_ratio))
    return out


@pytest.mark.parametrize("i", range(len(CASES)))
def test_fwhm_and_ellipticity_per_frame(
    measured: list[tuple[float, float, float, float]], i: int
) -> None:
    fwhm, true, ell, true_ell = measured[i]
    assert abs(fwhm / true - 1.0) <= 0.03  # issue target; typically < 0.3%
    assert abs(ell - true_ell) <= 0.03


def test_fwhm_error_distribution_over_frames(
    measured: list[tuple[float, float, float, float]],
) -> None:
    errors = np.array([abs(m / t - 1.0) for m, t, _, _ in measured])
    # QC requirement: median <= 2%, p90 <= 4%.  Measured here: median ~0.1%, p90 ~0.3%.
    assert np.median(errors) <= 0.02
    assert np.percentile(errors, 90) <= 0.04


def test_result_fields_consistent() -> None:
    img, psf = _frame(CASES[2], 11)
    res = measure_psf(img, pixel_scale_arcsec=SCALE, **CAMERA)
    assert res.error is None
    assert res.fwhm_px is not None and res.fwhm_arcsec is not None
    assert res.fwhm_arcsec == pytest.approx(res.fwhm_px * SCALE)
    assert 30 <= res.n_stars <= res.n_candidates
    assert res.beta == pytest.approx(psf.beta, rel=0.1)
    assert res.fwhm_scatter_px is not None and 0 < res.fwhm_scatter_px < 0.1 * res.fwhm_px
    cells = [v for row in res.grid_fwhm_px for v in row]
    assert len(cells) == 9 and all(v is not None for v in cells)
    assert all(abs(v / res.fwhm_px - 1) < 0.05 for v in cells if v is not None)


def test_grid_cells_without_stars_are_none() -> None:
    rng = np.random.default_rng(3)
    shape, n = (900, 900), 150
    stars = syn.StarField(
        rng.uniform(20, 280, n), rng.uniform(0, shape[0], n), 10 ** rng.uniform(3.5, 5.0, n)
    )
    img = syn.render_frame(
        shape, exptime_s=300, sky_adu=300, stars=stars, psf=syn.MoffatPSF(2.5, 3.0), seed=3
    )
    res = measure_psf(img, **CAMERA)
    assert res.n_stars > 10
    for row in res.grid_fwhm_px:
        assert row[0] is not None
        assert row[1] is None and row[2] is None


def test_true_image_fwhm_matches_brute_force_integration() -> None:
    # Independent check of the definition for a circular Moffat: integrate the profile over a
    # pixel by a dense midpoint rule and find the half-maximum radius along x by root finding.
    fwhm, beta = 1.6, 3.0
    alpha = syn.moffat_alpha(fwhm, beta)
    sub = (np.arange(200) + 0.5) / 200 - 0.5
    u, v = np.meshgrid(sub, sub)

    def pixel_value(x: float) -> float:
        return float(np.mean((1 + ((x + u) ** 2 + v**2) / alpha**2) ** -beta))

    peak = pixel_value(0.0)
    r_half = brentq(lambda x: pixel_value(x) - peak / 2, 0.1, 5.0)
    # Along the axis vs the equal-area diameter differ only by the square pixel's tiny
    # anisotropy (< 0.5% at 1.6 px).
    assert true_image_fwhm(fwhm, beta) == pytest.approx(2 * r_half, rel=0.005)
    assert true_image_fwhm(fwhm, beta) > fwhm * 1.1  # pixel broadening is large when undersampled


def test_image_fwhm_limits() -> None:
    # Well sampled: pixel convolution negligible.  Elliptical: equal-area diameter = sqrt(a b).
    assert true_image_fwhm(40.0, 3.0) == pytest.approx(40.0, rel=1e-3)
    assert true_image_fwhm(40.0, 3.0, axis_ratio=0.64) == pytest.approx(32.0, rel=2e-3)
    vec = image_fwhm(np.array([2.0, 3.0]), np.array([2.5, 4.0]))
    assert vec.shape == (2,)
    assert vec[0] == pytest.approx(true_image_fwhm(2.0, 2.5), rel=1e-4)


def test_nothing_measurable_returns_error_not_nan() -> None:
    for data in (
        np.full((300, 300), 100, dtype=np.uint16),
        np.full((300, 300), np.nan),
        np.random.default_rng(0).normal(100, 5, (300, 300)),
        np.zeros((0, 0)),
    ):
        res = measure_psf(data, **CAMERA)
        assert res.n_stars == 0
        assert res.error
        assert res.fwhm_px is None and res.ellipticity is None
        for value in (res.fwhm_arcsec, res.beta, res.fwhm_scatter_px):
            assert value is None or math.isfinite(value)


def test_saturated_stars_rejected_and_input_not_mutated() -> None:
    img, _ = _frame(CASES[2], 5)
    saturated = syn.render_frame(
        img.shape, exptime_s=300, sky_adu=400,
        stars=syn.StarField(np.array([600.0]), np.array([600.0]), np.array([3e6])),
        psf=syn.MoffatPSF(2.5, 3.0), seed=1,
    )
    combined = np.maximum(img, saturated)
    before = combined.copy()
    res = measure_psf(combined, **CAMERA)
    assert np.array_equal(combined, before)
    assert res.fwhm_px is not None
    # The lone saturated star (peak 4094) is never among the fitted candidates.
    res_only = measure_psf(saturated, **CAMERA)
    assert res_only.n_stars == 0 and res_only.error is not None


@pytest.mark.tools("source-extractor", "psfex")
def test_real_science_frame_agrees_with_psfex() -> None:
    path = RAW / "science_0.fits"
    data = fits.getdata(path)
    res = measure_psf(data, pixel_scale_arcsec=SCALE, **CAMERA)
    assert res.fwhm_px is not None and res.fwhm_arcsec is not None, res.error
    # Measured: 2.66 px = 3.30" from ~47 stars; PSFEx on the same raw frame: 2.58 px.
    assert 2.0 < res.fwhm_px < 3.5
    assert res.n_stars >= 20
    ref = run_psfex(path)
    assert res.fwhm_px == pytest.approx(ref.fwhm_px, rel=0.10)
