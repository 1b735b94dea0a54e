"""Reprocessing: each stage re-run on a selection changes exactly the selected documents."""

from __future__ import annotations

import datetime as dt
import importlib.util
import io
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bson
import numpy as np
import pytest
from bson.codec_options import CodecOptions

from huntsman.app import ingest_params, make_calib_service, make_pool
from huntsman.cli.progress import Progress
from huntsman.cli.reprocess import HISTORY_LIMIT, Reprocessor, push_history
from huntsman.cli.selection import Selection
from huntsman.config import Config
from huntsman.logs import get_logger
from huntsman.models import FileSource, IngestRequest, utcnow
from huntsman.services.ingestor import FileIngestor
from huntsman.store.database import Database
from huntsman.testing.synthetic import huntsman_header, write_raw
from huntsman.workers.pool import ComputePool
from tests.conftest import PYTHON, ROOT, make_config, python_env

N1, N2 = "2024-05-10", "2024-05-11"
CAMERAS = ("TESTCAM01", "TESTCAM02")


def write_frames(raw: Path) -> list[Path]:
    """Science and bias frames of two cameras on two nights, real FITS with the real keywords."""
    rng = np.random.default_rng(11)
    paths = []
    for night in (N1, N2):
        for camera in CAMERAS:
            (raw / night / camera).mkdir(parents=True, exist_ok=True)
        start = dt.datetime.fromisoformat(night).replace(hour=10, tzinfo=dt.UTC)
        for camera in CAMERAS:
            for i in range(3):
                when = start + dt.timedelta(minutes=3 * i)
                header = huntsman_header(observation_type="bias", camera_id=camera, date_obs=when)
                data = np.clip(rng.normal(32.0, 2.1, (96, 96)), 0, 4094)
                paths.append(write_raw(raw / night / camera / f"bias_{i}.fits", data, header))
            for i in range(2):
                when = start + dt.timedelta(hours=1, minutes=10 * i)
                header = huntsman_header(
                    observation_type="science",
                    camera_id=camera,
                    date_obs=when,
                    exptime_s=60.0,
                    filter_name="g_band" if i == 0 else "r_band",
                )
                data = np.clip(rng.normal(200.0, 14.0, (96, 96)), 0, 4094)
                paths.append(write_raw(raw / night / camera / f"science_{i}.fits", data, header))
    return paths


async def snapshot(database: Database) -> dict[str, dict[Any, bytes]]:
    """Every document of the collections a stage may touch, as its exact BSON bytes."""
    out: dict[str, dict[Any, bytes]] = {}
    for name in ("exposures", "calibs", "calib_status"):
        out[name] = {str(d["_id"]): bson.encode(d) async for d in database.db[name].find({})}
    return out


def decode(raw: bytes) -> dict[str, Any]:
    return bson.decode(raw, codec_options=CodecOptions(tz_aware=True, tzinfo=dt.UTC))


def changed(before: dict[Any, bytes], after: dict[Any, bytes]) -> set[str]:
    keys = set(before) | set(after)
    return {k for k in keys if before.get(k) != after.get(k)}


async def filename_ids(database: Database) -> dict[str, str]:
    return {d["filename"]: str(d["_id"]) async for d in database.db["exposures"].find({}, {"filename": 1})}


@pytest.fixture
def rconfig(tmp_path: Path, mongo_uri: str, db_name: str) -> Config:
    return make_config(tmp_path, mongo_uri, db_name, CALIB__FRAMES__BIAS__MIN=3, POOL__MAX_WORKERS=2)


@pytest.fixture
async def pool(rconfig: Config) -> AsyncIterator[ComputePool]:
    pool = make_pool(rconfig, get_logger(test="reprocess"))
    yield pool
    await pool.shutdown(2.0)


@pytest.fixture
async def ingested(rconfig: Config, database: Database, pool: ComputePool) -> list[str]:
    files = write_frames(rconfig.paths.raw_dir)
    ingestor = FileIngestor(
        database.exposures,
        pool,
        ingest_params(rconfig),
        rconfig.ingest,
        rconfig.watcher,
        get_logger(test="reprocess"),
        concurrency=4,
    )
    for path in files:
        assert await ingestor.process(IngestRequest(str(path), utcnow(), FileSource.CLI)) == "ok"
    return sorted(str(p) for p in files)


def reprocessor(config: Config, database: Database, pool: ComputePool | None) -> Reprocessor:
    return Reprocessor(config, database, pool, get_logger(test="reprocess"))


async def test_selection(rconfig: Config, database: Database, ingested: list[str]) -> None:
    rp = reprocessor(rconfig, database, None)
    names = [d["filename"] for d in await rp.select("ingest", Selection(night=N1, camera="TESTCAM01"))]
    assert names == sorted(f for f in ingested if f"/{N1}/TESTCAM01/" in f) and len(names) == 5
    sci = await rp.select("solve", Selection(physical_filter="r_band"))
    assert {d["filename"] for d in sci} == {f for f in ingested if f.endswith("science_1.fits")}
    assert await rp.select("solve", Selection(observation_type="bias")) == []  # no WCS for biases
    calib = await rp.select("calib", Selection(night=N2))
    assert {d["observation_type"] for d in calib} == {"bias"} and len(calib) == 6
    globbed = await rp.select("ingest", Selection(pattern="science_0.fits"))
    assert len(globbed) == 4 and all(d["filename"].endswith("science_0.fits") for d in globbed)
    path_glob = await rp.select("ingest", Selection(pattern=f"*/{N2}/TESTCAM02/*"))
    assert len(path_glob) == 5
    assert await rp.select("ingest", Selection(status="failed")) == []


