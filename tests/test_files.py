"""Files that move or vanish: renames, deletions, hard links and a replaced raw root.

Every test runs the real service (watcher, ingestor, pool, embedded-protocol database) on a
real temporary raw tree and checks the documents that end up in the database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from huntsman.config import Config
from huntsman.store.database import Database
from huntsman.testing.synthetic import huntsman_header, write_raw
from tests.conftest import ServiceHandle, make_config, wait_for


def frame(path: Path, index: int, observation_type: str = "science") -> Path:
    """A tiny valid Huntsman frame with the real keyword set (pixels differ per index)."""
    header = huntsman_header(observation_type=observation_type, camera_id="TESTCAM01")
    data = np.full((16, 16), 100 + index, dtype=np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_raw(path, data, header)


async def doc(db: Database, path: Path) -> dict[str, Any] | None:
    return await db.exposures.get(str(path))


async def names(db: Database) -> list[str]:
    return sorted([d["filename"] async for d in db.exposures.find({}, projection={"filename": 1})])


async def ok_at(db: Database, path: Path) -> bool:
    d = await doc(db, path)
    return d is not None and d["ingest"]["status"] == "ok"


async def settled(service: ServiceHandle) -> None:
    """A full rescan, then wait until nothing is queued or in flight."""
    await service.app.watcher.scan(service.raw)

    async def idle() -> bool:
        return bool(service.app.ingestor.idle())

    await wait_for(idle, 15)


async def test_rename_moves_the_document(service: ServiceHandle, database: Database) -> None:
    a = frame(service.raw / "2022-03-01" / "a.fits", 1)
    await wait_for(lambda: ok_at(database, a), 20)
    first = await doc(database, a)
    assert first is not None and first["file"]["ino"] == os.stat(a).st_ino

    b = service.raw / "2022-03-01" / "b.fits"
    os.rename(a, b)
    await wait_for(lambda: ok_at(database, b), 10)
    c = service.raw / "2022-03-02" / "c.fits"  # into another (new) directory of the tree
    c.parent.mkdir()
    os.rename(b, c)
    await wait_for(lambda: ok_at(database, c), 10)
    await settled(service)

    assert await names(database) == [str(c)]
    moved = await doc(database, c)
    assert moved is not None
    assert moved["file"]["previous_names"] == [str(a), str(b)]
    assert moved["file"]["missing"] is False
    # Moved, not ingested again.
    assert moved["timing"]["ingested"] == first["timing"]["ingested"]
    assert moved["ingest"]["tries"] == 1
    assert service.app.ingestor.counts["moved"] == 2


async def test_rename_to_an_ignored_name_and_back(service: ServiceHandle, database: Database) -> None:
    a = frame(service.raw / "a.fits", 1)
    await wait_for(lambda: ok_at(database, a), 20)
    hidden = service.raw / ".a.fits.bak"
    os.rename(a, hidden)

    async def missing() -> bool:
        d = await doc(database, a)
        return d is not None and d["file"].get("missing") is True

    await wait_for(missing, 10)
    os.rename(hidden, a)

    async def back() -> bool:
        d = await doc(database, a)
        return d is not None and d["file"].get("missing") is False

    await wait_for(back, 10)
    await settled(service)
    d = await doc(database, a)
    assert d is not None and "missing_since" not in d["file"] and d["ingest"]["tries"] == 1
    assert await names(database) == [str(a)]


async def test_directory_rename_moves_every_document(service: ServiceHandle, database: Database) -> None:
    old = service.raw / "night1"
    files = [frame(old / f"cam{i % 2}" / f"f{i}.fits", i) for i in range(6)]
    await wait_for(lambda: _n_ok(database, 6), 30)
    new = service.raw / "night1-renamed"
    os.rename(old, new)
    expected = sorted(str(new / p.relative_to(old)) for p in files)

    async def all_moved() -> bool:
        return await names(database) == expected

    await wait_for(all_moved, 10)
    # The watches below the renamed directory follow it: a new file there gets its new path.
    late = frame(new / "cam0" / "late.fits", 50)
    await wait_for(lambda: ok_at(database, late), 15)
    await settled(service)
    assert await names(database) == sorted([*expected, str(late)])
    d = await doc(database, new / "cam1" / "f1.fits")
    assert d is not None and d["file"]["previous_names"] == [str(old / "cam1" / "f1.fits")]
    assert d["ingest"]["tries"] == 1


async def _n_ok(db: Database, n: int) -> bool:
    return await db.exposures.count({"ingest.status": "ok"}) >= n


async def _missing(db: Database, path: Path) -> bool:
    d = await doc(db, path)
    return d is not None and d.get("file", {}).get("missing") is True


async def test_delete_and_move_out_mark_missing(
    service: ServiceHandle, database: Database, tmp_path: Path
) -> None:
    raw = service.raw
    deleted = frame(raw / "d" / "deleted.fits", 1)
    outside = frame(raw / "d" / "moved-out.fits", 2)
    tree = [frame(raw / "sub" / f"s{i}.fits", 10 + i) for i in range(3)]
    await wait_for(lambda: _n_ok(database, 5), 30)
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)

    os.unlink(deleted)
    os.rename(outside, tmp_path / "moved-out.fits")
    os.rename(raw / "sub", tmp_path / "sub-outside")
    for path in [deleted, outside, *tree]:
        await wait_for(lambda p=path: _missing(database, p), 10)
    d = await doc(database, deleted)
    assert d is not None
    assert d["file"]["missing_since"].tzinfo is not None and d["file"]["missing_since"] >= before
    assert d["ingest"]["status"] == "ok"  # what was learnt of the file is kept
    # The moved-out tree's watches are gone: a file written there is not ours.
    frame(tmp_path / "sub-outside" / "new.fits", 20)
    await settled(service)
    assert await database.exposures.count({}) == 5

    # A file that reappears under its name is unmarked.
    os.rename(tmp_path / "moved-out.fits", outside)

    async def back() -> bool:
        d = await doc(database, outside)
        return d is not None and d["file"]["missing"] is False

    await wait_for(back, 10)
    assert await database.exposures.count({"file.missing": True}) == 4


async def test_changes_while_stopped_found_by_the_startup_scan(
    config: Config, database: Database
) -> None:
    service = await ServiceHandle(config).start()
    raw = service.raw
    keep, gone, renamed = (frame(raw / "n" / f"{name}.fits", i)
                           for i, name in enumerate(("keep", "gone", "renamed")))
    await wait_for(lambda: _n_ok(database, 3), 30)
    assert await service.shutdown() == 0

    os.unlink(gone)
    new_name = raw / "elsewhere" / "renamed-later.fits"
    new_name.parent.mkdir()
    os.rename(renamed, new_name)  # same inode, size and mtime: found by identity

    again = await ServiceHandle(config).start()
    try:
        await wait_for(lambda: _missing(database, gone), 15)
        await wait_for(lambda: ok_at(database, new_name), 15)
        await settled(again)
        assert await names(database) == sorted(map(str, [keep, gone, new_name]))
        d = await doc(database, new_name)
        assert d is not None and d["file"]["previous_names"] == [str(renamed)]
        assert d["ingest"]["tries"] == 1 and again.app.ingestor.counts["moved"] == 1
    finally:
        await again.shutdown()


async def test_hard_links_count_once(service: ServiceHandle, database: Database, tmp_path: Path) -> None:
    raw = service.raw
    a = frame(raw / "a.fits", 1)
    await wait_for(lambda: ok_at(database, a), 20)
    link = raw / "other" / "a-link.fits"
    link.parent.mkdir()
    os.link(a, link)

    async def linked() -> bool:
        d = await doc(database, a)
        return d is not None and d["file"].get("links") == [str(link)]

    await wait_for(linked, 10)
    # Two names written at once for the same pixels (both new to the service).
    staged = frame(tmp_path / "staged.fits", 2)
    pair = [raw / "p1.fits", raw / "p2.fits"]
    for p in pair:
        os.link(staged, p)
    await settled(service)

    async def pair_merged() -> bool:
        return await database.exposures.count({"filename": {"$in": [str(p) for p in pair]}}) == 1

    await wait_for(pair_merged, 10)
    await settled(service)
    assert await database.exposures.count({}) == 2
    kept = [d async for d in database.exposures.find({"filename": {"$in": [str(p) for p in pair]}})]
    other = pair[1] if kept[0]["filename"] == str(pair[0]) else pair[0]
    assert kept[0]["file"]["links"] == [str(other)]
    # Deleting the first name: the document moves to the surviving link, nothing is missing.
    os.unlink(a)
    await wait_for(lambda: ok_at(database, link), 10)
    moved = await doc(database, link)
    assert moved is not None and moved["file"]["previous_names"] == [str(a)]
    assert moved["file"].get("links") == [] and moved["file"]["missing"] is False
    # Deleting a link name only forgets the link.
    os.unlink(other)

    async def unlinked() -> bool:
        d = await database.exposures.get(kept[0]["filename"])
        return d is not None and d["file"]["links"] == []

    await wait_for(unlinked, 10)
    assert await database.exposures.count({"file.missing": True}) == 0
    assert await database.exposures.count({}) == 2


async def test_raw_root_replaced(service: ServiceHandle, database: Database, tmp_path: Path) -> None:
    raw = service.raw
    old = [frame(raw / "n1" / f"old{i}.fits", i) for i in range(3)]
    await wait_for(lambda: _n_ok(database, 3), 30)
    watcher = service.app.watcher

    # Renamed away, and a new root created at the configured path with new files.
    os.rename(raw, tmp_path / "raw-old")
    raw.mkdir()
    new = [frame(raw / "n2" / f"new{i}.fits", 10 + i) for i in range(3)]
    for path in new:
        await wait_for(lambda p=path: ok_at(database, p), 10)
    assert watcher.root_restarts == 1
    for path in old:
        await wait_for(lambda p=path: _missing(database, p), 10)
    late = frame(raw / "n2" / "late.fits", 20)  # through the new watches, not a rescan
    await wait_for(lambda: ok_at(database, late), 10)

    # Deleted, then recreated a moment later.
    shutil.rmtree(raw)

    async def restarted() -> bool:
        return watcher.root_restarts == 2

    await wait_for(restarted, 10)
    raw.mkdir()
    again = frame(raw / "again.fits", 30)
    await wait_for(lambda: ok_at(database, again), 10)
    for path in [*new, late]:
        await wait_for(lambda p=path: _missing(database, p), 10)
    assert await database.exposures.count({"file.missing": {"$ne": True}}) == 1


async def test_masters_follow_moved_inputs_and_exclude_missing(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    from tests.test_calib_service import CAM, D1, SMALL_GROUPS, night

    config = make_config(tmp_path, mongo_uri, db_name, **SMALL_GROUPS)
    service = await ServiceHandle(config).start()
    try:
        biases = night(service.raw / D1, D1, {"bias": 4})
        await wait_for(lambda: _n_ok(database, 4), 30)
        calib = service.app.calib
        first = await calib.run_pass(dates={D1}, reason="test")
        assert len(first.built) == 1 and not first.failed

        renamed = service.raw / D1 / "renamed" / "bias-renamed.fits"
        renamed.parent.mkdir()
        os.rename(biases[0], renamed)
        os.unlink(biases[1])
        await wait_for(lambda: ok_at(database, renamed), 10)
        await wait_for(lambda: _missing(database, biases[1]), 10)

        for attempt in range(2):  # rebuilt once from the current documents, then up to date
            summary = await calib.run_pass(dates={D1}, reason="test")
            assert not summary.failed, summary
            assert len(summary.built) == (1 if attempt == 0 else 0)
        master = await database.calibs.match_one("bias", CAM, D1)
        assert master is not None and master["filename"] not in first.built
        old = await database.calibs.get(first.built[0])
        assert old is not None and old["superseded"] is True
        assert sorted(master["raw_filenames"]) == sorted(map(str, [renamed, biases[2], biases[3]]))
        excluded = {e["filename"]: e["reason"] for e in master["excluded"]}
        assert "raw file missing since" in excluded[str(biases[1])]
    finally:
        await service.shutdown()



async def test_two_names_ingested_at_once_end_as_one_document(
    service: ServiceHandle, database: Database, tmp_path: Path
) -> None:
    """Both names of one inode processed concurrently (neither had a document yet)."""
    from huntsman.models import FileSource, IngestRequest, utcnow

    first = frame(tmp_path / "cli" / "x1.fits", 7)
    second = first.with_name("x2.fits")
    os.link(first, second)
    ingestor = service.app.ingestor
    results = await asyncio.gather(*(
        ingestor.process(IngestRequest(str(p), utcnow(), FileSource.CLI)) for p in (first, second)
    ))
    assert sorted(results, key=str) == sorted(["ok", None], key=str)
    docs = [d async for d in database.exposures.find({"filename": {"$in": [str(first), str(second)]}})]
    assert len(docs) == 1
    other = str(second) if docs[0]["filename"] == str(first) else str(first)
    assert docs[0]["file"]["links"] == [other] and ingestor.counts["linked"] == 1


async def test_raw_root_parent_renamed(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    """A renamed parent gives the root's own watch no event: the path check notices."""
    config = make_config(tmp_path, mongo_uri, db_name, RAW_DIR=tmp_path / "data" / "raw")
    service = await ServiceHandle(config).start()
    try:
        raw = service.raw
        old = frame(raw / "old.fits", 1)
        await wait_for(lambda: ok_at(database, old), 20)
        os.rename(tmp_path / "data", tmp_path / "data-old")
        raw.mkdir(parents=True)
        new = frame(raw / "new.fits", 2)
        await wait_for(lambda: ok_at(database, new), 10)
        await wait_for(lambda: _missing(database, old), 10)
        assert service.app.watcher.root_restarts == 1
        late = frame(raw / "late.fits", 3)
        await wait_for(lambda: ok_at(database, late), 10)
        assert await database.exposures.count({}) == 3
    finally:
        await service.shutdown()
