"""CalibService against the real database, a real process pool and real files."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from astropy.io import fits

from huntsman.app import make_calib_service, make_pool
from huntsman.cli import parse_args
from huntsman.cli.processing import calib as calib_command
from huntsman.cli.views import _status_text
from huntsman.config import Config, load_config
from huntsman.logs import get_logger
from huntsman.models import IngestParams, utcnow
from huntsman.services.calib import CalibService
from huntsman.services.calib_plan import RawFrame, rejection_reason
from huntsman.store.calibs import Unit
from huntsman.store.database import Database
from huntsman.testing.synthetic import CameraModel, huntsman_header, render_frame, write_raw
from huntsman.workers.ingest import ingest_file
from tests.conftest import RAW_SAMPLES, ROOT, ServiceHandle, make_config, wait_for

SHAPE = (200, 300)
CAM = "TESTCAM01"
D1, D2, D3 = "2022-03-01", "2022-03-02", "2022-03-03"
NOMINAL = CameraModel()
SMALL_GROUPS = {
    "CALIB__FRAMES__BIAS__MIN": 3,
    "CALIB__FRAMES__DARK__MIN": 3,
    "CALIB__FRAMES__FLAT__MIN": 3,
    "CALIB__WINDOW_DAYS": 0,
    "CALIB__STACK__MEMORY_LIMIT_MB": 300,
}


def when(date: str, hour: int = 20, minute: int = 0) -> dt.datetime:
    return dt.datetime.fromisoformat(date).replace(hour=hour, minute=minute, tzinfo=dt.UTC)


def synthetic(
    directory: Path, name: str, kind: str, date_obs: dt.datetime, *, seed: int, camera: str = CAM,
    exptime_s: float = 60.0, sky_adu: float = 0.0, ccd_temp_c: float = 0.5,
    shape: tuple[int, int] = SHAPE, model: CameraModel = NOMINAL,
) -> Path:
    """A small raw frame with the real Huntsman keyword set."""
    header = huntsman_header(observation_type=kind, camera_id=camera, date_obs=date_obs,
                             exptime_s=exptime_s, ccd_temp_c=ccd_temp_c)
    data = render_frame(shape, exptime_s=0.0 if kind == "bias" else exptime_s, camera=model,
                        sky_adu=sky_adu, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    return write_raw(directory / name, data, header)


def night(directory: Path, date: str, kinds: dict[str, int], *, seed: int = 0, **kw: Any) -> list[Path]:
    """``kinds`` frames of each type on one night (flats at 0.5 of saturation, darks 60 s)."""
    paths = []
    for kind, n in kinds.items():
        for i in range(n):
            sky = 2000.0 if kind == "flat" else 0.0
            paths.append(synthetic(directory, f"{kind}_{date}_{seed + i:03d}.fits", kind,
                                   when(date, 20, seed + i), seed=seed + i + 1000 * len(paths),
                                   sky_adu=sky, **kw))
    return paths


async def ingest(database: Database, paths: list[Path]) -> None:
    """The real ingestion job and the real document write (in-process, no watcher)."""
    params = IngestParams()
    for path in paths:
        result = await asyncio.to_thread(ingest_file, str(path), params)
        await database.exposures.record_ingest(
            result, seen_at=utcnow(), previous=None, max_tries=3, same_content=False
        )


@pytest.fixture
def calib_config(tmp_path: Path, mongo_uri: str, db_name: str) -> Config:
    return make_config(tmp_path, mongo_uri, db_name, **SMALL_GROUPS)


@pytest.fixture
async def calib_service(calib_config: Config, database: Database) -> AsyncIterator[CalibService]:
    log = get_logger(test="calib")
    pool = make_pool(calib_config, log)
    try:
        yield make_calib_service(calib_config, database, pool, log)
    finally:
        await pool.shutdown(2.0)


async def n_calibs(database: Database, query: dict[str, Any] | None = None) -> int:
    return await database.calibs.count(query or {})


async def test_restart_mid_pass_backfills(
    calib_config: Config, database: Database, calib_service: CalibService, tmp_path: Path
) -> None:
    raw = tmp_path / "raw"
    await ingest(database, [p for d in (D1, D2, D3) for p in night(raw / d, d, {"bias": 3})])
    first = calib_service
    task = asyncio.create_task(first.run(), name="calib")
    seen: list[str] = []

    async def stop_after_first(master: dict[str, Any], science: list[str]) -> None:
        seen.append(master["filename"])
        task.cancel()  # the service is stopped in the middle of its start-up pass

    first.on_master_built.append(stop_after_first)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(seen) == 1 and await n_calibs(database) == 1
    states = {rec["date"]: rec["state"] async for rec in database.calibs.find_status()}
    assert states == {D1: "built", D2: "pending", D3: "pending"}

    # A new service (a restart) plans from the database alone and builds what is missing.
    restarted = make_calib_service(calib_config, database, first.pool, get_logger())
    task = asyncio.create_task(restarted.run(), name="calib-restarted")
    try:
        await wait_for(lambda: _n_equals(database, 3), 60)
        await wait_for(lambda: _all_built(database), 10)
    finally:
        task.cancel()
    docs = [d async for d in database.calibs.find({}, sort=[("date", 1)])]
    assert [d["date"] for d in docs] == [D1, D2, D3]
    assert docs[0]["filename"] == seen[0]  # the first master was not rebuilt
    for doc in docs:
        assert Path(doc["filename"]).is_file()
        assert doc["n_frames"] == 3 and doc["superseded"] is False
        assert Path(doc["filename"]).name == f"bias_{CAM}_{doc['date']}.fits"
        assert doc["valid_from"] < doc["valid_until"] and doc["valid_from"].tzinfo is not None


async def _n_equals(database: Database, n: int) -> bool:
    return await n_calibs(database) == n


async def _all_built(database: Database) -> bool:
    return all([rec["state"] == "built" async for rec in database.calibs.find_status()])


async def test_late_frames_supersede_and_cascade(
    database: Database, calib_service: CalibService, tmp_path: Path
) -> None:
    raw = tmp_path / "raw"
    await ingest(database, night(raw, D1, {"bias": 3, "dark": 3}))
    summary = await calib_service.run_pass()
    assert len(summary.built) == 2 and not summary.failed
    old_bias = await database.calibs.match_one("bias", CAM, D1)
    old_dark = await database.calibs.match_one("dark", CAM, D1)
    assert old_bias is not None and old_dark is not None
    assert old_dark["masters"] == {"bias": old_bias["filename"]}

    again = await calib_service.run_pass()  # nothing changed: nothing rebuilt
    assert again.built == [] and again.up_to_date == 2

    await ingest(database, night(raw, D1, {"bias": 2}, seed=10))  # late frames of the same night
    late = await calib_service.run_pass(dates={D1}, reason="new_frames")
    new_bias = await database.calibs.match_one("bias", CAM, D1)
    new_dark = await database.calibs.match_one("dark", CAM, D1)
    assert new_bias is not None and new_dark is not None
    assert set(late.built) == {new_bias["filename"], new_dark["filename"]}
    assert new_bias["n_frames"] == 5 and new_bias["filename"].endswith(f"bias_{CAM}_{D1}_v2.fits")
    assert new_dark["masters"] == {"bias": new_bias["filename"]}  # the dark follows its bias
    for old, new in ((old_bias, new_bias), (old_dark, new_dark)):
        stored = await database.calibs.get(old["filename"])
        assert stored is not None and stored["superseded"] is True
        assert stored["superseded_by"] == [new["filename"]]
        assert Path(old["filename"]).is_file() and Path(new["filename"]).is_file()
    status = await database.calibs.get_status(Unit("bias", CAM, None, D1))
    assert status is not None and status["masters"] == [new_bias["filename"]]


async def test_rejections_and_too_few_frames_are_recorded(
    calib_config: Config, database: Database, calib_service: CalibService, tmp_path: Path
) -> None:
    raw = tmp_path / "raw"
    good = night(raw, D1, {"bias": 3})
    t = when(D1, 21)
    odd_shape = synthetic(raw, "bias_small.fits", "bias", t, seed=1, shape=(100, 120))
    high = synthetic(raw, "bias_high.fits", "bias", t, seed=2, model=CameraModel(bias_adu=200.0))
    nan = raw / "bias_nan.fits"
    fits.PrimaryHDU(np.full(SHAPE, np.nan, np.float32),
                    huntsman_header(observation_type="bias", camera_id=CAM, date_obs=t)).writeto(nan)
    truncated = raw / "bias_truncated.fits"
    truncated.write_bytes(good[0].read_bytes()[:20000])
    faint = synthetic(raw, "flat_faint.fits", "flat", t, seed=3, sky_adu=50.0)
    flats = night(raw, D1, {"flat": 2}, seed=20)
    # Darks at two clearly different CCD temperatures make two masters.
    cold = night(raw, D1, {"dark": 3}, seed=30, ccd_temp_c=-10.0)
    warm = night(raw, D1, {"dark": 3}, seed=40, ccd_temp_c=5.0)
    await ingest(database, [*good, odd_shape, high, nan, truncated, faint, *flats, *cold, *warm])
    doc = await database.exposures.get(str(truncated))
    assert doc is not None and doc["ingest"]["status"] == "failed"

    summary = await calib_service.run_pass()
    assert not summary.failed
    bias = await database.calibs.match_one("bias", CAM, D1)
    assert bias is not None and sorted(bias["raw_filenames"]) == sorted(map(str, good))
    reasons = {item["filename"]: item["reason"] for item in bias["excluded"]}
    assert "differs from the group's (200, 300)" in reasons[str(odd_shape)]
    assert "level offset" in reasons[str(high)]
    assert "no pixel statistics" in reasons[str(nan)]
    assert reasons[str(truncated)].startswith("ingestion failed")

    flat_status = await database.calibs.get_status(Unit("flat", CAM, "g_band", D1))
    assert flat_status is not None and flat_status["state"] == "insufficient"
    assert "2 usable flat frame(s)" in flat_status["reason"] and "need 3" in flat_status["reason"]
    assert "too faint" in {i["filename"]: i["reason"] for i in flat_status["excluded"]}[str(faint)]
    assert await n_calibs(database, {"calib_type": "flat"}) == 0

    darks = [d async for d in database.calibs.find({"calib_type": "dark"}, sort=[("ccd_temp", 1)])]
    assert [d["ccd_temp"] for d in darks] == [-10.0, 5.0]
    assert sorted(darks[0]["raw_filenames"]) == sorted(map(str, cold))
    assert len({d["filename"] for d in darks}) == 2

    text = await _status_text(database, calib_config)
    assert f"flat {CAM} g_band" in text and "insufficient" in text and "need 3" in text


async def test_real_samples_make_valid_masters(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    config = make_config(tmp_path, mongo_uri, db_name, CALIB__FRAMES__BIAS__MIN=1,
                         CALIB__FRAMES__DARK__MIN=1, CALIB__FRAMES__FLAT__MIN=1)
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("bias_0", "dark_0", "flat_0", "science_0"):
        shutil.copyfile(RAW_SAMPLES / f"{name}.fits", raw / f"{name}.fits")
    await ingest(database, sorted(raw.iterdir()))
    # Through the command-line entry point, i.e. the same CalibService code.
    args = parse_args(["calib"])
    assert await calib_command(config, args) == 0
    bias = await database.calibs.match_one("bias", "TESTCAM03", "2021-01-07")
    dark = await database.calibs.match_one("dark", "TESTCAM03", "2021-01-07")
    flat = await database.calibs.match_one("flat", "TESTCAM03", "2021-01-12", "g_band")
    assert bias is not None and dark is not None and flat is not None
    assert flat["masters"] == {"bias": bias["filename"], "dark": dark["filename"]}
    assert Path(flat["filename"]) == (
        config.paths.calib_dir / "2021-01-12" / "flat" / "flat_TESTCAM03_g_band_2021-01-12.fits"
    )
    for doc in (bias, dark, flat):
        with fits.open(doc["filename"]) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "UNCERT", "NUSED", "MASK"]
            assert hdul[0].header["BITPIX"] == -32 and hdul[0].data.shape == (800, 800)
            assert hdul[0].header["CALTYPE"] == doc["calib_type"]
            assert hdul[0].header["CFGHASH"] == doc["config_hash"]
            assert hdul[0].header["INPUT001"] == doc["raw_filenames"][0]
        assert doc["n_frames"] == 1 and doc["software_version"]
    assert bias["statistics"]["level"] == pytest.approx(32.0)
    assert flat["statistics"]["level"] == pytest.approx(1.0, abs=1e-3)
    # The science frame of 2021-01-18 now has a complete set (masters 6 and 11 days old).
    chosen = await database.calibs.match("TESTCAM03", "g_band", dt.datetime(2021, 1, 18, 11, tzinfo=dt.UTC))
    assert chosen is not None and chosen["flat"]["filename"] == flat["filename"]
    assert await database.calibs.match("TESTCAM03", "g_band", "2021-02-18") is None  # too old

    # Rebuilding on demand (--force) hands the science frame to the QualityMonitor's callback.
    log = get_logger()
    pool = make_pool(config, log)
    service = make_calib_service(config, database, pool, log)
    handed: list[tuple[str, list[str]]] = []

    async def quality_monitor(master: dict[str, Any], science: list[str]) -> None:
        handed.append((master["calib_type"], science))

    service.on_master_built.append(quality_monitor)
    try:
        summary = await service.run_pass(types=["flat"], force=True)
    finally:
        await pool.shutdown(2.0)
    assert len(summary.built) == 1
    assert handed == [("flat", [str(raw / "science_0.fits")])]
    assert await n_calibs(database, {"calib_type": "flat", "superseded": True}) == 1


async def test_service_builds_masters_from_arriving_frames(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    config = make_config(tmp_path, mongo_uri, db_name, CALIB__DEBOUNCE_S=0.3, **SMALL_GROUPS)
    handle = await ServiceHandle(config).start()
    try:
        staging = tmp_path / "staging"
        frames = night(staging, D2, {"bias": 3, "dark": 3, "flat": 3})
        for path in frames:  # copied in by the control software, one file after the other
            dest = handle.raw / D2 / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
        await wait_for(lambda: _n_equals(database, 3), 90, 0.2)
        assert await n_calibs(database, {"superseded": False}) == 3
        chosen = await database.calibs.match(CAM, "g_band", when(D2, 23))
        assert chosen is not None
        flat = chosen["flat"]
        assert flat["n_frames"] == 3 and all(f.startswith(str(handle.raw)) for f in flat["raw_filenames"])
        assert flat["statistics"]["level"] == pytest.approx(1.0, abs=0.01)
        assert handle.app.state()["calib"]["passes"] >= 1
    finally:
        assert await handle.shutdown() == 0


# -- configuration given at construction --------------------------------------------------------

async def test_services_get_the_master_validity_at_construction(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    from huntsman.app import make_quality_monitor
    from huntsman.store.calibs import DEFAULT_MAX_AGE_DAYS

    config = make_config(tmp_path, mongo_uri, db_name, CALIB__MAX_AGE_DAYS=3, ASTROMETRY__ENABLED="false")
    log = get_logger(test="calib")
    pool = make_pool(config, log)
    try:
        calib = make_calib_service(config, database, pool, log)
        quality = make_quality_monitor(config, database, pool, log)
    finally:
        await pool.shutdown(2.0)
    assert calib.calibs.max_age_days == 3 and quality.calibs.max_age_days == 3
    assert database.calibs.max_age_days == DEFAULT_MAX_AGE_DAYS  # the shared repository is untouched
    assert calib.calibs.collection is database.calibs.collection


# -- which frames a master may use -------------------------------------------------------------

def _raw(kind: str, metrics: dict[str, Any], **fields: Any) -> RawFrame:
    doc = {"filename": f"/raw/{kind}.fits", "observation_type": kind, "camera": CAM, "calib_date": D1,
           "physical_filter": "g_band", "exposure_time": 10.0, "ingest": {"status": "ok"},
           "metrics": metrics, **fields}
    frame = RawFrame.from_doc(doc)
    assert frame is not None
    return frame


@pytest.mark.parametrize(
    ("kind", "metrics", "fields", "reason"),
    [
        ("bias", {"clipped_median": 32.0}, {"file": {"missing": True}},
         "raw file missing (deleted or moved out of the raw tree)"),
        ("dark", {}, {"ingest": {"status": "failed", "error": "boom"}}, "ingestion failed: boom"),
        ("flat", {}, {"exposure_time": 0.0}, "exposure time 0.0 s is not positive"),
        ("bias", {}, {"exposure_time": 0.0}, None),  # biases need no exposure; no metrics to judge
        ("dark", {"failed": {"clipped_median": "all NaN"}}, {}, "no pixel statistics: all NaN"),
        ("bias", {"clipped_median": 45.0, "level_offset_adu": 13.0}, {},
         "bias level offset +13.0 ADU outside ±10 ADU"),
        ("bias", {"clipped_median": 32.0, "level_offset_adu": 1.0, "n_sources": 4}, {},
         "4 sources detected (> 3): light leak or stars"),
        ("dark", {"clipped_median": 33.0, "level_offset_adu": 99.0, "n_sources": 3}, {}, None),
        ("flat", {"clipped_median": 200.0}, {}, "too faint: illumination 0.049 of saturation < 0.1"),
        ("flat", {"clipped_median": 2000.0, "illumination_fraction": 0.9}, {},
         "near saturation: illumination 0.900 of saturation > 0.8"),
        ("flat", {"clipped_median": 2000.0, "n_sources": 501}, {}, "star-filled: 501 sources > 500"),
        ("flat", {"clipped_median": 2000.0, "n_sources": 400, "elongation_trail": 1.6}, {},
         "trailed: source elongation 1.60 > 1.5"),
        ("flat", {"clipped_median": 2000.0, "n_sources": 400, "elongation_trail": 1.2}, {}, None),
    ],
)
def test_rejection_reasons(
    kind: str, metrics: dict[str, Any], fields: dict[str, Any], reason: str | None, tmp_path: Path
) -> None:
    config = load_config(ROOT / "etc" / "huntsman.yaml", environ={}, root=tmp_path)
    frame = _raw(kind, metrics, **fields)
    assert rejection_reason(frame, config.calib, config.detector) == reason