async def test_dry_run_changes_nothing(
    rconfig: Config, database: Database, pool: ComputePool, ingested: list[str]
) -> None:
    calib = make_calib_service(rconfig, database, pool, get_logger(test="reprocess"))
    assert len((await calib.run_pass(reason="test")).built) == 4  # 2 cameras x 2 nights
    before = await snapshot(database)
    rp = reprocessor(rconfig, database, pool)
    for stage, selection, n in (
        ("ingest", Selection(night=N1), 10),
        ("solve", Selection(camera="TESTCAM02"), 4),
        ("calib", Selection(camera="TESTCAM01"), 6),
        ("qc", Selection(), 8),
    ):
        summary = await rp.run(stage, selection, dry_run=True)
        assert len(summary.selected) == n, stage
        assert summary.done == [] and summary.failed == []
        if stage in ("ingest", "solve"):
            assert len(summary.actions) == n and all(f in " ".join(summary.actions) for f in summary.selected)
        if stage == "calib":
            assert summary.actions == [
                f"rebuild bias masters of TESTCAM01 for {N1}",
                f"rebuild bias masters of TESTCAM01 for {N2}",
            ]
    after = await snapshot(database)
    assert after == before  # byte for byte, every collection


async def test_reingest_changes_exactly_the_selection(
    rconfig: Config, database: Database, pool: ComputePool, ingested: list[str]
) -> None:
    ids = await filename_ids(database)
    before = await snapshot(database)
    selection = Selection(night=N1, camera="TESTCAM01")
    summary = await reprocessor(rconfig, database, pool).run("ingest", selection)
    selected = sorted(f for f in ingested if f"/{N1}/TESTCAM01/" in f)
    assert summary.done == selected and summary.failed == [] and summary.outcomes == {"ok": 5}
    after = await snapshot(database)
    assert changed(before["exposures"], after["exposures"]) == {ids[f] for f in selected}
    assert set(after["exposures"]) == set(before["exposures"])  # same documents, none added
    for filename in selected:
        doc = await database.exposures.get(filename)
        assert doc is not None and doc["ingest"]["status"] == "ok" and doc["ingest"]["tries"] == 2
        old = decode(before["exposures"][ids[filename]])
        assert doc["timing"]["ingested"] > old["timing"]["ingested"]
        [entry] = doc["history"]
        assert entry["stage"] == "ingest"
        assert entry["previous"]["ingest"] == old["ingest"]
        assert entry["previous"]["metrics"] == old["metrics"]
        assert entry["previous"]["timing"] == {"ingested": old["timing"]["ingested"]}
    # Again: history grows, still one document per file.
    await reprocessor(rconfig, database, pool).run("ingest", selection)
    doc = await database.exposures.get(selected[0])
    assert doc is not None and [h["stage"] for h in doc["history"]] == ["ingest", "ingest"]
    assert await database.exposures.count() == len(ingested)


async def test_history_keeps_the_last_entries(database: Database) -> None:
    await database.exposures.collection.insert_one({"filename": "/raw/x.fits", "qc": {"status": "done"}})
    for i in range(HISTORY_LIMIT + 3):
        doc = await database.exposures.get("/raw/x.fits")
        assert doc is not None
        await push_history(database.exposures.collection, doc, "qc")
        await database.exposures.set_fields("/raw/x.fits", {"qc": {"status": "done", "run": i}})
    doc = await database.exposures.get("/raw/x.fits")
    assert doc is not None and len(doc["history"]) == HISTORY_LIMIT
    runs = [h["previous"]["qc"].get("run") for h in doc["history"]]
    assert runs == list(range(2, HISTORY_LIMIT + 2))  # the oldest dropped, newest last


async def test_resolve_changes_exactly_the_selection(
    rconfig: Config, database: Database, pool: ComputePool, ingested: list[str]
) -> None:
    rp = reprocessor(rconfig, database, pool)
    first = await rp.run("solve", Selection())  # every science frame gets a wcs outcome
    assert len(first.done) == 8
    ids = await filename_ids(database)
    before = await snapshot(database)
    summary = await rp.run("solve", Selection(camera="TESTCAM02", physical_filter="g_band"))
    selected = sorted(f for f in ingested if "/TESTCAM02/science_0" in f)
    assert summary.done == selected and len(selected) == 2
    after = await snapshot(database)
    assert changed(before["exposures"], after["exposures"]) == {ids[f] for f in selected}
    solver_usable = first.outcomes.get("skipped", 0) == 0
    for filename in selected:
        doc = await database.exposures.get(filename)
        assert doc is not None
        old = decode(before["exposures"][ids[filename]])
        # Noise frames without stars: solve-field runs and finds nothing (or is unavailable).
        assert doc["wcs"]["status"] == ("failed" if solver_usable else "skipped")
        [entry] = doc["history"]
        assert entry["stage"] == "solve" and entry["previous"]["wcs"] == old["wcs"]
        if solver_usable:
            assert doc["wcs"]["tries"] == 1 and doc["timing"]["solved"] > old["timing"]["solved"]


