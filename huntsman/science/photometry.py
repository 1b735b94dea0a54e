"""Sky brightness, photometric zeropoint and 5σ depth of a calibrated science frame.

The background is :mod:`huntsman.science.background`, the centroids
:mod:`huntsman.science.centroid` and every MAD clipping
:mod:`huntsman.science.robust`; this module holds the star measurements and the photometry.

Conventions
-----------
* The input frame is *calibrated*: ``(raw − bias − dark·t) / flat`` with a flat of median 1,
  in ADU accumulated over the whole exposure (not per second).
* ``zeropoint`` is defined by ``m = −2.5·log10(F / t) + zeropoint`` where ``F`` is the **total**
  flux of a point source in ADU on that frame and ``t`` the exposure time (s).
* Pixel coordinates are 0-based with the centre of the first pixel at (0, 0), as in numpy, sep
  and ``WCS.all_world2pix(..., 0)``.

Method
------
1. Background: :func:`~huntsman.science.background.estimate_background` (the service's
   ``sep.Background`` mesh policy) over the unmasked pixels.  ``sky_adu`` is the median of
   the background map, ``sky_rms_adu`` the median of the RMS map (ADU per pixel).
2. Positions: reference stars are projected through the WCS, moved to the brightest 3×3 spot
   within ``max_match_sep_arcsec`` and refined with a windowed centroid (``sep.winpos``).
   Stars near an edge, with masked pixels, peaks above ``saturation_adu``, or another catalogue
   star within ``isolation_fwhm_factor``·FWHM are not used.
3. Aperture photometry (``sep.sum_circle``, exact pixel overlap)
   in three radii scaled to the FWHM: the zeropoint aperture ``r_ap``, the depth aperture
   ``r_depth`` and a large "total" aperture ``r_tot``, on the frame itself with the
   sigma-clipped median of an annulus as local background (a global background map bulges
   under bright stars).  The variance of an aperture flux ``f`` (ADU) is
   ``A·σ² + A²·σ²·(π/2)/N_ann + f/g`` (sky noise in the aperture, error of the annulus median,
   source shot noise; ``σ`` the local background RMS, ``g`` the gain in e⁻/ADU).
4. Aperture correction to total flux ``C = f_tot / f_ap``: a curve of growth from ``r_ap`` to
   ``r_tot`` (6 FWHM: all but 0.3 % of a Moffat β = 2.5, 0.1 % at β = 3) built ring by ring
   over bright, isolated, unsaturated stars; each ring's share is a clipped least-squares
   slope of ring flux against ``f_ap`` (a faint neighbour in one ring of one star is
   rejected).  Rings use the annulus clipped *mean* (a least-squares sum must include the
   unresolved faint-source light a median misses); star apertures use the clipped *median*,
   consistent with the robust combination of step 5.
5. Zeropoint: per star ``zp_i = m_i + 2.5·log10(C_ap·f_ap,i / t)``; an iteratively clipped
   (median ± ``clip_sigma``·MAD-σ) inverse-variance weighted mean with weights
   ``1/(σ_phot² + σ_cat²)``.  Its error is ``sqrt(max(1, χ²_ν)/Σw + σ_C²)``: the formal error
   inflated by the excess scatter, plus the aperture-correction error.
6. 5σ depth: the aperture flux ``f`` with ``f / sqrt(B + f/g) = 5`` where
   ``B = A·σ²·(1 + (π/2)·A/N_ann)`` and ``A = π r_depth²``, i.e.
   ``f = (25/g + sqrt((25/g)² + 100·B)) / 2``; the total flux is ``F = C_depth·f`` and
   ``limiting_mag_5sigma = zeropoint − 2.5·log10(F / t)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import sep
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from huntsman.science.background import SkyBackground, estimate_background
from huntsman.science.centroid import refine_positions
from huntsman.science.refcat import (
    RefCatalogue,
    astrometric_residual,
    match_sources,
    project,
    select_in_field,
)
from huntsman.science.robust import clipped_rows, mad_std
from huntsman.values import finite_or_none

__all__ = [
    "PhotometryParams",
    "PhotometryResult",
    "annulus_background",
    "limiting_flux_5sigma",
    "measure_photometry",
]

_MAG_PER_SNR = 2.5 / math.log(10.0)  # σ_mag = 1.0857 / SNR


@dataclasses.dataclass(frozen=True)
class PhotometryParams:
    """Tunable parameters of :func:`measure_photometry` (radii in units of the FWHM).

    Attributes
    ----------
    aperture_fwhm_factor : float
        Zeropoint aperture radius / FWHM.  1.5 keeps the aperture correction small (≈5 %) and
        insensitive to a mild PSF variation across the field.
    depth_aperture_fwhm_factor : float
        Aperture radius / FWHM in which the 5σ depth is quoted (≈ the S/N-optimal radius of a
        sky-limited Moffat source).
    total_fwhm_factor : float
        Radius / FWHM of the aperture taken as "total" flux for the aperture correction.
    annulus_fwhm_factors : (float, float)
        Inner and outer radius / FWHM of the local-background annulus.
    isolation_fwhm_factor : float
        A star with another catalogue star closer than this (× FWHM) is not used.
    max_match_sep_arcsec : float
        Largest offset between the WCS-predicted and measured position, arcsec.
    saturation_adu : float
        Calibrated pixel value (ADU, sky included) at and above which a star counts as
        saturated or non-linear (raw saturation 4094 − bias 32, divided by a flat up to ≈1.15).
    min_snr : float
        Minimum S/N in the zeropoint aperture for a zeropoint star.
    min_apcorr_snr : float
        Minimum S/N in the total aperture for an aperture-correction star.
    max_apcorr_stars : int
        At most this many of the highest-S/N stars define the aperture correction (their
        ring fluxes are combined with weights ∝ flux², so faint ones add little).
    growth_rings : int
        Rings between the zeropoint and total apertures in the curve of growth.
    min_stars : int
        Fewer usable zeropoint stars than this give no zeropoint.
    clip_sigma : float
        Clipping threshold of the zeropoint combination.
    default_catalogue_err_mag : float
        Catalogue error used where the catalogue gives none (mag).
    """

    aperture_fwhm_factor: float = 1.5
    depth_aperture_fwhm_factor: float = 0.8
    total_fwhm_factor: float = 6.0
    annulus_fwhm_factors: tuple[float, float] = (7.0, 10.0)
    isolation_fwhm_factor: float = 4.0
    max_match_sep_arcsec: float = 6.0
    saturation_adu: float = 3500.0
    min_snr: float = 20.0
    min_apcorr_snr: float = 20.0
    max_apcorr_stars: int = 100
    growth_rings: int = 8
    min_stars: int = 5
    clip_sigma: float = 3.0
    annulus_clip_sigma: float = 3.0
    default_catalogue_err_mag: float = 0.03

    def __post_init__(self) -> None:
        r_in, r_out = self.annulus_fwhm_factors
        if not (self.depth_aperture_fwhm_factor > 0 and 0 < self.aperture_fwhm_factor
                <= self.total_fwhm_factor < r_in < r_out):
            raise ValueError(
                "need 0 < aperture_fwhm_factor <= total_fwhm_factor < annulus inner < outer"
            )
        if self.min_stars < 1:
            raise ValueError("min_stars must be >= 1")


@dataclasses.dataclass(frozen=True)
class PhotometryResult:
    """Sky, zeropoint and depth of one calibrated frame; plain Python numbers, None if unknown.

    Attributes
    ----------
    sky_adu : float or None
        Median sky level per pixel over the exposure (ADU).
    sky_rms_adu : float or None
        Median background RMS per pixel (ADU).
    sky_mag_arcsec2 : float or None
        Sky surface brightness, mag/arcsec² (needs the zeropoint).
    zeropoint, zeropoint_err : float or None
        ``m = −2.5·log10(ADU/s) + zeropoint`` for total flux, and its standard error (mag).
    n_zeropoint_stars : int
        Stars kept in the zeropoint combination.
    limiting_mag_5sigma : float or None
        5σ point-source depth (mag), in the depth aperture, corrected to total flux.
    aperture_radius_px, depth_aperture_radius_px : float or None
        Zeropoint and depth aperture radii (px).
    aperture_correction_mag : float or None
        ``2.5·log10(f_tot/f_ap)`` applied to the zeropoint aperture (mag, ≥ 0 normally).
    n_aperture_correction_stars : int
        Stars that defined the aperture correction.
    astrometric_median_arcsec, astrometric_rms_arcsec : float or None
        Median and RMS separation of measured from catalogue positions of matched stars.
    n_astrometric_stars : int
        Stars in the astrometric residual.
    n_catalogue_in_field : int
        Catalogue stars with a magnitude in the filter that project inside the frame.
    error : str or None
        Why a quantity is missing (None when everything was measured).
    """

    sky_adu: float | None
    sky_rms_adu: float | None
    sky_mag_arcsec2: float | None = None
    zeropoint: float | None = None
    zeropoint_err: float | None = None
    n_zeropoint_stars: int = 0
    limiting_mag_5sigma: float | None = None
    aperture_radius_px: float | None = None
    depth_aperture_radius_px: float | None = None
    aperture_correction_mag: float | None = None
    n_aperture_correction_stars: int = 0
    astrometric_median_arcsec: float | None = None
    astrometric_rms_arcsec: float | None = None
    n_astrometric_stars: int = 0
    n_catalogue_in_field: int = 0
    error: str | None = None


def limiting_flux_5sigma(
    sigma_pix_adu: float, area_px: float, annulus_area_px: float, gain_e_per_adu: float,
    nsigma: float = 5.0,
) -> float:
    """Aperture flux (ADU) detected at ``nsigma`` in a sky-noise-limited aperture.

    Solves ``f / sqrt(B + f/g) = n`` with ``B = A·σ²·(1 + (π/2)·A/N_ann)``:
    ``f = (n²/g + sqrt(n⁴/g² + 4·n²·B)) / 2``.

    Parameters
    ----------
    sigma_pix_adu : float
        Background noise per pixel (ADU).
    area_px, annulus_area_px : float
        Aperture and background-annulus areas (px²); ``annulus_area_px = inf`` for a perfectly
        known background.
    gain_e_per_adu : float
        Gain (e⁻/ADU) for the source's own shot noise.
    nsigma : float
        Detection threshold.

    Returns
    -------
    float
        Flux inside the aperture, ADU (not corrected to total).
    """
    b = area_px * sigma_pix_adu**2 * (1.0 + (math.pi / 2.0) * area_px / annulus_area_px)
    n2g = nsigma**2 / gain_e_per_adu
    return 0.5 * (n2g + math.sqrt(n2g**2 + 4.0 * nsigma**2 * b))


@dataclasses.dataclass(frozen=True)
class _Stars:
    """Per-star measurements, all arrays of shape (n,)."""

    x: NDArray[np.float64]
    y: NDArray[np.float64]
    mag: NDArray[np.float64]
    mag_err: NDArray[np.float64]
    ra: NDArray[np.float64]
    dec: NDArray[np.float64]
    bkg_local: NDArray[np.float64]
    bkg_mean: NDArray[np.float64]
    f_ap: NDArray[np.float64]
    var_ap: NDArray[np.float64]
    f_depth: NDArray[np.float64]
    f_tot: NDArray[np.float64]
    var_tot: NDArray[np.float64]
    usable: NDArray[np.bool_]  # unsaturated, unmasked, isolated, good background (zeropoint aperture)
    usable_tot: NDArray[np.bool_]  # same for the total aperture, plus isolation out to the annulus


def _measure_stars(
    bg: SkyBackground, data: NDArray[np.number[Any]], cat: RefCatalogue,
    x0: NDArray[np.float64], y0: NDArray[np.float64], filter_name: str, fwhm_px: float,
    search_px: float, gain: float, p: PhotometryParams,

) -> _Stars:
    ny, nx = bg.sub.shape
    r_ap = p.aperture_fwhm_factor * fwhm_px
    r_depth = p.depth_aperture_fwhm_factor * fwhm_px
    r_tot = p.total_fwhm_factor * fwhm_px
    r_in, r_out = (f * fwhm_px for f in p.annulus_fwhm_factors)
    mag_all = cat.mag(filter_name)
    err_all = cat.mag_err(filter_name)

    # Isolation against every in-field catalogue star (with or without a magnitude here).
    tree = cKDTree(np.column_stack([x0, y0]))
    n_close = np.asarray(tree.query_ball_point(np.column_stack([x0, y0]),
                                               p.isolation_fwhm_factor * fwhm_px,
                                               return_length=True))
    n_close_tot = np.asarray(tree.query_ball_point(np.column_stack([x0, y0]), r_out,
                                                   return_length=True))
    edge = r_ap + search_px + 1.0
    # Only usable stars are ever used (zeropoint, aperture correction, astrometry), so crowded
    # ones are not even centroided.
    cand = np.isfinite(mag_all) & (x0 >= edge) & (x0 <= nx - 1 - edge) & (y0 >= edge) \
        & (y0 <= ny - 1 - edge) & (n_close <= 1)
    idx = np.flatnonzero(cand)
    xw, yw, ok = refine_positions(bg.sub, bg.bad, x0[idx], y0[idx], search_px, fwhm_px)
    idx, xw, yw = idx[ok], xw[ok], yw[ok]

    n = idx.size
    ann_area = math.pi * (r_out**2 - r_in**2)
    xc, yc = np.rint(xw).astype(np.intp), np.rint(yw).astype(np.intp)
    sigma = bg.rms[yc, xc].astype(float)
    bkg_local, bkg_mean, n_ann = annulus_background(bg.image, bg.bad, xw, yw, r_in, r_out,
                                                    p.annulus_clip_sigma)
    # Aperture pixels by integer offsets from (xc, yc), as in annulus_background.
    R = math.ceil(r_tot + 0.5) + 1
    off = np.arange(-R, R + 1)
    oy, ox = (a.ravel() for a in np.meshgrid(off, off, indexing="ij"))
    in_disk = np.hypot(ox, oy) <= r_tot + 0.5 + _TEMPLATE_SLACK
    ox, oy = ox[in_disk], oy[in_disk]
    n_chunk = max(1, 2_000_000 // max(ox.size, 1))
    bad_flat, data_flat = bg.bad.ravel(), data.reshape(-1)
    unsat = np.zeros(n, dtype=bool)
    clean_ap = np.zeros(n, dtype=bool)
    clean_tot = np.zeros(n, dtype=bool)
    for sel in np.array_split(np.arange(n), n // n_chunk + 1):
        if sel.size == 0:
            continue
        flat, inside, r = _template_pixels(xc[sel], yc[sel], xw[sel], yw[sel], ox, oy, (ny, nx))
        bad = bad_flat[flat] & inside
        in_ap = r <= r_ap + 0.5
        in_tot = r <= r_tot + 0.5
        peak = np.max(data_flat[flat], axis=1, where=in_ap & inside & ~bad, initial=-np.inf)
        unsat[sel] = peak < p.saturation_adu
        clean_ap[sel] = ~np.any(bad & in_ap, axis=1)
        clean_tot[sel] = ~np.any(bad & in_tot, axis=1)
    clean_tot &= (r_tot <= xw) & (xw <= nx - 1 - r_tot) & (r_tot <= yw) & (yw <= ny - 1 - r_tot)
    good_bkg = np.isfinite(bkg_local) & (n_ann >= 0.4 * ann_area)

    def aperture(radius: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        area = math.pi * radius**2
        s, _, _ = sep.sum_circle(bg.image, xw, yw, radius, subpix=0)
        f = np.asarray(s, float) - bkg_local * area
        n_eff = np.maximum(n_ann, 1.0)
        var = area * sigma**2 * (1.0 + (math.pi / 2.0) * area / n_eff) + np.clip(f, 0, None) \
            / gain
        return f, var

    if n:
        f_ap, var_ap = aperture(r_ap)
        f_depth, _ = aperture(r_depth)
        f_tot, var_tot = aperture(r_tot)
    else:
        f_ap = var_ap = f_depth = f_tot = var_tot = np.zeros(0)
    usable = unsat & clean_ap & good_bkg & (n_close[idx] <= 1)
    usable_tot = usable & clean_tot & (n_close_tot[idx] <= 1)
    err = err_all[idx]
    err = np.where(np.isfinite(err) & (err > 0), err, p.default_catalogue_err_mag)
    return _Stars(
        x=xw, y=yw, mag=mag_all[idx], mag_err=err, ra=cat.ra[idx], dec=cat.dec[idx],
        bkg_local=bkg_local, bkg_mean=bkg_mean, f_ap=f_ap, var_ap=var_ap, f_depth=f_depth,
        f_tot=f_tot, var_tot=var_tot,
        usable=usable, usable_tot=usable_tot,
    )


# A pixel's distance from (x, y) differs from its integer offset's length from (rint(x), rint(y))
# by at most sqrt(1/2): templates this much wider hold every pixel that can count.
_TEMPLATE_SLACK = math.sqrt(0.5) + 1e-6


def _template_pixels(
    xc: NDArray[np.intp], yc: NDArray[np.intp], x: NDArray[np.float64], y: NDArray[np.float64],
    ox: NDArray[np.intp], oy: NDArray[np.intp], shape: tuple[int, int],
) -> tuple[NDArray[np.intp], NDArray[np.bool_], NDArray[np.float64]]:
    """Flat pixel index, in-frame flag and distance, shape (n, m), of the offsets per star."""
    ny, nx = shape
    gx = xc[:, None] + ox
    gy = yc[:, None] + oy
    inside = (gx >= 0) & (gx < nx) & (gy >= 0) & (gy < ny)
    r = np.hypot(gx - x[:, None], gy - y[:, None])
    flat = np.clip(gy, 0, ny - 1) * nx + np.clip(gx, 0, nx - 1)
    return flat, inside, r


def annulus_background(
    image: NDArray[np.floating[Any]], bad: NDArray[np.bool_], x: NDArray[np.float64],
    y: NDArray[np.float64], r_in: float, r_out: float, nsigma: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Sigma-clipped (MAD σ) median and mean of each star's annulus, and its pixel count.

    A pixel belongs to the annulus when its centre lies within ``r_in <= r <= r_out`` of
    ``(x, y)`` and it is not ``bad``; the clipping is
    :func:`~huntsman.science.robust.clipped_rows` (3σ, 5 passes as used here).

    Kept rather than photutils' ``LocalBackground``/``ApertureStats`` because it wins clearly
    for the same numbers (``benchmarks/bench_photometry.py``: 5496×3672 frame, 2000 stars,
    annulus 21–30 px, 3σ MAD clip, photutils 3.0, a loaded 2-core machine): ours 2.2 s for
    median, mean and count; ``LocalBackground`` 9.7 s (4.4×) for the median alone, identical
    to ours; ``ApertureStats`` 14.4 s (6.5×), medians within 0.01 ADU for 99.6 % of stars.

    Parameters
    ----------
    image : numpy.ndarray, float, shape (ny, nx)
        Frame (ADU).
    bad : numpy.ndarray of bool, shape (ny, nx)
        Pixels never used.
    x, y : numpy.ndarray, shape (n,)
        0-based star centres (px).
    r_in, r_out : float
        Annulus radii (px).
    nsigma : float
        Clipping threshold.

    Returns
    -------
    median, mean, count : numpy.ndarray, shape (n,)
        NaN, NaN, 0 for a star without a usable annulus pixel.
    """
    ny, nx = image.shape
    n = x.size
    xc, yc = np.rint(x).astype(np.intp), np.rint(y).astype(np.intp)
    R = math.ceil(r_out) + 1
    off = np.arange(-R, R + 1)
    oy, ox = (a.ravel() for a in np.meshgrid(off, off, indexing="ij"))
    rho = np.hypot(ox, oy)
    in_ring = (rho >= r_in - _TEMPLATE_SLACK) & (rho <= r_out + _TEMPLATE_SLACK)
    ox, oy = ox[in_ring], oy[in_ring]
    n_chunk = max(1, 2_000_000 // max(ox.size, 1))
    bad_flat, image_flat = bad.ravel(), image.ravel()
    median = np.full(n, np.nan)
    mean = np.full(n, np.nan)
    count = np.zeros(n)
    for sel in np.array_split(np.arange(n), n // n_chunk + 1):
        if sel.size == 0:
            continue
        flat, inside, r = _template_pixels(xc[sel], yc[sel], x[sel], y[sel], ox, oy, (ny, nx))
        ann = inside & (r >= r_in) & (r <= r_out) & ~bad_flat[flat]
        median[sel], mean[sel], count[sel] = clipped_rows(image_flat[flat], ann, nsigma)
    return median, mean, count


def _ring_growth(d_flux: NDArray[np.float64], f_ap: NDArray[np.float64], clip: float) -> float:
    """Robust least-squares slope of ring flux against aperture flux (through the origin).

    Sky-limited ring fluxes have about the same noise (ADU) for every star, so the slope
    ``Σ f_ap·Δf / Σ f_ap²`` weights the bright stars as it should; residuals (ADU) beyond
    ``clip`` MAD-σ (a faint neighbour in the ring) are rejected first.
    """
    keep = np.isfinite(d_flux) & np.isfinite(f_ap)
    g = float(np.median(d_flux[keep] / f_ap[keep]))
    for _ in range(10):
        resid = d_flux - g * f_ap
        s = mad_std(resid[keep])
        new = keep & (np.abs(resid) <= clip * s) if s > 0 else keep
        if new.sum() < 3:
            break
        g = float(np.sum(f_ap[new] * d_flux[new]) / np.sum(f_ap[new] ** 2))
        if np.array_equal(new, keep):
            break
        keep = new
    return g


def _aperture_correction(
    bg: SkyBackground, st: _Stars, fwhm_px: float, p: PhotometryParams
) -> tuple[float, float, float, int]:
    """(C_ap, σ(C_ap) in mag, C_depth, n) with C = f_tot / f_aperture.

    The curve of growth from ``r_ap`` to ``r_tot`` is built ring by ring, each ring's share
    being a clipped least-squares slope over the stars: a faint neighbour falls in one thin
    ring of one star and is rejected, whereas whole ``f_tot / f_ap`` ratios are biased high by
    the ≈1 faint source a large aperture holds on average in a deep field.  The error is the
    bootstrap-free estimate from the scatter of per-star growth, weighted like the slope.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        snr_tot = st.f_tot / np.sqrt(st.var_tot)
    ok = st.usable_tot & (st.f_ap > 0) & (st.f_depth > 0)
    sel = np.flatnonzero(ok & (snr_tot >= p.min_apcorr_snr))
    if sel.size < 3:
        return math.nan, math.nan, math.nan, int(sel.size)
    sel = sel[np.argsort(-snr_tot[sel])][: p.max_apcorr_stars]
    x, y, f_ap = st.x[sel], st.y[sel], st.f_ap[sel]
    # Ring fluxes are mean-type estimates (least squares), so they take the annulus *mean* as
    # background: it includes the light of unresolved faint sources that also falls in the
    # rings, which a median misses and which would otherwise pile up as spurious growth.
    bkg = st.bkg_mean[sel]
    radii = np.linspace(p.aperture_fwhm_factor, p.total_fwhm_factor, p.growth_rings + 1)
    r0 = radii[0] * fwhm_px
    s0, _, _ = sep.sum_circle(bg.image, x, y, r0, subpix=0)
    prev = np.asarray(s0, float) - bkg * math.pi * r0**2
    growth = 1.0
    for r in radii[1:] * fwhm_px:
        s, _, _ = sep.sum_circle(bg.image, x, y, r, subpix=0)
        f = np.asarray(s, float) - bkg * math.pi * r**2
        growth += _ring_growth(f - prev, f_ap, p.clip_sigma)
        prev = f
    prev = f_ap + (prev - (np.asarray(s0, float) - bkg * math.pi * r0**2))
    # Error of the slope f_tot ≈ C·f_ap from its residuals.
    resid = prev - growth * f_ap
    s = mad_std(resid)
    err_c = s / math.sqrt(float(np.sum(f_ap**2))) if sel.size > 1 else math.inf
    err_mag = _MAG_PER_SNR * err_c / growth
    inner = _ring_growth(f_ap - st.f_depth[sel], st.f_depth[sel], p.clip_sigma) + 1.0
    return growth, err_mag, growth * inner, int(sel.size)


def _combine_zeropoint(
    zp: NDArray[np.float64], sig: NDArray[np.float64], clip: float
) -> tuple[float, float, int]:
    """Clipped inverse-variance weighted mean of per-star zeropoints, its error (Birge-scaled)."""
    keep = np.isfinite(zp) & np.isfinite(sig) & (sig > 0)
    for _ in range(10):
        if keep.sum() < 3:
            break
        med = np.median(zp[keep])
        mad = mad_std(zp[keep], med)
        scale = max(mad, float(np.median(sig[keep])) * 0.5, 1e-4)
        new = keep & (np.abs(zp - med) <= clip * np.hypot(scale, 0.0))
        if np.array_equal(new, keep):
            break
        keep = new
    n = int(keep.sum())
    if n == 0:
        return math.nan, math.nan, 0
    w = 1.0 / sig[keep] ** 2
    mean = float(np.sum(w * zp[keep]) / np.sum(w))
    err2 = 1.0 / float(np.sum(w))
    if n > 1:
        chi2nu = float(np.sum(w * (zp[keep] - mean) ** 2)) / (n - 1)
        err2 *= max(1.0, chi2nu)
    return mean, math.sqrt(err2), n


def measure_photometry(
    data: NDArray[np.number[Any]],
    mask: NDArray[np.bool_ | np.integer[Any]] | None,
    *,
    exptime_s: float,
    wcs: WCS | None,
    catalogue: RefCatalogue | None,
    filter_name: str,
    fwhm_px: float | None,
    pixel_scale_arcsec: float | None,
    gain_e_per_adu: float,
    read_noise_e: float,
    params: PhotometryParams = PhotometryParams(),
    background: SkyBackground | None = None,
) -> PhotometryResult:
    """Sky level and brightness, photometric zeropoint and 5σ depth of a calibrated frame.

    Parameters
    ----------
    data : numpy.ndarray, shape (ny, nx)
        Calibrated frame (ADU over the exposure, flat with median 1); not modified.
    mask : numpy.ndarray of bool, shape (ny, nx), or None
        True for pixels to ignore (defects, cosmetics).  Non-finite pixels are always ignored.
    exptime_s : float
        Exposure time, s.
    wcs : astropy.wcs.WCS or None
        Celestial WCS of the frame; None gives the sky numbers only.
    catalogue : RefCatalogue or None
        Reference stars (already quality-cut, e.g. by :func:`~huntsman.science.refcat.load_catalogue`).
    filter_name : str
        Filter whose catalogue magnitudes are used (e.g. ``'g_band'``).
    fwhm_px : float or None
        Measured stellar FWHM, px; apertures scale with it.
    pixel_scale_arcsec : float or None
        Pixel scale, arcsec/px; taken from the WCS when None.
    gain_e_per_adu : float
        Gain, e⁻/ADU (source shot noise in the error model).
    read_noise_e : float
        Read noise, e⁻.  Used only as a floor on the per-pixel noise: the measured
        background RMS already contains it.
    params : PhotometryParams
        Aperture radii, cuts and clipping.
    background : SkyBackground or None
        :func:`~huntsman.science.background.estimate_background` of the same ``data`` and
        ``mask`` when already computed (e.g. shared with the PSF measurement); estimated
        here when None.

    Returns
    -------
    PhotometryResult
        Always carries the sky numbers; ``error`` says why anything else is missing.  Never
        raises for an empty field, a missing WCS or too few stars.

    Raises
    ------
    ValueError
        Programming errors: not a 2-D frame, mask of the wrong shape, non-positive exposure or
        gain.
    """
    if data.ndim != 2:
        raise ValueError(f"data must be 2-D, got shape {data.shape}")
    if not exptime_s > 0 or not gain_e_per_adu > 0:
        raise ValueError("exptime_s and gain_e_per_adu must be positive")
    if background is not None and background.image.shape != data.shape:
        raise ValueError(f"background shape {background.image.shape} != data shape {data.shape}")
    bg = estimate_background(data, mask) if background is None else background
    sky = finite_or_none(bg.sky_adu)
    rn_adu = read_noise_e / gain_e_per_adu
    sky_rms = finite_or_none(max(bg.sky_rms_adu, rn_adu))
    base = PhotometryResult(sky_adu=sky, sky_rms_adu=sky_rms)

    missing = _missing_input(wcs, catalogue, filter_name, fwhm_px)
    if missing is not None:
        return dataclasses.replace(base, error=missing)
    assert wcs is not None and catalogue is not None and fwhm_px is not None
    scale = pixel_scale_arcsec or float(
        np.sqrt(np.prod(proj_plane_pixel_scales(wcs.celestial))) * 3600.0)

    infield = select_in_field(catalogue, wcs, data.shape, margin_px=0.0)
    n_in = int(np.count_nonzero(np.isfinite(infield.mag(filter_name))))
    base = dataclasses.replace(base, n_catalogue_in_field=n_in)
    if n_in == 0:
        return dataclasses.replace(base, error="no reference stars in the field")

    x0, y0 = project(infield, wcs)
    search_px = params.max_match_sep_arcsec / scale
    st = _measure_stars(bg, data, infield, x0, y0, filter_name, fwhm_px, search_px,
                        gain_e_per_adu, params)
    r_ap = params.aperture_fwhm_factor * fwhm_px
    r_depth = params.depth_aperture_fwhm_factor * fwhm_px
    base = dataclasses.replace(base, aperture_radius_px=finite_or_none(r_ap),
                               depth_aperture_radius_px=finite_or_none(r_depth))

    # Astrometric residual over every well-measured star.
    with np.errstate(divide="ignore", invalid="ignore"):
        snr_ap = st.f_ap / np.sqrt(st.var_ap)
    astro = np.flatnonzero((snr_ap >= params.min_snr) & st.usable)
    res = astrometric_residual(match_sources(
        st.ra[astro], st.dec[astro], st.x[astro], st.y[astro], wcs,
        params.max_match_sep_arcsec))
    base = dataclasses.replace(
        base, astrometric_median_arcsec=finite_or_none(res.median_arcsec),
        astrometric_rms_arcsec=finite_or_none(res.rms_arcsec), n_astrometric_stars=res.n)

    c_ap, c_err_mag, c_depth, n_c = _aperture_correction(bg, st, fwhm_px, params)
    base = dataclasses.replace(base, n_aperture_correction_stars=n_c)
    if not math.isfinite(c_ap):
        return dataclasses.replace(
            base, error=f"aperture correction: only {n_c} bright isolated unsaturated stars")
    base = dataclasses.replace(base, aperture_correction_mag=finite_or_none(2.5 * math.log10(c_ap)))

    use = st.usable & (snr_ap >= params.min_snr) & (st.f_ap > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp_i = st.mag + 2.5 * np.log10(c_ap * st.f_ap / exptime_s)
    sig_i = np.hypot(_MAG_PER_SNR / snr_ap, st.mag_err)
    zp_i = np.where(use, zp_i, np.nan)
    zp, zp_err, n_zp = _combine_zeropoint(zp_i, sig_i, params.clip_sigma)
    if n_zp < params.min_stars:
        return dataclasses.replace(
            base, n_zeropoint_stars=n_zp,
            error=f"only {n_zp} usable zeropoint stars (< {params.min_stars})")
    zp_err = math.hypot(zp_err, c_err_mag)

    sky_mag = None
    if sky is not None and sky > 0:
        sky_mag = finite_or_none(zp - 2.5 * math.log10(sky / exptime_s / scale**2))
    lim = None
    if sky_rms is not None and math.isfinite(c_depth):
        lim = _limiting_mag(zp, sky_rms, c_depth, fwhm_px, exptime_s, gain_e_per_adu, params)
    return dataclasses.replace(
        base, zeropoint=finite_or_none(zp), zeropoint_err=finite_or_none(zp_err),
        n_zeropoint_stars=n_zp, sky_mag_arcsec2=sky_mag, limiting_mag_5sigma=lim,
    )


def _missing_input(
    wcs: WCS | None, catalogue: RefCatalogue | None, filter_name: str, fwhm_px: float | None
) -> str | None:
    """Why the zeropoint cannot be attempted (no WCS, catalogue, filter or FWHM), or None."""
    if wcs is None or not wcs.has_celestial:
        return "no WCS: zeropoint not measured"
    if catalogue is None:
        return "no reference catalogue: zeropoint not measured"
    if filter_name not in catalogue.mags:
        return f"reference catalogue has no magnitudes for filter {filter_name!r}"
    if fwhm_px is None or not (math.isfinite(fwhm_px) and fwhm_px > 0):
        return "no FWHM: zeropoint not measured"
    return None


def _limiting_mag(
    zp: float, sky_rms: float, c_depth: float, fwhm_px: float, exptime_s: float,
    gain_e_per_adu: float, params: PhotometryParams,
) -> float | None:
    """5σ total-flux depth (mag) in the depth aperture (method step 6)."""
    r_depth = params.depth_aperture_fwhm_factor * fwhm_px
    r_in, r_out = (f * fwhm_px for f in params.annulus_fwhm_factors)
    f5 = limiting_flux_5sigma(sky_rms, math.pi * r_depth**2,
                              math.pi * (r_out**2 - r_in**2), gain_e_per_adu)
    return finite_or_none(zp - 2.5 * math.log10(c_depth * f5 / exptime_s))
