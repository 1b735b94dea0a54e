"""End to end: a synthetic night (two cameras) fed to ``python -m huntsman`` as a subprocess
on a fresh embedded database ends with every science frame quality-checked."""

from __future__ import annotations

import csv
import datetime as dt
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from huntsman.testing.starfield import make_tan_sip_wcs, render_sky_frame, tycho_stars
from huntsman.testing.synthetic import CameraModel, MoffatPSF, huntsman_header, write_raw
from tests.conftest import PYTHON, ROOT, python_env
from tests.qc_synth import write_calib_frames
from tests.test_e2e import ServiceProcess, wait_until, workdir  # noqa: F401 (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.tools("solve-field", "tycho2")]

SHAPE = (1500, 2000)
SCALE = 1.24
ZP = 19.5  # render_sky_frame: magnitude giving 1 ADU/s
EXPTIME = 10.0
CAMERAS = ("TESTCAM01", "TESTCAM02")
NIGHT = dt.datetime(2022, 5, 10, 10, 0, tzinfo=dt.UTC)


class NightService(ServiceProcess):
    """The service with the small-night settings (3 frames per master, short debounce)."""

    def __init__(self, directory: Path, refcat: Path) -> None:
        super().__init__(directory)
        self.refcat = refcat

    def start(self) -> NightService:
        env = python_env(
            HUNTSMAN_VAR_DIR=str(self.workdir / "var"),
            HUNTSMAN_SERVICE__HEARTBEAT_INTERVAL_S="0.5",
            HUNTSMAN_CALIB__FRAMES__BIAS__MIN="3", HUNTSMAN_CALIB__FRAMES__DARK__MIN="3",
            HUNTSMAN_CALIB__FRAMES__FLAT__MIN="3", HUNTSMAN_CALIB__WINDOW_DAYS="0",
            HUNTSMAN_CALIB__DEBOUNCE_S="1", HUNTSMAN_WATCHER__SETTLE_S="0.5",
            HUNTSMAN_QC__REFCAT__PATH=str(self.refcat), HUNTSMAN_QC__REFCAT__FORMAT="csv",
            HUNTSMAN_DATABASE__EMBEDDED__PORT="0",
        )
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "huntsman", "--config", str(ROOT / "etc" / "huntsman.yaml")],
            cwd=self.workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for_event("watcher_started", 90)
        return self


def write_refcat(path: Path) -> None:
    """Tycho-2 stars around the field with the magnitudes the frames were rendered with."""
    cat = tycho_stars(270.0, -30.0, 1.0)
    with path.open("w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["raj2000", "dej2000", "g_psf", "e_g_psf", "r_psf", "e_r_psf", "class_star", "flags"])
        for ra, dec, mag in zip(cat.ra_deg, cat.dec_deg, cat.mag, strict=True):
            m = float(mag) if np.isfinite(mag) else 12.0  # as render_sky_frame does
            wr.writerow([ra, dec, m, 0.02, "", "", 0.99, 0])


def make_night(stage: Path) -> tuple[list[Path], list[Path]]:
    """Raw files in the order a night produces them: biases and darks in the afternoon, science
    frames, then the morning flats (science arrives before its calibrations are complete)."""
    early: list[Path] = []
    science: list[Path] = []
    late: list[Path] = []
    rng = np.random.default_rng(7)
    for k, camera in enumerate(CAMERAS):
        frames = write_calib_frames(stage / camera, SHAPE, n=3, camera=camera, seed=k,
                                    date_obs=NIGHT - dt.timedelta(hours=2))
        early += [Path(p) for p in frames["bias"] + frames["dark"]]
        late += [Path(p) for p in frames["flat"]]
        for i in range(2):
            ra, dec = 270.0 + float(rng.normal(0, 0.05)), -30.0 + float(rng.normal(0, 0.05))
            wcs = make_tan_sip_wcs(ra, dec, SHAPE, SCALE, float(rng.uniform(0, 360)))
            fwhm = float(rng.uniform(2.2, 3.5)) / SCALE
            data, _ = render_sky_frame(SHAPE, wcs, MoffatPSF(fwhm, 3.0), sky_adu=200.0,
                                       exptime_s=EXPTIME, seed=100 * k + i, n_extra_stars=500,
                                       zeropoint_mag=ZP, camera=CameraModel())
            header = huntsman_header(observation_type="science", camera_id=camera, exptime_s=EXPTIME,
                                     ra_deg=ra + 0.1, dec_deg=dec - 0.1,
                                     date_obs=NIGHT + dt.timedelta(minutes=i))
            science.append(write_raw(stage / camera / f"science_{camera}_{i}.fits", data, header))
    return early + science, late


def test_synthetic_night_ends_with_every_science_frame_done(workdir: Path) -> None:  # noqa: F811
    stage = workdir / "stage"
    first, flats = make_night(stage)
    refcat = workdir / "refcat.csv"
    write_refcat(refcat)
    service = NightService(workdir, refcat).start()
    client = service.client()
    try:
        exposures = client["huntsman"]["exposures"]

        def copy(paths: list[Path]) -> None:
            for src in paths:
                dest = service.raw / "2022-05-10" / src.parent.name / src.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest.with_name("." + dest.name + ".part"))
                dest.with_name("." + dest.name + ".part").rename(dest)

        copy(first)
        n_science = 2 * len(CAMERAS)
        # Science frames are solved, then wait for their flats.
        wait_until(lambda: exposures.count_documents({"qc.status": "waiting_calibs"}) == n_science, 90, 0.2)
        copy(flats)
        wait_until(lambda: exposures.count_documents({"observation_type": "science",
                                                      "qc.status": "done"}) == n_science, 120, 0.2)
        docs = list(exposures.find({"observation_type": "science"}))
        assert len(docs) == n_science
        for doc in docs:
            qc, wcs = doc["qc"], doc["wcs"]
            assert wcs["status"] == "solved", wcs
            assert qc["status"] == "done" and qc["tries"] == 1
            assert qc["fwhm_arcsec"] is not None and 2.0 < qc["fwhm_arcsec"] < 4.0
            assert qc["sky_adu"] == pytest.approx(200.0, rel=0.02)
            assert set(qc["calibs"]) == {"bias", "dark", "flat"}
            assert f"_{doc['camera']}_" in qc["calibs"]["flat"]
            assert Path(qc["calibrated_filename"]).is_file()
            assert doc["timing"]["qc_done"] >= doc["timing"]["solved"]
            assert qc["grade"] in ("good", "fair", "bad")
            if qc["zeropoint"] is not None:
                assert qc["zeropoint"] == pytest.approx(ZP, abs=0.1)
        print("zeropoints:", [(d["qc"]["zeropoint"], d["qc"]["n_zeropoint_stars"], d["qc"]["error"])
                              for d in docs])
        # Exactly one QC attempt per frame: waiting cost no retries.
        started = [e for e in service.events() if e.get("event") == "qc_started"]
        assert len(started) == n_science
        status = subprocess.run(
            [PYTHON, "-m", "huntsman", "--config", str(ROOT / "etc" / "huntsman.yaml"), "status"],
            cwd=workdir, env=python_env(HUNTSMAN_VAR_DIR=str(workdir / "var")),
            capture_output=True, text=True, timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert "quality control" in status.stdout and "done" in status.stdout
    finally:
        client.close()
        service.signal(2)
        assert service.wait(30) == 0