async def test_rebuild_masters_changes_exactly_the_selection(
    rconfig: Config, database: Database, pool: ComputePool, ingested: list[str]
) -> None:
    calib = make_calib_service(rconfig, database, pool, get_logger(test="reprocess"))
    assert len((await calib.run_pass(reason="test")).built) == 4
    before = await snapshot(database)
    old = {d["filename"]: d async for d in database.calibs.find({})}
    summary = await reprocessor(rconfig, database, pool).run("calib", Selection(night=N1, camera="TESTCAM01"))
    assert summary.failed == [] and len(summary.done) == 1
    [new_name] = summary.done
    assert new_name.endswith(f"bias_TESTCAM01_{N1}_v2.fits") and Path(new_name).is_file()
    after = await snapshot(database)
    assert after["exposures"] == before["exposures"]  # raw frames untouched
    [replaced] = [f for f, d in old.items() if d["camera"] == "TESTCAM01" and d["date"] == N1]
    new_doc, replaced_doc = await database.calibs.get(new_name), await database.calibs.get(replaced)
    assert new_doc is not None and new_doc["superseded"] is False and new_doc["version"] == 2
    assert replaced_doc is not None and replaced_doc["superseded"] is True  # kept, as history
    assert Path(replaced).is_file()
    calib_ids = {d["filename"]: str(d["_id"]) async for d in database.db["calibs"].find({})}
    assert changed(before["calibs"], after["calibs"]) == {calib_ids[new_name], calib_ids[replaced]}
    assert changed(before["calib_status"], after["calib_status"]) == {f"bias/TESTCAM01/-/{N1}"}


async def test_qc_rerun_changes_exactly_the_selection(
    rconfig: Config, database: Database, pool: ComputePool, ingested: list[str]
) -> None:
    rp = reprocessor(rconfig, database, pool)
    if importlib.util.find_spec("huntsman.services.quality") is None:  # pragma: no cover
        summary = await rp.run("qc", Selection(night=N1))
        assert summary.unavailable is not None and "not installed" in summary.unavailable
        return
    await rp.run("solve", Selection())  # QC needs a final wcs.status
    first = await rp.run("qc", Selection())
    # Biases only: no dark or flat master exists, so every frame waits, with the reason.
    assert first.outcomes == {"waiting_calibs": 8}
    ids = await filename_ids(database)
    before = await snapshot(database)
    summary = await rp.run("qc", Selection(night=N1, camera="TESTCAM01"))
    selected = sorted(f for f in ingested if f"/{N1}/TESTCAM01/science" in f)
    assert summary.done == selected and summary.outcomes == {"waiting_calibs": 2}
    after = await snapshot(database)
    assert changed(before["exposures"], after["exposures"]) == {ids[f] for f in selected}
    for filename in selected:
        doc = await database.exposures.get(filename)
        assert doc is not None and doc["qc"]["status"] == "waiting_calibs"
        assert "waiting" in doc["qc"]["error"] or "master" in doc["qc"]["error"]
        [entry] = doc["history"]
        assert (
            entry["stage"] == "qc"
            and entry["previous"]["qc"] == decode(before["exposures"][ids[filename]])["qc"]
        )


def test_progress_bar_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    bar = Progress(4, "ingest", out, width=8)
    for _ in range(4):
        bar.advance()
    bar.close()
    text = out.getvalue()
    assert "\r[        ] 0/4 ingest" in text and "\r[####    ] 2/4 ingest" in text
    assert text.endswith("\r[########] 4/4 ingest\n")
    quiet = io.StringIO()
    Progress(4, "ingest", quiet).advance()
    assert quiet.getvalue() == ""


def test_reprocess_command_dry_run(rconfig: Config, mongo_uri: str, db_name: str, tmp_path: Path) -> None:
    raw = rconfig.paths.raw_dir
    env = python_env(
        HUNTSMAN_MONGODB_URI=mongo_uri,
        HUNTSMAN_DATABASE__NAME=db_name,
        HUNTSMAN_VAR_DIR=str(tmp_path / "var"),
    )
    cmd = [PYTHON, "-m", "huntsman", "--config", str(ROOT / "etc" / "huntsman.yaml")]
    write_frames(raw)
    proc = subprocess.run(
        [*cmd, "ingest", str(raw)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [*cmd, "reprocess", "ingest", "--night", N2, "--camera", "TESTCAM02", "--dry-run"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("would re-ingest") for line in lines) == 5
    assert f"{raw}/{N2}/TESTCAM02/science_1.fits" in proc.stdout
    assert "5 exposures selected" in lines[-1] and "nothing changed" in lines[-1]
