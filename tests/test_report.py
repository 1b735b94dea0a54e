"""The night report: HTML and PNG plots from a realistic synthetic night in the real database."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import numpy as np
from matplotlib.image import imread

from huntsman.models import Grade, IngestResult, IngestStatus, ObservationType, QCStatus, WcsStatus, utcnow
from huntsman.report import write_report
from huntsman.report.data import UNKNOWN_RANK, grade_rank, last_completed_night
from huntsman.report.html import CSS, GRADE_CSS, UNKNOWN_CSS, grade_css
from huntsman.report.plots import NOT_RUN, STATUS_COLOURS, camera_plot_name
from huntsman.store.database import Database
from huntsman.store.records import QCRecord, SolveRecord
from tests.conftest import PYTHON, ROOT, python_env
from tests.nightdata import CAMERAS, NIGHT, WORST, insert_night

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _section(page: str, table_id: str) -> str:
    match = re.search(rf'<table id="{table_id}">(.*?)</table>', page, re.S)
    assert match is not None, f"table {table_id} missing"
    return match.group(1)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_report_for_a_synthetic_night(database: Database, tmp_path: Path) -> None:
    inserted = await insert_night(database)
    out = tmp_path / "reports" / NIGHT
    result = await write_report(database, NIGHT, out, worst_n=5)
    page = (out / "index.html").read_text()
    assert result.path == out / "index.html" and not result.empty

    # Every science frame of the night is in the table, nothing from another night.
    rows = _section(page, "science-frames")
    science = list(inserted["science"]) + [
        d for d in inserted["calibration"] if d["observation_type"] == "science"
    ]
    for doc in science:
        assert doc["filename"] in rows, doc["filename"]
    assert rows.count("<tr>") == 1 + len(science)  # header row + one per frame
    for doc in inserted["other"]:
        assert doc["filename"] not in page

    # One plot per camera, plus the field and frame plots; all valid, non-trivial PNGs.
    camera_pngs = sorted(p.name for p in out.glob("camera_*.png"))
    assert camera_pngs == sorted(camera_plot_name(c) for c in CAMERAS)
    for name in [*camera_pngs, "fwhm_field.png", "frames.png"]:
        path = out / name
        width, height = _png_size(path)
        assert width > 300 and height > 200
        pixels = imread(path)
        assert float(np.std(pixels)) > 0.01, name  # not a blank canvas
        assert f'src="{name}"' in page
    for src in re.findall(r'<img src="([^"]+)"', page):
        assert (out / src).is_file()

    # The plots hold exactly the frames that have each value (missing ones skipped).
    for camera in CAMERAS:
        mine = [d for d in inserted["science"] if d["camera"] == camera]
        for field in ("fwhm_arcsec", "zeropoint", "sky_mag_arcsec2", "limiting_mag_5sigma"):
            expected = sum(1 for d in mine if isinstance((d.get("qc") or {}).get(field), float | int))
            assert result.points[camera][f"qc.{field}"] == expected, (camera, field)
    assert result.points["TESTCAM01"]["qc.zeropoint"] == 10  # 12 frames, one waiting, one failed

    # The worst frames: the wind-shaken one first, with its flags.
    worst = _section(page, "worst-frames")
    first_row = worst.split("<tr>")[2]
    assert WORST in first_row
    assert "fwhm_high; elongated; trailing" in first_row
    assert worst.count("<tr>") == 1 + 5

    # Frame states, masters built and the missing one with its reason, ingest failures.
    counts = _section(page, "frame-counts")
    assert "waiting_calibs" in counts and "failed" in counts
    assert "bias_TESTCAM02_" + NIGHT in _section(page, "masters-built")
    missing = _section(page, "masters-missing")
    assert "insufficient" in missing and "3 usable flat frames, 5 needed" in missing
    assert "truncated FITS file" in _section(page, "ingest-failures")
    assert "—" in rows  # missing values are shown as a dash
    assert "no-data" not in page


async def test_report_for_an_empty_night(database: Database, tmp_path: Path) -> None:
    await insert_night(database)
    out = tmp_path / "empty"
    result = await write_report(database, "2024-06-01", out)
    page = (out / "index.html").read_text()
    assert result.empty and result.plots == ()
    assert 'id="no-data"' in page and "No data for the night 2024-06-01" in page
    assert list(out.glob("*.png")) == []


def test_every_grade_has_a_rank_and_a_colour() -> None:
    assert [g.rank for g in Grade] == list(range(len(Grade)))  # declared best first
    assert [grade_rank(g) for g in Grade] == [float(g.rank) for g in Grade]
    assert set(GRADE_CSS) == set(Grade)
    for css in [*GRADE_CSS.values(), UNKNOWN_CSS]:
        assert f".{css}{{" in CSS, css  # every colour is styled
    assert len(set(GRADE_CSS.values())) == len(Grade)
    for legacy in ("A", "F", "marginal", "", 3):
        assert grade_rank(legacy) == UNKNOWN_RANK and grade_css(legacy) == UNKNOWN_CSS
    assert grade_rank(None) == UNKNOWN_RANK and grade_css(None) is None  # shown as a dash
    assert min(g.rank for g in Grade) > UNKNOWN_RANK


def test_every_ingest_and_qc_status_has_a_colour() -> None:
    for status in [*IngestStatus, *QCStatus, NOT_RUN]:
        assert STATUS_COLOURS.get(str(status)), status


async def test_fair_frames_sort_between_good_and_bad_in_the_worst_frames(
    database: Database, tmp_path: Path
) -> None:
    """Documents written by the stage writers; the good frame has the largest FWHM, so only the
    grade puts it last."""
    import datetime as dt

    night = "2024-05-10"
    frames = {Grade.GOOD: 3.4, Grade.FAIR: 2.1, Grade.BAD: 2.8}
    names = {}
    for i, (grade, fwhm) in enumerate(frames.items()):
        when = dt.datetime(2024, 5, 10, 11, i, tzinfo=dt.UTC)
        name = f"/raw/{night}/CAM1/science_{grade}.fits"
        names[grade] = name
        result = IngestResult(
            filename=name,
            fields={"observation_type": ObservationType.SCIENCE, "camera": "CAM1", "date_obs": when,
                    "calib_date": night, "physical_filter": "g_band"},
            header={}, metrics={}, error=None, warnings=(), duration_s=0.1, file_size=1, file_mtime_ns=1,
        )
        await database.exposures.record_ingest(result, seen_at=utcnow(), previous=None, max_tries=3,
                                               same_content=False)
        await database.exposures.record_solve(name, SolveRecord.failed(tries=1, error="x", solve_time_s=1.0))
        await database.exposures.record_qc(name, QCRecord(
            QCStatus.DONE, tries=1, measurements={"fwhm_arcsec": fwhm}, wcs_status=WcsStatus.FAILED,
            grade=grade, flags=(),
        ))
    out = tmp_path / "report"
    await write_report(database, night, out, worst_n=3)
    worst = _section((out / "index.html").read_text(), "worst-frames")
    rows = worst.split("<tr>")[2:]
    assert len(rows) == 3
    assert [next(g for g, n in names.items() if n in row) for row in rows] == [
        Grade.BAD, Grade.FAIR, Grade.GOOD
    ]
    for row, grade in zip(rows, (Grade.BAD, Grade.FAIR, Grade.GOOD), strict=True):
        assert f'<td class="{GRADE_CSS[grade]}">{grade}</td>' in row, row


def test_last_completed_night() -> None:
    import datetime as dt

    at = dt.datetime(2024, 5, 10, 21, 59, tzinfo=dt.UTC)
    assert last_completed_night(at, 22) == "2024-05-09"
    assert last_completed_night(at + dt.timedelta(minutes=1), 22) == "2024-05-10"
    local = dt.datetime(2024, 5, 11, 8, 30, tzinfo=dt.timezone(dt.timedelta(hours=10)))
    assert last_completed_night(local, 22) == "2024-05-10"


def test_report_command(mongo_uri: str, db_name: str, tmp_path: Path) -> None:
    """`python -m huntsman report` end to end on an empty database: a no-data page."""
    env = python_env(
        HUNTSMAN_MONGODB_URI=mongo_uri,
        HUNTSMAN_DATABASE__NAME=db_name,
        HUNTSMAN_VAR_DIR=str(tmp_path / "var"),
    )
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "huntsman",
            "--config",
            str(ROOT / "etc" / "huntsman.yaml"),
            "report",
            "--night",
            "2024-05-10",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    index = tmp_path / "var" / "reports" / "2024-05-10" / "index.html"
    assert str(index) in proc.stdout
    assert "No data for the night 2024-05-10" in index.read_text()
