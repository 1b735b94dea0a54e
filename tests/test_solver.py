"""Plate solving in the running service: solved, written back once, failed with a reason."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

from huntsman.science.wcs_writer import read_wcs_marker, strip_wcs
from huntsman.store.database import Database
from huntsman.testing.starfield import make_tan_sip_wcs, render_sky_frame
from huntsman.testing.synthetic import MoffatPSF, huntsman_header, write_raw
from tests.conftest import DATA, PYTHON, RAW_SAMPLES, ROOT, ServiceHandle, make_config, python_env, wait_for

SCALE = 1.24


def wcs_error_arcsec(a: WCS, b: WCS, shape: tuple[int, int]) -> float:
    ys, xs = np.mgrid[0 : shape[0] : 15j, 0 : shape[1] : 15j]
    ca = SkyCoord(*a.all_pix2world(xs.ravel(), ys.ravel(), 0), unit="deg")
    cb = SkyCoord(*b.all_pix2world(xs.ravel(), ys.ravel(), 0), unit="deg")
    return float(np.sqrt(np.mean(ca.separation(cb).arcsec ** 2)))


async def _wcs_status(db: Database, filename: str, *statuses: str) -> bool:
    doc = await db.exposures.get(filename)
    return doc is not None and (doc.get("wcs") or {}).get("status") in statuses


@pytest.mark.tools("solve-field", "tycho2")
async def test_science_frame_solved_and_written_back_once(
    service: ServiceHandle, database: Database, tmp_path: Path
) -> None:
    shape = (1500, 2000)
    # A Milky Way field: a 41'x31' window holds enough Tycho-2 stars for the index quads.
    true_wcs = make_tan_sip_wcs(270.0, -30.0, shape, SCALE, 30.0, {"A_2_0": -1.5e-8, "B_0_2": 1e-8})
    data, _ = render_sky_frame(
        shape, true_wcs, MoffatPSF(2.5 / SCALE, 3.0), sky_adu=200.0, exptime_s=30.0, seed=3, n_extra_stars=800
    )
    header = huntsman_header(observation_type="science", ra_deg=270.2, dec_deg=-29.8, exptime_s=30.0)
    staged = write_raw(tmp_path / "frame.fits", data, header)
    original_pixels = fits.getdata(staged).tobytes()
    target = service.raw / "night" / "frame.fits"
    target.parent.mkdir()
    staged.rename(target)  # arrives by rename, as copy tools do
    await wait_for(lambda: _wcs_status(database, str(target), "solved", "failed"), 120)
    doc = await database.exposures.get(str(target))
    assert doc is not None
    wcs = doc["wcs"]
    assert wcs["status"] == "solved", wcs
    solved = WCS(fits.Header(wcs["header"]))
    assert wcs_error_arcsec(true_wcs, solved, shape) <= 1.0
    assert wcs["pixel_scale_arcsec"] == pytest.approx(SCALE, rel=5e-3)
    assert wcs["pointing_offset_arcsec"] > 0 and wcs["n_matched"] >= 6
    assert doc["pointing"]["alt_deg"] is not None and doc["pointing"]["moon_separation_deg"] is not None
    assert doc["timing"]["solved"] >= doc["timing"]["ingested"]
    # Written into the raw file, pixels untouched, and not re-ingested because of it.
    assert read_wcs_marker(target) == wcs["marker"]
    with fits.open(target) as hdul:
        assert hdul[0].data.tobytes() == original_pixels
        assert WCS(hdul[0].header).has_celestial
    await service.app.watcher.scan(service.raw)
    await wait_for(lambda: _idle(service), 20)
    doc = await database.exposures.get(str(target))
    assert doc is not None and doc["ingest"]["tries"] == 1
    assert service.app.ingestor.counts["ok"] == 1
    assert service.app.solver.counts["solved"] == 1
    assert doc["file"]["size"] == target.stat().st_size


async def _idle(service: ServiceHandle) -> bool:
    return service.app.ingestor.idle() and service.app.solver.queue.empty()


@pytest.mark.tools("solve-field")
async def test_unsolvable_frame_fails_with_reason_and_is_not_retried_forever(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    config = make_config(
        tmp_path, mongo_uri, db_name, ASTROMETRY__MAX_TRIES=2, ASTROMETRY__TIMEOUT_S=8,
        ASTROMETRY__CPU_LIMIT_S=3,
    )
    rng = np.random.default_rng(5)
    # Random "stars" that match no sky: detected, but no solution exists.
    data = rng.normal(300, 5, size=(800, 800))
    for x, y in rng.uniform(20, 780, size=(40, 2)):
        data[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] += 3000
    config.paths.raw_dir.mkdir(parents=True)
    path = write_raw(config.paths.raw_dir / "noise.fits", data, huntsman_header(observation_type="science"))
    for expected_tries in (1, 2):
        handle = await ServiceHandle(config).start()
        await wait_for(lambda t=expected_tries: _tries(database, str(path), t), 90)
        await handle.shutdown()
    doc = await database.exposures.get(str(path))
    assert doc is not None
    assert doc["wcs"]["status"] == "failed" and doc["wcs"]["error"]
    assert doc["ingest"]["status"] == "ok" and doc["metrics"]["n_sources"] >= 30
    # At max_tries: a further start leaves it alone.
    handle = await ServiceHandle(config).start()
    await wait_for(lambda h=handle: _idle(h), 20)
    assert handle.app.solver.counts == {"solved": 0, "failed": 0, "skipped": 0}
    await handle.shutdown()
    assert read_wcs_marker(path) is None


async def _tries(db: Database, filename: str, tries: int) -> bool:
    doc = await db.exposures.get(filename)
    return doc is not None and (doc.get("wcs") or {}).get("tries", 0) >= tries and (
        doc["wcs"]["status"] == "failed"
    )


async def test_without_indexes_frames_are_skipped_with_warning(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    from structlog.testing import capture_logs

    empty = tmp_path / "no-indexes"
    empty.mkdir()
    config = make_config(tmp_path, mongo_uri, db_name, ASTROMETRY__INDEX_DIRS=f"[{empty}]")
    with capture_logs() as logs:
        handle = await ServiceHandle(config).start()
        try:
            path = config.paths.raw_dir / "science_0.fits"
            path.write_bytes((RAW_SAMPLES / "science_0.fits").read_bytes())
            await wait_for(lambda: _wcs_status(database, str(path), "skipped"), 30)
        finally:
            await handle.shutdown()
    assert any(e["event"] == "astrometry_unavailable" for e in logs)
    doc = await database.exposures.get(str(path))
    assert doc is not None and "index" in doc["wcs"]["error"]


@pytest.mark.tools("solve-field")
async def test_science_sample_solves_through_an_index_built_from_the_catalogue(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    config = make_config(tmp_path, mongo_uri, db_name)
    built = subprocess.run(
        [PYTHON, "-m", "huntsman", "build-index", "--refcat", str(DATA / "refcat.csv")],
        cwd=tmp_path, env=python_env(HUNTSMAN_VAR_DIR=str(tmp_path / "var")),
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    assert list(config.paths.astrometry_dir.glob("*.fits"))
    original = fits.getheader(RAW_SAMPLES / "science_0.fits")
    data = fits.getdata(RAW_SAMPLES / "science_0.fits")
    config.paths.raw_dir.mkdir(parents=True)
    path = config.paths.raw_dir / "science_nowcs.fits"
    fits.writeto(path, data, strip_wcs(original))
    assert not WCS(fits.getheader(path)).has_celestial
    handle = await ServiceHandle(config).start()
    try:
        await wait_for(lambda: _wcs_status(database, str(path), "solved", "failed"), 120)
    finally:
        await handle.shutdown()
    doc = await database.exposures.get(str(path))
    assert doc is not None and doc["wcs"]["status"] == "solved", doc["wcs"]
    error = wcs_error_arcsec(WCS(original), WCS(fits.Header(doc["wcs"]["header"])), data.shape)
    assert error <= 3.0, f"{error:.2f} arcsec from the original solution"
    assert ROOT.exists()
