"""A realistic synthetic night written straight into the database (for readers: report, HTTP).

Two cameras, g and r filters, science frames every 20 minutes with QC numbers in the contract
units; a few frames with partial data (QC waiting for calibrations, QC failed, QC not yet run),
one clearly bad frame, calibration frames, an ingest failure, masters built and one missing.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np

from huntsman.store.database import Database

NIGHT = "2024-05-10"
OTHER_NIGHT = "2024-05-09"
CAMERAS = ("TESTCAM01", "TESTCAM02")
RAW = "/data/raw"


def _base(filename: str, camera: str, obs_type: str, when: dt.datetime, **extra: Any) -> dict[str, Any]:
    exptime = {"bias": 0.0, "dark": 60.0, "flat": 2.5, "science": 120.0}[obs_type]
    close = when + dt.timedelta(seconds=exptime)
    seen = close + dt.timedelta(seconds=3.0)
    return {
        "filename": filename,
        "observation_type": obs_type,
        "camera": camera,
        "physical_filter": extra.pop("physical_filter", None),
        "exposure_time": exptime,
        "date_obs": when,
        "calib_date": when.date().isoformat(),
        "field": {"bias": "Bias", "dark": "Dark", "flat": "FlatDither00", "science": "DoradoGroup-p0p0"}[
            obs_type
        ],
        "airmass": extra.pop("airmass", None),
        "ingest": {"status": "ok", "error": None, "tries": 1, "duration_s": 0.8},
        "metrics": {"clipped_median": 250.0, "fwhm_arcsec": None},
        "timing": {
            "shutter_close": close,
            "file_seen": seen,
            "ingested": seen + dt.timedelta(seconds=1.2),
        },
        **extra,
    }


def _grid(fwhm: float, tilt: float) -> list[list[float | None]]:
    grid: list[list[float | None]] = [
        [round(fwhm * (1 + tilt * (ix + iy - 2) / 4), 3) for ix in range(3)] for iy in range(3)
    ]
    grid[2][2] = None  # an empty corner cell
    return grid


def science_frames(night: str = NIGHT) -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    start = dt.datetime.fromisoformat(night).replace(hour=9, tzinfo=dt.UTC)
    docs = []
    for ci, camera in enumerate(CAMERAS):
        for i in range(12):
            when = start + dt.timedelta(minutes=20 * i, seconds=7 * ci)
            filt = "g_band" if i % 2 == 0 else "r_band"
            fwhm = float(2.6 + 0.4 * np.sin(i / 3) + 0.1 * ci + rng.normal(0, 0.05))
            zp = (21.9 if filt == "g_band" else 21.6) - 0.03 * i * (i > 8)
            sky = 21.7 - 0.05 * i
            doc = _base(
                f"{RAW}/{night}/{camera}/science_{camera}_{i:03d}.fits",
                camera,
                "science",
                when,
                physical_filter=filt,
                airmass=round(1.05 + 0.03 * i, 3),
            )
            doc["timing"]["solved"] = doc["timing"]["ingested"] + dt.timedelta(seconds=6)
            doc["timing"]["qc_done"] = doc["timing"]["ingested"] + dt.timedelta(seconds=25)
            doc["wcs"] = {"status": "solved", "error": None, "solve_time_s": 5.2}
            doc["qc"] = {
                "status": "done",
                "calibs": {"bias": "b.fits", "dark": "d.fits", "flat": f"f_{filt}.fits"},
                "fwhm_arcsec": round(fwhm, 3),
                "fwhm_px": round(fwhm / 1.24, 3),
                "ellipticity": round(0.05 + 0.01 * i, 3),
                "sky_adu": round(60.0 * 10 ** (-0.4 * (sky - 21.7)), 2),
                "sky_mag_arcsec2": round(sky, 3),
                "zeropoint": round(zp, 3),
                "zeropoint_err": 0.02,
                "n_zeropoint_stars": 140 - i,
                "limiting_mag_5sigma": round(zp - 2.5 + 0.3 * (21.7 - sky) + 0.0 * fwhm - 0.2, 3),
                "error": None,
                "grade": "good" if fwhm < 2.8 else "fair",
                "flags": [],
                "fwhm_grid_arcsec": _grid(fwhm, 0.15 + 0.1 * ci),
                "duration_s": 3.1,
            }
            docs.append(doc)
    # Partial data: QC waiting, QC failed, QC never run.
    docs[3]["qc"] = {"status": "waiting_calibs", "calibs": None}
    docs[3]["timing"].pop("qc_done")
    docs[5]["qc"] = {"status": "failed", "error": "no reference stars matched", "fwhm_arcsec": 3.1}
    del docs[14]["qc"]
    docs[14]["timing"].pop("qc_done")
    docs[14]["wcs"] = {"status": "failed", "error": "no solution found"}
    # The worst frame of the night: wind shake.
    worst = docs[20]["qc"]
    worst.update(
        fwhm_arcsec=6.4,
        ellipticity=0.41,
        grade="bad",
        flags=["fwhm_high", "elongated", "trailing"],
        limiting_mag_5sigma=17.1,
    )
    return docs


WORST = f"{RAW}/{NIGHT}/TESTCAM02/science_TESTCAM02_008.fits"


def calibration_frames(night: str = NIGHT) -> list[dict[str, Any]]:
    start = dt.datetime.fromisoformat(night).replace(hour=7, minute=30, tzinfo=dt.UTC)
    docs = []
    for ci, camera in enumerate(CAMERAS):
        for i in range(5):
            t = start + dt.timedelta(seconds=30 * i + ci)
            docs.append(_base(f"{RAW}/{night}/{camera}/bias_{i}.fits", camera, "bias", t))
            docs.append(
                _base(f"{RAW}/{night}/{camera}/dark_{i}.fits", camera, "dark", t + dt.timedelta(minutes=5))
            )
            docs.append(
                _base(
                    f"{RAW}/{night}/{camera}/flat_{i}.fits",
                    camera,
                    "flat",
                    t + dt.timedelta(minutes=10),
                    physical_filter="g_band",
                )
            )
    bad = _base(
        f"{RAW}/{night}/TESTCAM01/truncated.fits", "TESTCAM01", "science", start + dt.timedelta(hours=3)
    )
    bad["ingest"] = {
        "status": "failed",
        "error": "truncated FITS file: 100000 bytes on disk, headers describe 1304640",
        "tries": 1,
        "duration_s": 0.01,
    }
    bad["metrics"] = {}
    docs.append(bad)
    return docs


def masters(night: str = NIGHT) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    calibs, status = [], []
    for camera in CAMERAS:
        for kind in ("bias", "dark"):
            calibs.append(
                {
                    "filename": f"/data/calib/{night}/{kind}/{kind}_{camera}_{night}.fits",
                    "calib_type": kind,
                    "camera": camera,
                    "physical_filter": None,
                    "date": night,
                    "n_frames": 5,
                    "version": 1,
                    "superseded": False,
                    "raw_filenames": [f"{RAW}/{night}/{camera}/{kind}_{i}.fits" for i in range(5)],
                }
            )
            status.append(
                {
                    "_id": f"{kind}/{camera}/-/{night}",
                    "calib_type": kind,
                    "camera": camera,
                    "physical_filter": None,
                    "date": night,
                    "state": "built",
                    "reason": None,
                    "n_candidates": 5,
                }
            )
    status.append(
        {
            "_id": f"flat/TESTCAM02/g_band/{night}",
            "calib_type": "flat",
            "camera": "TESTCAM02",
            "physical_filter": "g_band",
            "date": night,
            "state": "insufficient",
            "reason": "3 usable flat frames, 5 needed (2 excluded: illumination above 0.8)",
            "n_candidates": 5,
        }
    )
    return calibs, status


async def insert_night(database: Database) -> dict[str, list[dict[str, Any]]]:
    science = science_frames()
    other = science_frames(OTHER_NIGHT)[:4]
    calibration = calibration_frames()
    calibs, status = masters()
    await database.exposures.collection.insert_many([*science, *other, *calibration])
    await database.calibs.collection.insert_many(calibs)
    await database.calibs.status.insert_many(status)
    return {"science": science, "other": other, "calibration": calibration}
