"""The stage writers of ExposureCollection (record_ingest, record_solve, record_qc) on the real
embedded database: each writes its own sub-documents and timing field and nothing else."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from huntsman.models import (
    Grade,
    IngestResult,
    IngestStatus,
    ObservationType,
    QCStatus,
    WcsStatus,
    utcnow,
)
from huntsman.store.database import Database
from huntsman.store.records import (
    STAGE_DOCUMENTS,
    QCRecord,
    SolveRecord,
    WcsSolution,
    qc_fields,
    solve_fields,
)
from tests.conftest import ROOT

NAME = "/raw/2024-05-10/CAM1/science_000.fits"
WHEN = dt.datetime(2024, 5, 10, 11, 0, tzinfo=dt.UTC)


def ingest_result(filename: str = NAME, *, error: str | None = None, **fields: Any) -> IngestResult:
    return IngestResult(
        filename=filename,
        fields={"observation_type": ObservationType.SCIENCE, "camera": "CAM1", "date_obs": WHEN,
                "calib_date": "2024-05-10", "physical_filter": "g_band",
                "shutter_close": WHEN + dt.timedelta(seconds=120), **fields},
        header={"CAM-ID": "CAM1"},
        metrics={"clipped_median": 250.0, "fwhm_arcsec": 2.7},
        error=error,
        warnings=(),
        duration_s=0.4,
        file_size=1000,
        file_mtime_ns=123,
    )


async def ingested(database: Database, filename: str = NAME) -> None:
    status = await database.exposures.record_ingest(
        ingest_result(filename), seen_at=utcnow(), previous=None, max_tries=3, same_content=False
    )
    assert status is IngestStatus.OK


def solution(**overrides: Any) -> WcsSolution:
    values: dict[str, Any] = {
        "header": {"CTYPE1": "RA---TAN-SIP", "CRVAL1": 150.0}, "ra_center": 150.0,
        "dec_center": -30.0, "pixel_scale_arcsec": 1.24, "rotation_deg": 12.0, "solve_time_s": 4.2,
        "index_used": "index-4107.fits", "n_matched": 40, "residual_arcsec": 0.3,
        "pointing_offset_arcsec": 55.0, "blind": False, "marker": "abc123",
        "written_to_file": True, "write_error": None,
    }
    values.update(overrides)
    return WcsSolution(**values)


async def test_record_ingest_stores_plain_strings_and_quarantines(database: Database) -> None:
    exposures = database.exposures
    await ingested(database)
    doc = await exposures.get(NAME)
    assert doc is not None
    assert type(doc["ingest"]["status"]) is str and doc["ingest"]["status"] == IngestStatus.OK
    assert type(doc["observation_type"]) is str and doc["observation_type"] == "science"
    assert set(doc["timing"]) == {"shutter_close", "file_seen", "ingested"}
    state = await exposures.state(NAME)
    assert state is not None and state.status is IngestStatus.OK

    bad = "/raw/2024-05-10/CAM1/truncated.fits"
    previous = None
    statuses = []
    for _ in range(3):
        status = await exposures.record_ingest(
            ingest_result(bad, error="truncated FITS file"), seen_at=utcnow(), previous=previous,
            max_tries=3, same_content=True,
        )
        statuses.append(status)
        previous = await exposures.state(bad)
    assert statuses == [IngestStatus.FAILED, IngestStatus.FAILED, IngestStatus.QUARANTINED]
    assert previous is not None and previous.status is IngestStatus.QUARANTINED and previous.tries == 3


async def test_an_unknown_ingest_status_reads_back_as_none(database: Database) -> None:
    await database.exposures.collection.insert_one({"filename": NAME, "ingest": {"status": "odd"}})
    state = await database.exposures.state(NAME)
    assert state is not None and state.status is None


async def test_record_solve_pending_skipped_failed(database: Database) -> None:
    exposures = database.exposures
    await ingested(database)
    await exposures.record_solve(NAME, SolveRecord.pending())
    doc = await exposures.get(NAME)
    assert doc is not None and doc["wcs"] == {"status": "pending", "tries": 0}
    assert "solved" not in doc["timing"]

    await exposures.record_solve(NAME, SolveRecord.skipped("astrometry.net not installed"))
    doc = await exposures.get(NAME)
    assert doc is not None and doc["wcs"] == {"status": "skipped", "error": "astrometry.net not installed"}
    assert "solved" not in doc["timing"]  # no attempt was made

    before = utcnow()
    await exposures.record_solve(NAME, SolveRecord.failed(tries=2, error="no solution", solve_time_s=9.5))
    doc = await exposures.get(NAME)
    assert doc is not None
    assert doc["wcs"] == {"status": "failed", "tries": 2, "error": "no solution", "solve_time_s": 9.5}
    assert doc["timing"]["solved"] >= before
    assert "pointing" not in doc
    assert doc["metrics"]["fwhm_arcsec"] == 2.7 and doc["ingest"]["status"] == "ok"  # untouched


async def test_record_solve_solved_then_a_pending_reset_keeps_the_marker(database: Database) -> None:
    exposures = database.exposures
    await ingested(database)
    pointing = {"alt_deg": 60.0, "az_deg": 120.0, "moon_separation_deg": 80.0,
                "pointing_offset_arcsec": 55.0}
    record = SolveRecord.solved(solution(), tries=1, pointing=pointing, file_size=2880 * 3,
                                file_mtime_ns=999)
    await exposures.record_solve(NAME, record)
    doc = await exposures.get(NAME)
    assert doc is not None
    wcs = doc["wcs"]
    assert wcs["status"] == WcsStatus.SOLVED and wcs["tries"] == 1 and wcs["error"] is None
    assert wcs["header"] == {"CTYPE1": "RA---TAN-SIP", "CRVAL1": 150.0}
    assert wcs["marker"] == "abc123" and wcs["written_to_file"] is True
    assert list(wcs)[:4] == ["status", "tries", "error", "header"]
    assert doc["pointing"] == pointing
    assert (doc["file"]["size"], doc["file"]["mtime_ns"]) == (2880 * 3, 999)
    assert doc["file"]["dev"] is None  # the rest of the identity is the ingestor's
    state = await exposures.state(NAME)
    assert state is not None and state.wcs_marker == "abc123"

    await exposures.record_solve(NAME, SolveRecord.pending(keep_solution=True))
    doc = await exposures.get(NAME)
    assert doc is not None
    assert doc["wcs"]["status"] == "pending" and doc["wcs"]["tries"] == 0
    assert doc["wcs"]["marker"] == "abc123"  # the ingestor still knows its own write-back

    await exposures.record_solve(NAME, SolveRecord.pending())
    doc = await exposures.get(NAME)
    assert doc is not None and doc["wcs"] == {"status": "pending", "tries": 0}


def test_records_are_consistent() -> None:
    with pytest.raises(ValueError, match="solution"):
        SolveRecord(WcsStatus.SOLVED, tries=1)
    with pytest.raises(ValueError, match="solution"):
        SolveRecord(WcsStatus.FAILED, tries=1, solution=solution())
    with pytest.raises(ValueError, match="pending"):
        SolveRecord(WcsStatus.SKIPPED, keep_solution=True)
    with pytest.raises(ValueError):
        SolveRecord("solving")  # type: ignore[arg-type]
    # Plain strings become the contract's members, or are refused.
    qc = QCRecord("done", tries=1, grade="fair")  # type: ignore[arg-type]
    assert qc.status is QCStatus.DONE and qc.grade is Grade.FAIR
    with pytest.raises(ValueError):
        QCRecord(QCStatus.DONE, grade="A")  # type: ignore[arg-type]
    # Without a write-back the file identity is not touched.
    fields = solve_fields(SolveRecord.solved(solution(), tries=1, pointing={}), utcnow())
    assert not any(key.startswith("file") for key in fields)


async def test_record_qc_waiting_then_done_replaces_the_whole_object(database: Database) -> None:
    exposures = database.exposures
    await ingested(database)
    await exposures.record_qc(NAME, QCRecord.waiting("bias (none within 14 days)"))
    doc = await exposures.get(NAME)
    assert doc is not None
    qc = doc["qc"]
    assert qc["status"] == QCStatus.WAITING_CALIBS and qc["error"] == "bias (none within 14 days)"
    assert qc["tries"] == 0 and qc["calibs"] is None and isinstance(qc["date_checked"], dt.datetime)
    assert "qc_done" not in doc["timing"]

    calibs = {"bias": "/calib/b.fits", "dark": "/calib/d.fits", "flat": "/calib/f.fits"}
    record = QCRecord(
        QCStatus.DONE, tries=1, calibs=calibs,
        measurements={"fwhm_arcsec": 2.9, "zeropoint": 21.8, "status": "overridden"},
        failed={"photometry": "no stars"}, duration_s=3.5, wcs_status=WcsStatus.SOLVED,
        grade=Grade.FAIR, flags=("few_stars",), calibrated_filename=None, filter="g_band",
        refcat=None, config_hash="cfg", software_version="0.1.0",
    )
    before = utcnow()
    await exposures.record_qc(NAME, record)
    doc = await exposures.get(NAME)
    assert doc is not None
    qc = doc["qc"]
    assert "date_checked" not in qc  # one $set of the whole object: two runs never mix
    assert qc["status"] == "done" and qc["grade"] == "fair" and type(qc["grade"]) is str
    assert qc["fwhm_arcsec"] == 2.9 and qc["zeropoint"] == 21.8
    assert qc["calibs"] == calibs and qc["flags"] == ["few_stars"] and qc["wcs_status"] == "solved"
    assert qc["failed"] == {"photometry": "no stars"} and qc["tries"] == 1
    assert qc["date"] == doc["timing"]["qc_done"] and qc["date"] >= before
    assert "wcs" not in doc and doc["ingest"]["status"] == "ok"  # other stages' are untouched


def test_each_writer_sets_only_its_stage_fields() -> None:
    now = utcnow()
    records = [
        SolveRecord.pending(), SolveRecord.pending(keep_solution=True), SolveRecord.skipped("off"),
        SolveRecord.failed(tries=1, error="x", solve_time_s=None),
        SolveRecord.solved(solution(), tries=1, pointing={}, file_size=1, file_mtime_ns=2),
    ]
    solve = STAGE_DOCUMENTS["solve"]
    allowed = {*solve.fields, f"timing.{solve.timing}", "file.size", "file.mtime_ns"}
    for record in records:
        roots = {key if key.startswith(("timing.", "file.")) else key.split(".")[0]
                 for key in solve_fields(record, now)}
        assert roots <= allowed, record
    qc = STAGE_DOCUMENTS["qc"]
    for qc_record in (QCRecord.waiting("x"), QCRecord(QCStatus.FAILED, tries=2, error="timeout")):
        assert set(qc_fields(qc_record, now)) <= {*qc.fields, f"timing.{qc.timing}"}


def test_the_schema_names_the_writer_of_each_sub_document() -> None:
    schema = (ROOT / "docs" / "schema.md").read_text()
    for writer, stage in (("record_ingest", "ingest"), ("record_solve", "solve"), ("record_qc", "qc")):
        assert f"ExposureCollection.{writer}" in schema, writer
        for field in STAGE_DOCUMENTS[stage].fields:
            assert f"### `{field}`" in schema, field
        assert f"timing.{STAGE_DOCUMENTS[stage].timing}" in schema
