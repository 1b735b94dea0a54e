"""Plate solving against the real astrometry.net tools and index files (installed in CI)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import EarthLocation, SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.utils import iers
from astropy.wcs import WCS

from huntsman.science.astrometry import (
    SolveParams,
    SolveResult,
    available,
    build_index,
    extract_sources,
    pointing_metrics,
    solve_field,
)
from huntsman.science.wcs_writer import strip_wcs
from huntsman.testing.starfield import make_tan_sip_wcs, render_sky_frame, tycho_stars
from huntsman.testing.synthetic import MoffatPSF

iers.conf.auto_download = False
iers.conf.auto_max_age = None

DATA = Path(__file__).resolve().parents[1] / "data" / "huntsman-drp"
SCIENCE = DATA / "raw" / "science_0.fits"
REFCAT = DATA / "refcat.csv"
FULL = (3672, 5496)
SCALE = 1.24


def wcs_rms_arcsec(a: WCS, b: WCS, shape: tuple[int, int], n: int = 25) -> tuple[float, float]:
    """RMS and maximum sky separation (arcsec) of two WCS over an n x n pixel grid."""
    ny, nx = shape
    yy, xx = np.mgrid[0 : ny - 1 : complex(0, n), 0 : nx - 1 : complex(0, n)]
    sep = a.pixel_to_world(xx.ravel(), yy.ravel()).separation(
        b.pixel_to_world(xx.ravel(), yy.ravel())
    ).arcsec
    return float(np.sqrt(np.mean(sep**2))), float(np.max(sep))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, int]
    ra: float
    dec: float
    rotation_deg: float
    fwhm_arcsec: float
    beta: float
    axis_ratio: float
    hint_offset_deg: tuple[float, float] | None  # (dRA, dDec) of the hint; None = blind
    sip: dict[str, float]


CASES = [
    Case("full-dorado", FULL, 65.2, -54.9, 20.0, 3.0, 3.0, 1.0, (0.4, -0.3),
         {"A_2_0": 2e-8, "A_0_2": -1e-8, "B_1_1": 1.5e-8, "B_2_0": -1e-8}),
    Case("full-cosmos-blind", FULL, 150.1, 2.2, 95.0, 4.5, 4.5, 0.85, None,
         {"A_1_1": -1.2e-8, "B_0_2": 2e-8}),
    Case("window-centaurus", (1500, 2000), 201.4, -43.0, 200.0, 2.0, 2.5, 0.95, (-0.2, 0.5),
         {"A_2_0": -1.5e-8, "B_0_2": 1e-8}),
]


@pytest.fixture(scope="module")
def rendered() -> dict[str, tuple[WCS, np.ndarray]]:
    """The synthetic frames, rendered once: true WCS and raw data."""
    out: dict[str, tuple[WCS, np.ndarray]] = {}
    for i, case in enumerate(CASES):
        wcs = make_tan_sip_wcs(case.ra, case.dec, case.shape, SCALE, case.rotation_deg, case.sip)
        psf = MoffatPSF(case.fwhm_arcsec / SCALE, case.beta, case.axis_ratio, 30.0)
        data, truth = render_sky_frame(
            case.shape, wcs, psf, sky_adu=300.0, exptime_s=30.0, seed=10 + i,
            n_extra_stars=1500,
        )
        assert len(truth.x) >= 8, "too few catalogue stars on the frame for a fair test"
        out[case.name] = (wcs, data)
    return out


@pytest.fixture(scope="module")
def refcat_index(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_index(REFCAT, tmp_path_factory.mktemp("refcat-index"))


@pytest.mark.tools("solve-field")
def test_tools_available() -> None:
    ok, reason = available()
    assert ok, reason


@pytest.mark.tools("solve-field", "tycho2")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_synthetic_frames_solve_within_one_arcsec(
    case: Case, rendered: dict[str, tuple[WCS, np.ndarray]], tmp_path: Path
) -> None:
    true_wcs, data = rendered[case.name]
    sources = extract_sources(data)
    hint = (
        (case.ra + case.hint_offset_deg[0], case.dec + case.hint_offset_deg[1])
        if case.hint_offset_deg
        else (None, None)
    )
    result = solve_field(
        case.shape, sources, hint_ra_deg=hint[0], hint_dec_deg=hint[1],
        params=SolveParams(pixel_scale_arcsec=SCALE, timeout_s=60.0), workdir=tmp_path,
    )
    assert result.status == "solved", result.error
    solved = WCS(fits.Header(result.header))
    assert solved.sip is not None  # SIP order 2 fitted and rebuilt from the dict
    rms, worst = wcs_rms_arcsec(true_wcs, solved, case.shape)
    assert rms <= 1.0, f"WCS RMS error {rms:.3f} arcsec"
    assert worst <= 2.0
    assert result.pixel_scale_arcsec == pytest.approx(SCALE, rel=2e-3)
    assert result.rotation_deg is not None
    assert (result.rotation_deg - case.rotation_deg + 180.0) % 360.0 - 180.0 == pytest.approx(
        0.0, abs=0.05
    )
    centre = SkyCoord(case.ra, case.dec, unit="deg")
    assert centre.separation(SkyCoord(result.ra_center, result.dec_center, unit="deg")).arcsec < 2
    assert result.n_matched is not None and result.n_matched >= 6
    assert result.residual_arcsec is not None and result.residual_arcsec < 1.0
    assert result.index_used is not None and result.index_used.startswith("index-tycho2-")
    assert result.blind is (case.hint_offset_deg is None)
    if case.hint_offset_deg:
        expected = centre.separation(SkyCoord(hint[0], hint[1], unit="deg")).arcsec
        assert result.pointing_offset_arcsec == pytest.approx(expected, abs=2.0)
    else:
        assert result.pointing_offset_arcsec is None
    assert result.solve_time_s < 20.0
    for value in result.header.values():
        assert type(value) in (str, int, float)


@pytest.mark.tools("solve-field", "tycho2")
def test_downsampled_positions_still_solve(
    rendered: dict[str, tuple[WCS, np.ndarray]], tmp_path: Path
) -> None:
    case = CASES[2]
    true_wcs, data = rendered[case.name]
    result = solve_field(
        case.shape, extract_sources(data), hint_ra_deg=case.ra, hint_dec_deg=case.dec,
        params=SolveParams(pixel_scale_arcsec=SCALE, downsample=2), workdir=tmp_path,
    )
    assert result.status == "solved", result.error
    rms, _ = wcs_rms_arcsec(true_wcs, WCS(fits.Header(result.header)), case.shape)
    assert rms <= 1.0


@pytest.mark.tools("tycho2")
def test_extract_sources_finds_catalogue_stars(
    rendered: dict[str, tuple[WCS, np.ndarray]],
) -> None:
    case = CASES[2]
    true_wcs, data = rendered[case.name]
    before = data.copy()
    x, y, flux = extract_sources(data)
    np.testing.assert_array_equal(data, before)
    assert np.all(np.diff(flux) <= 0)
    cat = tycho_stars(case.ra, case.dec, 0.6)
    cx, cy = true_wcs.all_world2pix(cat.ra_deg, cat.dec_deg, 0)
    on = (cx > 20) & (cx < case.shape[1] - 20) & (cy > 20) & (cy < case.shape[0] - 20)
    d = np.hypot(cx[on][:, None] - x[None, :], cy[on][:, None] - y[None, :]).min(axis=1)
    assert np.median(d) < 0.15
    assert np.mean(d < 1.0) >= 0.8  # a few blend with the random faint stars


@pytest.mark.tools("solve-field")
def test_science_frame_solves_with_index_built_from_refcat(
    refcat_index: list[Path], tmp_path: Path
) -> None:
    assert len(refcat_index) >= 3 and all(p.exists() for p in refcat_index)
    with fits.open(SCIENCE) as hdul:
        header = hdul[0].header.copy()
        data = hdul[0].data.astype(np.float32)
    original = WCS(header)
    stripped = strip_wcs(header)
    assert not WCS(stripped).has_celestial
    params = SolveParams(pixel_scale_arcsec=SCALE, index_dirs=(str(refcat_index[0].parent),), timeout_s=60.0)
    result = solve_field(
        data.shape, extract_sources(data), hint_ra_deg=float(stripped["RA-MNT"]),
        hint_dec_deg=float(stripped["DEC-MNT"]), params=params, workdir=tmp_path,
    )
    assert result.status == "solved", result.error
    assert result.index_used is not None and result.index_used.startswith("index-refcat-")
    rms, worst = wcs_rms_arcsec(original, WCS(fits.Header(result.header)), data.shape)
    assert rms <= 3.0, f"{rms:.2f} arcsec from the original solution"
    assert worst <= 5.0
    assert result.pixel_scale_arcsec == pytest.approx(1.26, abs=0.02)
    assert result.pointing_offset_arcsec is not None and result.pointing_offset_arcsec < 600


@pytest.mark.tools("solve-field")
def test_build_index_applies_quality_cuts(tmp_path: Path) -> None:
    table = Table.read(REFCAT, format="ascii.csv")
    bad = table.copy()
    bad["flags"] = 4  # every star flagged: nothing survives the cuts
    csv = tmp_path / "flagged.csv"
    bad.write(csv, format="ascii.csv")
    with pytest.raises(RuntimeError, match="quality cuts"):
        build_index(csv, tmp_path / "idx")
    files = build_index(REFCAT, tmp_path / "ok", scale_numbers=(2,), index_id_base=777)
    assert [f.name for f in files] == ["index-refcat-02.fits"]
    assert fits.getheader(files[0])["INDEXID"] == 779
    assert not list((tmp_path / "ok").glob(".*")), "temporary catalogue left behind"


def _noise_sources(
    shape: tuple[int, int], n: int = 300
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return (
        rng.uniform(0, shape[1], n), rng.uniform(0, shape[0], n), rng.uniform(1, 100, n),
    )


@pytest.mark.tools("solve-field")
def test_pure_noise_fails_with_clear_reason(tmp_path: Path) -> None:
    params = SolveParams(pixel_scale_arcsec=SCALE, cpu_limit_s=1.0, timeout_s=40.0, max_sources=60)
    result = solve_field(
        FULL, _noise_sources(FULL, 60), hint_ra_deg=65.0, hint_dec_deg=-55.0, params=params,
        workdir=tmp_path,
    )
    assert result.status == "failed"
    assert result.error is not None and result.error.startswith("no solution found")
    assert "blind" in result.error
    assert result.attempts == 2 and result.blind  # hinted, then the blind fallback
    assert result.header == {} and result.ra_center is None
    assert result.solve_time_s < params.timeout_s


@pytest.mark.tools("solve-field", "tycho2")
def test_wrong_hint_falls_back_to_blind(
    rendered: dict[str, tuple[WCS, np.ndarray]], tmp_path: Path
) -> None:
    case = CASES[2]
    true_wcs, data = rendered[case.name]
    params = SolveParams(pixel_scale_arcsec=SCALE, search_radius_deg=2.0, cpu_limit_s=2.0, max_sources=50)
    result = solve_field(
        case.shape, extract_sources(data), hint_ra_deg=case.ra + 15.0, hint_dec_deg=case.dec,
        params=params, workdir=tmp_path,
    )
    assert result.status == "solved", result.error
    assert result.attempts == 2 and result.blind
    rms, _ = wcs_rms_arcsec(true_wcs, WCS(fits.Header(result.header)), case.shape)
    assert rms <= 1.0
    assert result.pointing_offset_arcsec is not None
    assert result.pointing_offset_arcsec == pytest.approx(15.0 * 3600 * np.cos(np.deg2rad(43)),
                                                          rel=0.01)


@pytest.mark.tools("solve-field", "tycho2")
def test_wrong_scale_fails(rendered: dict[str, tuple[WCS, np.ndarray]], tmp_path: Path) -> None:
    case = CASES[2]
    _, data = rendered[case.name]
    params = SolveParams(pixel_scale_arcsec=0.5, cpu_limit_s=3.0, blind_fallback=False)
    result = solve_field(
        case.shape, extract_sources(data), hint_ra_deg=case.ra, hint_dec_deg=case.dec,
        params=params, workdir=tmp_path,
    )
    assert result.status == "failed"
    assert result.error is not None and "no solution" in result.error
    assert result.attempts == 1 and not result.blind


@pytest.mark.tools("solve-field")
def test_wall_time_limit_kills_the_solver(tmp_path: Path) -> None:
    # A blind search of noise over every index with a generous CPU limit: only the wall-time
    # limit can stop it.
    params = SolveParams(pixel_scale_arcsec=SCALE, cpu_limit_s=120.0, timeout_s=2.0, scale_tolerance=0.5)
    result = solve_field(FULL, _noise_sources(FULL, 1000), params=params, workdir=tmp_path)
    assert result.status == "failed"
    assert result.error is not None and result.error.startswith("timeout")
    assert result.solve_time_s < params.timeout_s + 2.0


def test_missing_tools_or_indexes_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "no-indexes"
    empty.mkdir()
    ok, reason = available([empty])
    assert not ok and "no astrometry.net index files" in reason
    result = solve_field(
        FULL, _noise_sources(FULL), params=SolveParams(pixel_scale_arcsec=SCALE, index_dirs=(str(empty),)),
        workdir=tmp_path,
    )
    assert result.status == "failed" and result.error == reason
    monkeypatch.setenv("PATH", str(empty))
    ok, reason = available()
    assert not ok and "solve-field not found" in reason
    monkeypatch.setenv("PATH", os.defpath)


def test_too_few_sources(tmp_path: Path) -> None:
    result = solve_field(FULL, (np.ones(3), np.ones(3), np.ones(3)),
                         params=SolveParams(pixel_scale_arcsec=SCALE), workdir=tmp_path)
    assert result == SolveResult(status="failed", error="too few sources to solve (3 < 4)")


@pytest.mark.tools("tycho2")
def test_tycho_reader_matches_skymapper_positions() -> None:
    cat = tycho_stars(65.0, -55.0, 0.9)
    assert 50 < len(cat.ra_deg) < 500
    assert np.all(np.diff(cat.mag) >= 0) and 3.0 < cat.mag[0] < cat.mag[-1] < 14.0
    ref = Table.read(REFCAT, format="ascii.csv")
    tyc = SkyCoord(cat.ra_deg, cat.dec_deg, unit="deg")
    _, sep, _ = tyc.match_to_catalog_sky(SkyCoord(ref["raj2000"], ref["dej2000"], unit="deg"))
    matched = sep.arcsec < 2.0
    assert matched.sum() >= 20
    assert np.median(sep.arcsec[matched]) < 0.3  # proper motions 2000 -> 2016 only
    centre = SkyCoord(65.0, -55.0, unit="deg")
    assert np.all(tyc.separation(centre).deg <= 0.9)


def test_pointing_metrics_match_header_values() -> None:
    header = fits.getheader(SCIENCE)
    wcs_header = dict(WCS(header).to_header(relax=True))
    when = dt.datetime(2021, 1, 18, 11, 26, 32, 228000, tzinfo=dt.UTC)
    m = pointing_metrics(
        wcs_header, (800, 800), when,
        site=EarthLocation.from_geodetic(lon=header["LONG-OBS"] * u.deg,
                                         lat=header["LAT-OBS"] * u.deg,
                                         height=header["ELEV-OBS"] * u.m),
        mount_ra_deg=header["RA-MNT"], mount_dec_deg=header["DEC-MNT"],
    )
    assert 1.0 / np.sin(np.deg2rad(m.alt_deg)) == pytest.approx(header["AIRMASS"], abs=0.01)
    # The header's MOONSEP (88.9 deg) is wrong; check against a low-precision lunar theory
    # (~1 deg): geocentric ecliptic longitude and latitude from mean elements.
    d = (when - dt.datetime(2000, 1, 1, 12, tzinfo=dt.UTC)).total_seconds() / 86400.0
    lon = 218.316 + 13.176396 * d + 6.289 * np.sin(np.deg2rad(134.963 + 13.064993 * d))
    lat = 5.128 * np.sin(np.deg2rad(93.272 + 13.229350 * d))
    moon = SkyCoord(lon % 360.0, lat, unit="deg", frame="geocentrictrueecliptic")
    centre = WCS(header).pixel_to_world(399.5, 399.5)
    expected = moon.transform_to("icrs").separation(centre.transform_to("icrs")).deg
    assert m.moon_separation_deg == pytest.approx(expected, abs=2.0)
    assert 0.0 <= m.az_deg < 360.0
    assert m.pointing_offset_arcsec is not None and 100 < m.pointing_offset_arcsec < 1000
    no_mount = pointing_metrics(wcs_header, (800, 800), when)
    assert no_mount.pointing_offset_arcsec is None
