"""Reference catalogue loading, cuts, caching, field selection and matching."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from huntsman.science.refcat import (
    CatalogueSpec,
    astrometric_residual,
    clear_catalogue_cache,
    load_catalogue,
    match_sources,
    project,
    select_in_field,
)

REFCAT = Path(__file__).resolve().parents[1] / "data" / "huntsman-drp" / "refcat.csv"


def tan_wcs(shape: tuple[int, int] = (800, 1000), scale: float = 1.24) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [65.0, -55.0]
    w.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    w.wcs.cd = [[-scale / 3600, 0.0], [0.0, scale / 3600]]
    return w


def test_skymapper_csv_cuts_match_hand_count() -> None:
    with REFCAT.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    expected = sum(
        1 for r in rows
        if r["class_star"] and float(r["class_star"]) >= 0.9 and r["flags"] == "0"
        and (r["g_psf"] or r["r_psf"])
    )
    cat = load_catalogue(REFCAT)  # SkyMapper defaults: class_star >= 0.9, flags == 0
    assert len(cat) == expected == 676
    assert set(cat.filters) == {"g_band", "r_band"}
    g = cat.mag("g_band")
    assert np.all(np.isfinite(g)) and 9.5 < np.nanmin(g) < np.nanmax(g) < 16
    assert np.all(cat.mag_err("g_band") > 0)
    assert abs(np.median(cat.ra) - 65.0) < 1 and abs(np.median(cat.dec) + 55.0) < 1
    with pytest.raises(ValueError):
        cat.ra[0] = 0.0  # shared through the cache: read-only
    stricter = load_catalogue(REFCAT, CatalogueSpec(min_stellarity=0.99))
    assert len(stricter) == sum(1 for r in rows if float(r["class_star"]) >= 0.99)


def test_magnitude_range_and_isolation() -> None:
    cat = load_catalogue(REFCAT, CatalogueSpec(mag_range=(12.0, 14.0)))
    with REFCAT.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    in_range = sum(
        1 for r in rows
        if any(r[c] and 12.0 <= float(r[c]) <= 14.0 for c in ("g_psf", "r_psf"))
    )
    assert len(cat) == in_range
    g = cat.mag("g_band")
    assert np.all((g[np.isfinite(g)] >= 12.0) & (g[np.isfinite(g)] <= 14.0))
    iso = load_catalogue(REFCAT, CatalogueSpec(min_separation_arcsec=120.0))
    assert 0 < len(iso) < 676


def test_catalogue_cache(tmp_path: Path) -> None:
    clear_catalogue_cache()
    path = tmp_path / "cat.csv"
    path.write_text("ra,dec,gmag\n65.0,-55.0,15.0\n65.1,-55.0,16.0\n")
    spec = CatalogueSpec(format="csv", ra_column="ra", dec_column="dec",
                         mag_columns={"g_band": "gmag"}, err_columns={},
                         stellarity_column=None, flags_column=None)
    a, b = load_catalogue(path, spec), load_catalogue(str(path), spec)
    assert a is b and len(a) == 2
    path.write_text("ra,dec,gmag\n65.0,-55.0,15.0\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c = load_catalogue(path, spec)
    assert c is not a and len(c) == 1
    assert np.all(np.isnan(c.mag_err("g_band")))


def test_generic_csv_with_renamed_columns(tmp_path: Path) -> None:
    path = tmp_path / "generic.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["RA_ICRS", "DE_ICRS", "Gmag", "e_Gmag", "Rmag", "stellar", "qflag"])
        w.writerow([65.0, -55.0, 15.0, 0.01, 14.5, 0.95, 0])
        w.writerow([65.1, -55.1, 16.0, 0.02, "", 0.5, 0])  # galaxy
        w.writerow([65.2, -55.2, 17.0, 0.02, 16.5, 0.99, 2])  # allowed flag 2
        w.writerow([65.3, -55.3, "", "", 16.0, 0.99, 1])  # flag 1 not allowed
        w.writerow([65.4, -55.4, "", "", "", 0.99, 0])  # no magnitude at all
    spec = CatalogueSpec(
        format="csv", ra_column="RA_ICRS", dec_column="DE_ICRS",
        mag_columns={"g_band": "Gmag", "r_band": "Rmag"}, err_columns={"g_band": "e_Gmag"},
        stellarity_column="stellar", min_stellarity=0.9, flags_column="qflag",
        flags_allowed=(0, 2),
    )
    cat = load_catalogue(path, spec)
    np.testing.assert_allclose(cat.ra, [65.0, 65.2])
    np.testing.assert_allclose(cat.mag("g_band"), [15.0, 17.0])
    np.testing.assert_allclose(cat.mag_err("g_band"), [0.01, 0.02])
    assert np.all(np.isnan(cat.mag_err("r_band")))
    with pytest.raises(KeyError, match="i_band"):
        cat.mag("i_band")


def test_fits_table(tmp_path: Path) -> None:
    path = tmp_path / "cat.fits"
    t = Table({
        "ra": np.array([65.0, 65.01, 65.02]), "dec": np.array([-55.0, -55.0, -55.0]),
        "g": np.array([14.0, 15.0, 16.0]), "g_err": np.array([0.01, 0.01, 0.02]),
        "cls": np.array([0.99, 0.2, 0.95]), "fl": np.array([0, 0, 0], dtype=np.int16),
    })
    t.write(path)
    spec = CatalogueSpec(format="fits", ra_column="ra", dec_column="dec",
                         mag_columns={"g_band": "g"}, err_columns={"g_band": "g_err"},
                         stellarity_column="cls", flags_column="fl")
    cat = load_catalogue(path, spec)
    np.testing.assert_allclose(cat.mag("g_band"), [14.0, 16.0])


def test_missing_column_and_file_errors(tmp_path: Path) -> None:
    spec = CatalogueSpec(mag_columns={"g_band": "g_psf_nope"})
    with pytest.raises(ValueError, match=r"missing column.*g_psf_nope"):
        load_catalogue(REFCAT, spec)
    with pytest.raises(FileNotFoundError, match="reference catalogue not found"):
        load_catalogue(tmp_path / "nope.csv")
    fits_path = tmp_path / "t.fits"
    Table({"ra": [1.0], "dec": [2.0]}).write(fits_path)
    with pytest.raises(ValueError, match="missing column"):
        load_catalogue(fits_path, CatalogueSpec(format="fits", ra_column="ra", dec_column="dec"))
    with pytest.raises(ValueError, match="format"):
        CatalogueSpec(format="votable")  # type: ignore[arg-type]


def test_select_in_field_and_projection() -> None:
    shape = (800, 1000)
    wcs = tan_wcs(shape)
    rng = np.random.default_rng(3)
    x = rng.uniform(-300, 1300, 400)
    y = rng.uniform(-300, 1100, 400)
    ra, dec = wcs.all_pix2world(x, y, 0)
    # Plus stars on the far side of the sky, which a gnomonic inverse could alias.
    ra = np.r_[ra, 245.0, 65.0]
    dec = np.r_[dec, 55.0, 35.0]
    from huntsman.science.refcat import _make_catalogue

    cat = _make_catalogue(ra, dec, {"g_band": np.full(ra.size, 15.0)}, {})
    inside = select_in_field(cat, wcs, shape, margin_px=20)
    expected = (x >= 20) & (x <= 1000 - 21) & (y >= 20) & (y <= 800 - 21)
    assert len(inside) == int(expected.sum())
    px, py = project(inside, wcs)
    assert np.all((px >= 20) & (py >= 20) & (px <= 979) & (py <= 779))
    grown = select_in_field(cat, wcs, shape, margin_px=-50)
    assert len(grown) > len(inside)
    far = WCS(wcs.to_header())
    far.wcs.crval = [200.0, 30.0]
    assert len(select_in_field(cat, far, shape)) == 0


def test_match_sources_one_to_one_and_residual() -> None:
    wcs = tan_wcs()
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1000, 200)
    y = rng.uniform(0, 800, 200)
    ra, dec = wcs.all_pix2world(x, y, 0)
    # Measured: shifted by (0.8, -0.6) px = 1.24″, shuffled, minus some, plus spurious.
    order = rng.permutation(200)[:150]
    mx = np.r_[x[order] + 0.8, rng.uniform(0, 1000, 30)]
    my = np.r_[y[order] - 0.6, rng.uniform(0, 800, 30)]
    m = match_sources(ra, dec, mx, my, wcs, max_sep_arcsec=3.0)
    truth = dict(zip(range(150), order.tolist(), strict=True))
    good = [truth.get(int(s)) == int(r) for r, s in zip(m.ref_index, m.src_index, strict=True)]
    assert sum(good) >= 148
    assert len(set(m.ref_index.tolist())) == len(m) == len(set(m.src_index.tolist()))
    res = astrometric_residual(m)
    assert res.median_arcsec is not None and math.isclose(res.median_arcsec, 1.24, abs_tol=0.02)
    assert isinstance(res.rms_arcsec, float) and isinstance(res.n, int)
    # Two sources competing for one reference star: only the nearer is paired.
    m2 = match_sources(ra[:1], dec[:1], np.r_[x[0] + 0.3, x[0] + 1.0], np.r_[y[0], y[0]],
                       wcs, 5.0)
    assert m2.src_index.tolist() == [0] and m2.ref_index.tolist() == [0]
    empty = match_sources(ra[:0], dec[:0], mx, my, wcs, 3.0)
    assert len(empty) == 0 and astrometric_residual(empty).median_arcsec is None
