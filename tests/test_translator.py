"""Header translation of the real Huntsman sample frames, and the rules of DESIGN.md."""

from __future__ import annotations

import datetime as dt

import pytest
from astropy.io import fits

from huntsman.models import IngestParams
from huntsman.science.translator import TranslationError, classify_observation_type, translate
from huntsman.workers.ingest import standard_fields
from tests.conftest import RAW_SAMPLES

UTC = dt.UTC
# name: observation_type, camera, filter, exptime, date_obs, ra, dec, airmass, field
EXPECTED = {
    "bias_0": ("bias", "TESTCAM03", None, 0.0, dt.datetime(2021, 1, 7, 1, 32, 35, 403000, UTC),
               325.9875093943629, -39.32512532896772, 1.063990736486142, "Bias"),
    "dark_0": ("dark", "TESTCAM03", None, 300.0, dt.datetime(2021, 1, 7, 1, 31, 35, 403000, UTC),
               325.9875093943629, -39.32512532896772, 1.063990736486142, "Dark"),
    "flat_0": ("flat", "TESTCAM03", "g_band", 300.0, dt.datetime(2021, 1, 12, 9, 24, 53, 382000, UTC),
               64.6853303130116, -39.28632635798825, 1.064189067514197, "FlatDither00"),
    "science_0": ("science", "TESTCAM03", "g_band", 300.0,
                  dt.datetime(2021, 1, 18, 11, 26, 32, 228000, UTC),
                  64.99999999999999, -54.93805555555555, 1.109148007955831, "DoradoGroup-p0p0"),
    "sky_offset_0": ("science", "TESTCAM03", "g_band", 300.0,
                     dt.datetime(2021, 1, 18, 11, 36, 32, 228000, UTC),
                     64.99999999999999, -54.93805555555555, 1.109148007955831, "DoradoGroup-p0p0_sky"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_sample_fields(name: str) -> None:
    path = RAW_SAMPLES / f"{name}.fits"
    params = IngestParams(camera_numbers=(("TESTCAM03", 3),))
    fields = standard_fields(fits.getheader(path), str(path), params)
    kind, camera, flt, exptime, date_obs, ra, dec, airmass, field = EXPECTED[name]
    assert fields["observation_type"] == kind
    assert fields["camera"] == camera
    assert fields["detector_num"] == 3 and fields["camera_known"] is True
    assert fields["camera_serial"] == "371d420013090900"
    assert fields["physical_filter"] == flt
    assert fields["exposure_time"] == pytest.approx(exptime)
    assert abs((fields["date_obs"] - date_obs).total_seconds()) < 1e-3
    assert fields["date_obs"].tzinfo is not None
    assert fields["ra"] == pytest.approx(ra, abs=1e-9)
    assert fields["dec"] == pytest.approx(dec, abs=1e-9)
    assert fields["airmass"] == pytest.approx(airmass)
    assert fields["field"] == field
    assert fields["calib_date"] == date_obs.date().isoformat()
    expected_close = date_obs + dt.timedelta(seconds=exptime)
    assert abs((fields["shutter_close"] - expected_close).total_seconds()) < 1e-3


@pytest.mark.parametrize(
    ("imagetyp", "field", "expected"),
    [
        ("Light Frame", "FlatDither03", "flat"),
        ("Light Frame", "flat", "flat"),
        ("Light Frame", "M42", "science"),
        ("Light Frame", "M42_sky", "science"),
        ("Dark Frame", "Bias", "bias"),
        ("Dark Frame", "Dark", "dark"),
        ("Dark Frame", "", "dark"),
    ],
)
def test_observation_type_rules(imagetyp: str, field: str, expected: str) -> None:
    assert classify_observation_type(imagetyp, field) == expected


@pytest.mark.parametrize("imagetyp", ["", None, "Bias Frame", "Tri-colour"])
def test_unknown_imagetyp_is_an_error(imagetyp: str | None) -> None:
    with pytest.raises(TranslationError):
        classify_observation_type(imagetyp, "x")


def _science_header() -> fits.Header:
    return fits.getheader(RAW_SAMPLES / "science_0.fits")


def test_blank_values_are_absent() -> None:
    header = _science_header()
    for key in ("RA-MNT", "DEC-MNT", "AIRMASS", "FILTER", "FIELD"):
        header[key] = ""
    info = translate(header)
    assert info.tracking_radec is None
    assert info.boresight_airmass is None
    assert info.physical_filter is None
    assert info.object is None


def test_date_obs_with_utc_suffix() -> None:
    header = _science_header()
    header["DATE-OBS"] = "2021-01-18T11:26:32.228(UTC)"
    assert translate(header).datetime_begin.isot == "2021-01-18T11:26:32.228"
    header["DATE-OBS"] = "2021-01-18T11:26:32.228 (UTC)"
    assert translate(header).datetime_begin.isot == "2021-01-18T11:26:32.228"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("DATE-OBS", "not a date", "DATE-OBS"),
        ("DATE-OBS", "", "DATE-OBS is missing"),
        ("EXPTIME", "", "EXPTIME"),
        ("CAM-ID", "", "CAM-ID is missing"),
    ],
)
def test_unusable_headers(key: str, value: str, message: str) -> None:
    header = _science_header()
    header[key] = value
    with pytest.raises(TranslationError, match=message):
        translate(header)


def test_unknown_camera_is_still_translated() -> None:
    header = _science_header()
    header["CAM-ID"] = "NEWCAM99"
    fields = standard_fields(header, "x.fits", IngestParams(camera_numbers=(("TESTCAM03", 3),)))
    assert fields["camera"] == "NEWCAM99"
    assert fields["camera_known"] is False and fields["detector_num"] is None
