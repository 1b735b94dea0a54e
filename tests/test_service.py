"""The running service: nothing lost, whatever the shape of the arrival."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from huntsman.config import Config
from huntsman.store.database import Database
from huntsman.testing.synthetic import huntsman_header, write_raw
from tests.conftest import (
    RAW_SAMPLES,
    SAMPLE_NAMES,
    ServiceHandle,
    copy_sample,
    make_config,
    wait_for,
)


def small_frame(path: Path, index: int, observation_type: str = "science") -> Path:
    """A tiny valid Huntsman frame with the real keyword set."""
    header = huntsman_header(observation_type=observation_type, camera_id=f"TESTCAM0{index % 3 + 1}")
    data = np.full((16, 16), 100 + index % 50, dtype=np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_raw(path, data, header)


async def count(db: Database, query: dict | None = None) -> int:
    return await db.exposures.count(query or {})


async def test_real_samples_ingest(service: ServiceHandle, database: Database) -> None:
    for name in SAMPLE_NAMES:
        copy_sample(name, service.raw / "2021-01-18" / "TESTCAM03")
    await wait_for(lambda: _n_ok(database, 5), 30)
    doc = await database.exposures.get(str(service.raw / "2021-01-18/TESTCAM03/science_0.fits"))
    assert doc is not None
    assert doc["observation_type"] == "science"
    assert doc["ingest"]["status"] == "ok" and doc["ingest"]["tries"] == 1
    assert doc["header"]["CAM-ID"] == "TESTCAM03"
    assert doc["timing"]["file_seen"] <= doc["timing"]["ingested"]
    assert doc["date_obs"].tzinfo is not None


async def _n_ok(db: Database, n: int) -> bool:
    return await count(db, {"ingest.status": "ok"}) >= n


async def test_burst_into_new_directories(service: ServiceHandle, database: Database) -> None:
    """1000 files arriving in a burst into directories created while the service runs."""
    n = 1000

    def burst() -> None:
        for i in range(n):
            small_frame(service.raw / f"night{i % 7}" / f"cam{i % 5}" / f"f{i:04d}.fits", i)

    await asyncio.to_thread(burst)
    await wait_for(lambda: _n_ok(database, n), 180, 0.2)
    assert await count(database) == n
    assert await count(database, {"ingest.status": {"$ne": "ok"}}) == 0


async def test_write_right_after_mkdir_and_moved_trees(
    service: ServiceHandle, database: Database, tmp_path: Path
) -> None:
    # Files written immediately after mkdir, before any watch can exist on the new directory.
    for d in range(5):
        deep = service.raw / f"quick{d}" / "a" / "b"
        deep.mkdir(parents=True)
        for i in range(4):
            small_frame(deep / f"q{d}_{i}.fits", i)
    # A whole tree prepared elsewhere and moved in with one rename.
    outside = tmp_path / "staging"
    for i in range(30):
        small_frame(outside / f"sub{i % 3}" / "deeper" / f"m{i}.fits", i)
    os.rename(outside, service.raw / "moved")
    await wait_for(lambda: _n_ok(database, 50), 60)
    assert await count(database, {"filename": {"$regex": "/moved/"}}) == 30
    # A file written into the moved tree afterwards is seen through its new watch.
    small_frame(service.raw / "moved" / "sub0" / "deeper" / "late.fits", 99)
    await wait_for(lambda: _n_ok(database, 51), 30)


async def test_symlinks_and_directories_named_fits(
    service: ServiceHandle, database: Database, tmp_path: Path
) -> None:
    outside = small_frame(tmp_path / "elsewhere" / "outside.fits", 1)
    (service.raw / "links").mkdir()
    os.symlink(outside, service.raw / "links" / "outside.fits")
    os.symlink(service.raw / "links" / "loop.fits", service.raw / "links" / "loop.fits")
    # A directory named like a FITS file is a directory: watched and scanned, not ingested.
    (service.raw / "x.fits").mkdir()
    small_frame(service.raw / "x.fits" / "inside.fits", 2)
    await wait_for(lambda: _count_is(database, 3), 30)
    outside_doc = await database.exposures.get(str(service.raw / "links" / "outside.fits"))
    assert outside_doc is not None
    assert "outside the raw directory" in outside_doc["ingest"]["error"]
    loop_doc = await database.exposures.get(str(service.raw / "links" / "loop.fits"))
    assert loop_doc is not None and "symlink loop" in loop_doc["ingest"]["error"]
    assert await database.exposures.get(str(service.raw / "x.fits")) is None
    inside = await database.exposures.get(str(service.raw / "x.fits" / "inside.fits"))
    assert inside is not None and inside["ingest"]["status"] == "ok"


async def _all_present(db: Database, filenames: list[str]) -> bool:
    return await count(db, {"filename": {"$in": filenames}}) == len(filenames)


async def _count_is(db: Database, n: int) -> bool:
    return await count(db) >= n


async def test_temporary_names_are_ignored(service: ServiceHandle, database: Database) -> None:
    for name in (".hidden.fits", "a.fits.tmp", "b.fits.part", ".c.fits.AbC123"):
        small_frame(service.raw / name, 1)
    # rsync-style: temporary name, then rename to the final name.
    small_frame(service.raw / ".final.fits.Xy12Z", 3)
    os.rename(service.raw / ".final.fits.Xy12Z", service.raw / "final.fits")
    await wait_for(lambda: _n_ok(database, 1), 30)
    await service.app.watcher.scan(service.raw)
    await wait_for(lambda: _idle(service), 10)
    assert [d["filename"] async for d in database.exposures.find({})] == [str(service.raw / "final.fits")]


async def _idle(service: ServiceHandle) -> bool:
    return service.app.ingestor.idle()


async def test_bad_files_recorded_and_service_continues(
    service: ServiceHandle, database: Database
) -> None:
    raw = service.raw
    science = (RAW_SAMPLES / "science_0.fits").read_bytes()
    (raw / "empty.fits").write_bytes(b"")
    (raw / "truncated.fits").write_bytes(science[:100_000])
    (raw / "junk.fits").write_bytes(os.urandom(5000))
    end = science.find(b"END" + b" " * 77)
    (raw / "noend.fits").write_bytes(science[:end] + b" " * 80 + science[end + 80 :])
    start = science.find(b"EXPTIME =")
    corrupt = science[:start] + b"EXPTIME = 'unterminated / broken card".ljust(80) + science[start + 80 :]
    (raw / "corrupt_card.fits").write_bytes(corrupt)
    header = fits.getheader(RAW_SAMPLES / "science_0.fits")
    data = fits.getdata(RAW_SAMPLES / "science_0.fits")
    for name, key, value in (
        ("no_imagetyp.fits", "IMAGETYP", None),
        ("odd_imagetyp.fits", "IMAGETYP", "Bias Frame Maybe"),
        ("bad_date.fits", "DATE-OBS", "last tuesday"),
        ("blanks.fits", "RA-MNT", ""),
    ):
        h = header.copy()
        if value is None:
            del h[key]
        else:
            h[key] = value
        if name == "blanks.fits":
            h["DEC-MNT"] = ""
            h["AIRMASS"] = ""
            h["FILTER"] = ""
        fits.writeto(raw / name, data, h)
    fits.CompImageHDU(data, header).writeto(raw / "compressed.fits.fz")
    fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(data), fits.ImageHDU(data)]).writeto(
        raw / "mef.fits"
    )
    # Deleted before it is processed: the worker finds nothing, the document says so.
    copy_sample("science_0", raw, "vanishing.fits")
    os.unlink(raw / "vanishing.fits")
    copy_sample("flat_0", raw, "good_after.fits")

    expected_errors = {
        "empty.fits": "empty file",
        "truncated.fits": "truncated",
        "junk.fits": "not a FITS file",
        "noend.fits": "no END card",
        "corrupt_card.fits": "corrupt header card",
        "no_imagetyp.fits": "IMAGETYP is missing",
        "odd_imagetyp.fits": "unknown IMAGETYP",
        "bad_date.fits": "DATE-OBS",
    }
    expected_ok = {"blanks.fits", "compressed.fits.fz", "mef.fits", "good_after.fits"}
    names = [*expected_errors, *expected_ok]
    await wait_for(lambda: _all_present(database, [str(raw / n) for n in names]), 60)
    for name, reason in expected_errors.items():
        doc = await database.exposures.get(str(raw / name))
        assert doc is not None, name
        assert doc["ingest"]["status"] == "failed", (name, doc["ingest"])
        assert reason in doc["ingest"]["error"], (name, doc["ingest"]["error"])
    for name in expected_ok:
        doc = await database.exposures.get(str(raw / name))
        assert doc is not None and doc["ingest"]["status"] == "ok", (name, doc and doc["ingest"])
    blanks = await database.exposures.get(str(raw / "blanks.fits"))
    assert blanks is not None
    assert blanks["ra"] is None and blanks["dec"] is None and blanks["airmass"] is None
    assert blanks["physical_filter"] is None
    mef = await database.exposures.get(str(raw / "mef.fits"))
    assert mef is not None and any("multi-extension" in w for w in mef["ingest"]["warnings"])
    # Whatever could be read is kept: the bad date still names its camera and type.
    bad_date = await database.exposures.get(str(raw / "bad_date.fits"))
    assert bad_date is not None
    assert bad_date["camera"] == "TESTCAM03" and bad_date["observation_type"] == "science"
    assert bad_date["header"]["FIELD"] == "DoradoGroup-p0p0"
    # The vanished file may or may not have been seen before it went; if seen, it is explained.
    vanished = await database.exposures.get(str(raw / "vanishing.fits"))
    if vanished is not None:
        assert vanished["ingest"]["status"] == "failed"
        assert "vanished" in vanished["ingest"]["error"]


async def test_failed_files_retried_at_start_then_quarantined(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    config = make_config(tmp_path, mongo_uri, db_name, INGEST__MAX_TRIES=3)
    config.paths.raw_dir.mkdir(parents=True)
    (config.paths.raw_dir / "bad.fits").write_bytes(b"SIMPLE  = nonsense")
    bad = str(config.paths.raw_dir / "bad.fits")
    for expected_tries, expected_status in ((1, "failed"), (2, "failed"), (3, "quarantined")):
        handle = await ServiceHandle(config).start()
        await wait_for(lambda t=expected_tries: _tries(database, bad, t), 30)
        await wait_for(lambda h=handle: _idle(h), 10)
        assert await handle.shutdown() == 0
        doc = await database.exposures.get(bad)
        assert doc is not None
        assert doc["ingest"]["status"] == expected_status
    # Quarantined: a further start leaves it alone.
    handle = await ServiceHandle(config).start()
    await wait_for(lambda: _idle(handle), 10)
    assert await handle.shutdown() == 0
    doc = await database.exposures.get(bad)
    assert doc is not None and doc["ingest"]["tries"] == 3
    # New content brings a quarantined file back.
    copy_sample("bias_0", config.paths.raw_dir, "bad.fits")
    handle = await ServiceHandle(config).start()
    await wait_for(lambda: _status(database, bad, "ok"), 30)
    await handle.shutdown()


async def _tries(db: Database, filename: str, tries: int) -> bool:
    doc = await db.exposures.get(filename)
    return doc is not None and doc["ingest"]["tries"] >= tries


async def _status(db: Database, filename: str, status: str) -> bool:
    doc = await db.exposures.get(filename)
    return doc is not None and doc["ingest"]["status"] == status


async def test_files_arriving_while_down_are_ingested_at_start(
    config: Config, database: Database
) -> None:
    handle = await ServiceHandle(config).start()
    copy_sample("science_0", config.paths.raw_dir)
    await wait_for(lambda: _n_ok(database, 1), 30)
    assert await handle.shutdown() == 0
    for i in range(20):
        small_frame(config.paths.raw_dir / "while_down" / f"d{i}.fits", i)
    handle = await ServiceHandle(config).start()
    await wait_for(lambda: _n_ok(database, 21), 30)
    await wait_for(lambda: _idle(handle), 10)
    assert await count(database) == 21
    before = await database.exposures.get(str(config.paths.raw_dir / "science_0.fits"))
    await handle.shutdown()
    # A restart with nothing new does not touch ingested documents.
    handle = await ServiceHandle(config).start()
    await wait_for(lambda: _idle(handle), 10)
    after = await database.exposures.get(str(config.paths.raw_dir / "science_0.fits"))
    assert before is not None and after is not None
    assert after["date_modified"] == before["date_modified"]
    await handle.shutdown()


async def test_rewritten_file_is_reingested_once(service: ServiceHandle, database: Database) -> None:
    path = copy_sample("science_0", service.raw, "rewritten.fits")
    await wait_for(lambda: _n_ok(database, 1), 30)
    first = await database.exposures.get(str(path))
    shutil.copyfile(RAW_SAMPLES / "flat_0.fits", path)
    await wait_for(lambda: _type_is(database, str(path), "flat"), 30)
    second = await database.exposures.get(str(path))
    assert first is not None and second is not None
    assert second["date_created"] == first["date_created"]
    assert second["date_modified"] > first["date_modified"]
    assert await count(database) == 1


async def _type_is(db: Database, filename: str, kind: str) -> bool:
    doc = await db.exposures.get(filename)
    return doc is not None and doc.get("observation_type") == kind


@pytest.mark.root  # lowers fs.inotify.max_queued_events
async def test_inotify_queue_overflow_triggers_rescan(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    """With a tiny kernel event queue and a blocked ingestor, events overflow; nothing is lost.

    Lowering ``fs.inotify.max_queued_events`` needs root, as CI runs.
    """
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    original = knob.read_text()
    config = make_config(tmp_path, mongo_uri, db_name, INGEST__QUEUE_SIZE=2)
    knob.write_text("32\n")  # read by inotify_init, so only the service's new instance sees it
    try:
        handle = await ServiceHandle(config).start()
    finally:
        knob.write_text(original)
    try:
        for i in range(300):
            small_frame(config.paths.raw_dir / f"o{i:03d}.fits", i)
        await wait_for(lambda: _n_ok(database, 300), 120, 0.2)
        assert handle.app.watcher.overflows >= 1
        assert await count(database) == 300
    finally:
        await handle.shutdown()
