"""CalibCollection.match: nearest in time within the max age, never superseded, deterministic."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from huntsman.store.database import Database


async def add(database: Database, calib_type: str, date: str, *, camera: str = "CAM1",
              physical_filter: str | None = None, superseded: bool = False, n_frames: int = 10,
              ccd_temp: float | None = 0.0, tag: str = "") -> str:
    name = f"/calib/{date}/{calib_type}/{calib_type}_{camera}_{physical_filter or ''}_{date}{tag}.fits"
    doc: dict[str, Any] = {
        "filename": name, "calib_type": calib_type, "camera": camera,
        "physical_filter": physical_filter, "date": date, "superseded": superseded,
        "n_frames": n_frames, "ccd_temp": ccd_temp, "raw_filenames": [],
    }
    await database.calibs.insert(doc)
    return name


async def full_set(database: Database, date: str, **kw: Any) -> dict[str, str]:
    return {
        "bias": await add(database, "bias", date, **kw),
        "dark": await add(database, "dark", date, **kw),
        "flat": await add(database, "flat", date, physical_filter="g_band", **kw),
    }


def names(chosen: dict[str, Any] | None) -> dict[str, str] | None:
    return None if chosen is None else {k: v["filename"] for k, v in chosen.items()}


async def test_nearest_complete_set_within_max_age(database: Database) -> None:
    older = await full_set(database, "2022-01-01")
    newer = await full_set(database, "2022-01-10")
    match = database.calibs.match
    assert names(await match("CAM1", "g_band", "2022-01-03")) == older
    assert names(await match("CAM1", "g_band", dt.datetime(2022, 1, 8, 23, tzinfo=dt.UTC))) == newer
    # A datetime is placed on its UTC day (not its local date).
    late = dt.datetime(2022, 1, 5, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-2)))
    assert names(await match("CAM1", "g_band", late)) == newer  # 2022-01-06 UTC: 4 days from 01-10
    # Read as its local date (01-05) it would be 4 days from the older set instead.
    assert names(await match("CAM1", "g_band", "2022-01-05")) == older
    assert await match("CAM1", "g_band", "2022-01-30") is None  # 20 days > 14
    assert names(await match("CAM1", "g_band", "2022-01-30", max_age_days=20)) == newer
    assert await match("CAM1", "r_band", "2022-01-03") is None  # no flat in that filter
    assert await match("CAM1", None, "2022-01-03") is None
    assert await match("CAM2", "g_band", "2022-01-03") is None


async def test_equal_distance_prefers_the_earlier_master(database: Database) -> None:
    before = await full_set(database, "2022-02-01")
    await full_set(database, "2022-02-05")
    assert names(await database.calibs.match("CAM1", "g_band", "2022-02-03")) == before


async def test_superseded_never_chosen_and_incomplete_set_is_none(database: Database) -> None:
    await add(database, "bias", "2022-03-01", superseded=True)
    await add(database, "dark", "2022-03-01")
    await add(database, "flat", "2022-03-01", physical_filter="g_band")
    assert await database.calibs.match("CAM1", "g_band", "2022-03-01") is None
    current = await add(database, "bias", "2022-03-04", tag="_v2")
    chosen = await database.calibs.match("CAM1", "g_band", "2022-03-01")
    assert chosen is not None and chosen["bias"]["filename"] == current


@pytest.mark.parametrize(("ccd_temp", "expected"), [(-9.0, "cold"), (4.0, "warm"), (None, "more")])
async def test_same_day_darks_by_temperature_then_frames(
    database: Database, ccd_temp: float | None, expected: str
) -> None:
    cold = await add(database, "dark", "2022-04-01", ccd_temp=-10.0, n_frames=5, tag="_cold")
    warm = await add(database, "dark", "2022-04-01", ccd_temp=5.0, n_frames=9, tag="_warm")
    chosen = await database.calibs.match_one("dark", "CAM1", "2022-04-01", ccd_temp=ccd_temp)
    assert chosen is not None
    assert chosen["filename"] == {"cold": cold, "warm": warm, "more": warm}[expected]
