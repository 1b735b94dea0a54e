"""Header values are data, never paths: the sanitiser, containment, temporary files, and the
real calibration and QC services on frames whose CAM-ID and FILTER are hostile."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from huntsman.app import make_calib_service, make_pool, make_quality_monitor
from huntsman.config import Config
from huntsman.logs import get_logger
from huntsman.models import IngestParams, utcnow
from huntsman.paths import (
    MAX_COMPONENT,
    UnsafePathError,
    create_temp,
    inside,
    make_dirs,
    path_component,
    private_dir,
    write_atomic,
)
from huntsman.science.fitsio import write_fits_atomic
from huntsman.science.masters import MasterParams
from huntsman.science.provenance import Provenance
from huntsman.services.calib import CalibService, master_path
from huntsman.services.quality import QualityMonitor, calibrated_path
from huntsman.services.solver import PlateSolver
from huntsman.store.calibs import Unit
from huntsman.store.database import Database
from huntsman.testing.synthetic import CameraModel, huntsman_header, render_frame, write_raw
from huntsman.workers.calib import CalibJob, build_calib_master
from huntsman.workers.ingest import ingest_file
from tests.conftest import make_config, wait_for

HOSTILE = ("../../x", "/abs", "a/b", "A_B", "A/B")
SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# -- the sanitiser --------------------------------------------------------------------------
def test_clean_values_are_kept_and_the_rest_get_a_slug_and_hash() -> None:
    for clean in ("TESTCAM01", "g_band", "2021-01-07", "A_B", "r.band-2"):
        assert path_component(clean) == clean
    values = [*HOSTILE, "", None, ".", "..", "-rf", ".hidden", "a b", "ä", "x" * 200, "a\x00b",
              "A_B-h0123abcd", "A_B~", "con/../..", "~root"]
    out = [path_component(v) for v in values]
    for value, name in zip(values, out, strict=True):
        assert SAFE.match(name), (value, name)
        assert name not in (".", "..") and "/" not in name and len(name) <= MAX_COMPONENT + 10
    assert path_component("a/b").startswith("a_b-h") and path_component("/abs").startswith("abs-h")
    assert path_component("../../x").startswith("x-h") and path_component(None).startswith("unknown-h")
    # collision-free: every distinct value (None and '' are both "absent") gets its own name
    distinct = {("" if v is None else v): n for v, n in zip(values, out, strict=True)}
    assert len(set(distinct.values())) == len(distinct)
    # a clean-looking value that mimics a hashed name is hashed itself: A_B-h… never collides
    mimic = path_component("a/b")
    assert path_component(mimic) != mimic
    assert path_component("A_B") != path_component("A/B")


def test_inside_rejects_escapes_and_links(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert inside(root / "a" / "b.fits", root) == root / "a" / "b.fits"
    for bad in (root / ".." / "x", Path("/abs"), root, tmp_path / "rootx" / "f"):
        with pytest.raises(UnsafePathError):
            inside(bad, root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    inside(root / "link" / "f", root, resolve=False)  # lexically fine...
    with pytest.raises(UnsafePathError):
        inside(root / "link" / "f", root)  # ...but it leads out
    with pytest.raises(UnsafePathError):
        make_dirs(root / "link" / "night", root)
    assert list(outside.iterdir()) == []
    assert make_dirs(root / "n" / "c", root).is_dir()


def test_temporary_files_never_follow_or_reuse_a_name(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    fd, tmp = create_temp(out, ".f.", ".tmp")
    os.close(fd)
    assert tmp.parent == out and tmp.name.startswith(".f.") and (tmp.stat().st_mode & 0o777) == 0o600
    # a planted link at the final name is replaced, never written through
    (out / "page.html").symlink_to(victim)
    write_atomic(out / "page.html", lambda s: s.write(b"new"), root=out)
    assert victim.read_text() == "precious"
    assert not (out / "page.html").is_symlink() and (out / "page.html").read_bytes() == b"new"
    # a linked directory on the way out of the root is refused before anything is opened
    (out / "night").symlink_to(tmp_path)
    hdul = fits.HDUList([fits.PrimaryHDU(np.zeros((2, 2), np.float32))])
    with pytest.raises(UnsafePathError):
        write_fits_atomic(out / "night" / "victim", hdul, root=out)
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == sorted([tmp.name, "night", "page.html"])


def test_private_dir_is_owner_only(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    assert private_dir(loose).stat().st_mode & 0o777 == 0o700
    assert private_dir(tmp_path / "new" / "var").stat().st_mode & 0o777 == 0o700


def test_output_path_builders_stay_inside(tmp_path: Path) -> None:
    calib_dir, cal_dir = tmp_path / "calib", tmp_path / "calibrated"
    paths = set()
    for value in HOSTILE:
        for kind, flt in (("bias", None), ("flat", value)):
            path = master_path(calib_dir, Unit(kind, value, flt, "2022-03-01"), 1)
            inside(path, calib_dir)
            paths.add(path)
        doc = {"filename": f"/raw/{value}.fits", "calib_date": value, "camera": value}
        path = calibrated_path(cal_dir, doc)
        assert len(path.relative_to(cal_dir).parts) == 3
        paths.add(path)
    assert len(paths) == 3 * len(HOSTILE)
    # the date is a path component too
    assert inside(master_path(calib_dir, Unit("bias", "C", None, "../../etc"), 2), calib_dir)


def test_master_worker_refuses_an_output_outside_its_root(tmp_path: Path) -> None:
    job = CalibJob(
        calib_type="bias", paths=(str(tmp_path / "missing.fits"),), exptimes=(0.0,),
        out_path=str(tmp_path / "calib" / ".." / "escaped.fits"), out_root=str(tmp_path / "calib"),
        params=MasterParams(), provenance=Provenance("test", "0" * 12),
    )
    with pytest.raises(UnsafePathError):
        build_calib_master(job)
    assert not (tmp_path / "escaped.fits").exists()


# -- the real services with hostile header values -------------------------------------------
SHAPE = (96, 128)
DATE = dt.datetime(2022, 3, 1, 20, 0, tzinfo=dt.UTC)


def _frame(raw: Path, name: str, kind: str, camera: str, physical_filter: str, seed: int) -> Path:
    header = huntsman_header(observation_type=kind, camera_id=camera, filter_name=physical_filter,
                             date_obs=DATE + dt.timedelta(minutes=seed), exptime_s=60.0)
    sky = {"flat": 2000.0, "science": 300.0}.get(kind, 0.0)
    data = render_frame(SHAPE, exptime_s=0.0 if kind == "bias" else 60.0, camera=CameraModel(),
                        sky_adu=sky, seed=seed)
    return write_raw(raw / name, data, header)


@pytest.fixture
def hostile_config(tmp_path: Path, mongo_uri: str, db_name: str) -> Config:
    return make_config(
        tmp_path, mongo_uri, db_name, CALIB__FRAMES__BIAS__MIN=2, CALIB__FRAMES__DARK__MIN=2,
        CALIB__FRAMES__FLAT__MIN=2, CALIB__WINDOW_DAYS=0, CALIB__STACK__MEMORY_LIMIT_MB=200,
        ASTROMETRY__ENABLED="false",
    )


@pytest.fixture
async def services(
    hostile_config: Config, database: Database
) -> AsyncIterator[tuple[CalibService, QualityMonitor, PlateSolver]]:
    log = get_logger(test="paths")
    pool = make_pool(hostile_config, log)
    calib = make_calib_service(hostile_config, database, pool, log)
    quality = make_quality_monitor(hostile_config, database, pool, log)
    solver = PlateSolver(database.exposures, pool, hostile_config.astrometry, hostile_config.detector,
                         raw_dir=hostile_config.paths.raw_dir,
                         extra_index_dir=hostile_config.paths.astrometry_dir, log=log)
    await solver.check_available()  # disabled: science frames are skipped, then handed over
    calib.on_master_built.append(quality.on_master_built)
    solver.listeners.append(quality.on_wcs_final)
    try:
        yield calib, quality, solver
    finally:
        await pool.shutdown(2.0)


def _files(top: Path) -> set[Path]:
    return {Path(d) / f for d, _, files in os.walk(top) for f in files}


async def _all_qc_done(database: Database, n: int) -> bool:
    return await database.exposures.count({"observation_type": "science", "qc.status": "done"}) >= n


async def test_hostile_camera_and_filter_values_write_only_inside_their_directories(
    hostile_config: Config, database: Database, services: Any, tmp_path: Path
) -> None:
    calib, quality, solver = services
    raw = hostile_config.paths.raw_dir
    raw.mkdir(parents=True, exist_ok=True)
    abs_existed = Path("/abs").exists()
    science = []
    seed = 0
    for i, value in enumerate(HOSTILE):
        for kind in ("bias", "dark", "flat", "science"):
            for k in range(1 if kind == "science" else 2):
                seed += 1
                path = _frame(raw, f"{kind}_{i}_{k}.fits", kind, value, value, seed)
                if kind == "science":
                    science.append(str(path))
    before = _files(tmp_path)
    for path in sorted(_files(raw)):
        result = await asyncio.to_thread(ingest_file, str(path), IngestParams())
        assert result.fields["camera"] in HOSTILE
        await database.exposures.record_ingest(result, seen_at=utcnow(), previous=None,
                                               max_tries=3, same_content=False)
        await solver.on_ingested(str(path), dict(result.fields))
    task = asyncio.create_task(quality.run(), name="quality")
    try:
        summary = await calib.run_pass(reason="test")
        assert not summary.failed, summary
        await wait_for(lambda: _all_qc_done(database, len(HOSTILE)), 60)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    masters = [d async for d in database.calibs.find({})]
    assert len(masters) == 3 * len(HOSTILE)  # bias, dark and flat of every camera
    calib_dir = hostile_config.paths.calib_dir.resolve()
    master_files = {Path(d["filename"]) for d in masters}
    assert len(master_files) == len(masters)  # no two collide
    for path in master_files:
        assert path.is_file() and path.resolve().is_relative_to(calib_dir), path
    calibrated = set()
    for filename in science:
        doc = await database.exposures.get(filename)
        assert doc is not None and doc["qc"]["status"] == "done", doc.get("qc")
        out = Path(doc["qc"]["calibrated_filename"])
        assert out.is_file() and out.resolve().is_relative_to(hostile_config.paths.calibrated_dir.resolve())
        calibrated.add(out)
    assert len(calibrated) == len(HOSTILE)
    # Nothing else was written anywhere: every new file is a master or a calibrated frame.
    new = _files(tmp_path) - before
    assert new == master_files | calibrated, sorted(map(str, new - master_files - calibrated))
    assert Path("/abs").exists() == abs_existed
    names = {p.name for p in master_files}
    assert any(n.startswith("flat_A_B_A_B_") for n in names)  # the clean value kept as it is
    assert len({n for n in names if n.startswith("flat_")}) == len(HOSTILE)


# -- the plate solver's write-back in the running service ---------------------------------------
async def _solved(database: Database, *filenames: str) -> bool:
    for filename in filenames:
        doc = await database.exposures.get(filename)
        if doc is None or (doc.get("wcs") or {}).get("status") not in ("solved", "failed"):
            return False
    return True


@pytest.mark.tools("solve-field", "tycho2")
async def test_write_back_ignores_a_planted_link_and_records_why_a_hard_link_is_refused(
    service: Any, database: Database, tmp_path: Path
) -> None:
    from huntsman.science.wcs_writer import read_wcs_marker
    from huntsman.testing.starfield import make_tan_sip_wcs, render_sky_frame
    from huntsman.testing.synthetic import MoffatPSF

    shape = (1500, 2000)
    true_wcs = make_tan_sip_wcs(270.0, -30.0, shape, 1.24, 30.0, None)
    data, _ = render_sky_frame(shape, true_wcs, MoffatPSF(2.5 / 1.24, 3.0), sky_adu=200.0,
                               exptime_s=30.0, seed=3, n_extra_stars=800)
    header = huntsman_header(observation_type="science", ra_deg=270.2, dec_deg=-29.8, exptime_s=30.0)
    night = service.raw / "night"
    night.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (night / ".linked.fits.wcs-tmp").symlink_to(victim)  # planted at the old fixed name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    staged = [write_raw(tmp_path / f"{n}.fits", data, header) for n in ("linked", "hard")]
    os.link(staged[1], elsewhere / "hard.fits")  # a second name outside the raw tree
    linked, hard = night / "linked.fits", night / "hard.fits"
    staged[0].rename(linked)
    staged[1].rename(hard)
    await wait_for(lambda: _solved(database, str(linked), str(hard)), 120)
    first, second = await database.exposures.get(str(linked)), await database.exposures.get(str(hard))
    assert first is not None and second is not None
    assert first["wcs"]["status"] == "solved" and first["wcs"]["written_to_file"] is True
    assert first["wcs"]["write_error"] is None
    assert read_wcs_marker(linked) == first["wcs"]["marker"]
    assert victim.read_text() == "precious"
    assert second["wcs"]["status"] == "solved" and second["wcs"]["written_to_file"] is False
    assert "2 hard links" in second["wcs"]["write_error"]
    assert read_wcs_marker(hard) is None and read_wcs_marker(elsewhere / "hard.fits") is None
