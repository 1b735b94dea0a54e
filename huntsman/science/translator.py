"""Translation of Huntsman raw headers into standard metadata (astro_metadata_translator)."""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any

import astropy.units as u
from astro_metadata_translator import FitsTranslator, ObservationInfo
from astro_metadata_translator.translator import cache_translation
from astropy.coordinates import EarthLocation, SkyCoord
from astropy.time import Time

from huntsman.models import ObservationType
from huntsman.science.site import SITE

__all__ = [
    "HuntsmanTranslator",
    "TranslationError",
    "classify_observation_type",
    "clean_header",
    "translate",
]


# The control software writes bias frames with EXPTIME = 1e-32; anything this short is zero.
_ZERO_EXPOSURE_S = 1e-6
_UTC_SUFFIX = re.compile(r"\s*\(UTC\)\s*$", re.IGNORECASE)


class TranslationError(ValueError):
    """A header that cannot be turned into a Huntsman observation."""


def clean_header(header: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of a header without blank values: the control software writes ``''`` for missing."""
    cleaned: dict[str, Any] = {}
    for key, value in header.items():
        if key in ("", "COMMENT", "HISTORY"):
            continue
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                continue
        cleaned[key] = value
    return cleaned


def classify_observation_type(imagetyp: Any, field: Any) -> ObservationType:
    """Huntsman observation type (bias, dark, flat, science) from ``IMAGETYP`` and ``FIELD``."""
    if not isinstance(imagetyp, str) or not imagetyp.strip():
        raise TranslationError("IMAGETYP is missing, so the observation type is unknown")
    kind = imagetyp.strip().lower()
    name = field.strip() if isinstance(field, str) else ""
    if kind == "light frame":
        return ObservationType.FLAT if name.lower().startswith("flat") else ObservationType.SCIENCE
    if kind == "dark frame":
        return ObservationType.BIAS if name.lower() == "bias" else ObservationType.DARK
    raise TranslationError(f"unknown IMAGETYP {imagetyp!r} (expected 'Light Frame' or 'Dark Frame')")


def _parse_float(header: Mapping[str, Any], key: str) -> float | None:
    value = header.get(key)
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class HuntsmanTranslator(FitsTranslator):
    """Metadata translator for raw frames written by the Huntsman control software.

    Expects a header already passed through :func:`clean_header`, so blank values are absent.
    """

    name = "Huntsman"
    supported_instrument = "Huntsman"

    _const_map = {  # noqa: RUF012 - the base class declares it a plain class attribute
        "telescope": "Huntsman",
        "instrument": "Huntsman",
        "boresight_rotation_coord": "sky",
        "boresight_rotation_angle": None,
        "has_simulated_content": False,
    }

    _trivial_map: dict[str, str | list[str] | tuple[Any, ...]] = {  # noqa: RUF012
        "detector_name": "CAM-ID",
        "detector_serial": "INSTRUME",
        "object": ("FIELD", {"default": None}),
        "observation_id": ("IMAGEID", {"default": None}),
        "exposure_group": ("SEQID", {"default": None}),
        "temperature": ("CCD-TEMP", {"unit": u.deg_C, "default": None}),
        "focus_z": ("FOC-POS", {"default": None}),
    }

    @classmethod
    def can_translate(cls, header: Mapping[str, Any], filename: str | None = None) -> bool:
        return "CAM-ID" in header and "IMAGETYP" in header

    @cache_translation
    def to_observation_type(self) -> str:
        return classify_observation_type(self._header.get("IMAGETYP"), self._header.get("FIELD"))

    @cache_translation
    def to_datetime_begin(self) -> Time:
        raw = self._header.get("DATE-OBS")
        if not isinstance(raw, str) or not raw.strip():
            raise TranslationError("DATE-OBS is missing")
        text = _UTC_SUFFIX.sub("", raw.strip())
        try:
            return Time(text, format="isot", scale="utc")
        except ValueError as exc:
            raise TranslationError(f"DATE-OBS {raw!r} is not an ISO date-time") from exc

    @cache_translation
    def to_exposure_time(self) -> u.Quantity:
        value = _parse_float(self._header, "EXPTIME")
        if value is None:
            raise TranslationError("EXPTIME is missing or not a number")
        return (0.0 if abs(value) < _ZERO_EXPOSURE_S else value) * u.s

    @cache_translation
    def to_datetime_end(self) -> Time:
        return self.to_datetime_begin() + self.to_exposure_time()

    # The base class declares str; a header without a usable FILTER has no filter, and
    # ObservationInfo stores None for it.
    @cache_translation
    def to_physical_filter(self) -> str | None:  # type: ignore[override]
        value = self._header.get("FILTER")
        if not isinstance(value, str) or value.upper() in ("UNKNOWN", "NONE", "BLANK"):
            return None
        return value

    @cache_translation
    def to_location(self) -> EarthLocation:
        lat = _parse_float(self._header, "LAT-OBS")
        lon = _parse_float(self._header, "LONG-OBS")
        height = _parse_float(self._header, "ELEV-OBS")
        if lat is None or lon is None:
            return SITE  # Siding Spring, when the header carries no site keywords
        return EarthLocation.from_geodetic(lon=lon * u.deg, lat=lat * u.deg, height=(height or 0) * u.m)

    @cache_translation
    def to_tracking_radec(self) -> SkyCoord | None:
        ra = _parse_float(self._header, "RA-MNT")
        dec = _parse_float(self._header, "DEC-MNT")
        if ra is None or dec is None:
            return None
        return SkyCoord(ra * u.deg, dec * u.deg, frame="icrs")

    @cache_translation
    def to_boresight_airmass(self) -> float | None:
        return _parse_float(self._header, "AIRMASS")

    @cache_translation
    def to_altaz_begin(self) -> None:
        # Computed by the caller from tracking_radec when needed; the header has no alt/az.
        return None

    @cache_translation
    def to_can_see_sky(self) -> bool:
        return self.to_observation_type() in (ObservationType.SCIENCE, ObservationType.FLAT)

    @cache_translation
    def to_detector_num(self) -> int:
        # Cameras are numbered by the configured camera list, applied after translation.
        return 0

    @cache_translation
    def to_detector_group(self) -> str | None:
        return None

    @cache_translation
    def to_exposure_id(self) -> int:
        return int(self.to_datetime_begin().strftime("%Y%m%d%H%M%S"))

    @cache_translation
    def to_visit_id(self) -> int:
        return self.to_exposure_id()

    @cache_translation
    def to_detector_exposure_id(self) -> int:
        return self.to_exposure_id()

    # The base class declares str; Huntsman headers carry no programme (ObservationInfo: None).
    @cache_translation
    def to_science_program(self) -> str | None:  # type: ignore[override]
        return None

    @cache_translation
    def to_dark_time(self) -> u.Quantity:
        return self.to_exposure_time()

    @cache_translation
    def to_pressure(self) -> None:
        return None

    # The base class declares float; Huntsman headers carry no humidity (ObservationInfo: None).
    @cache_translation
    def to_relative_humidity(self) -> None:  # type: ignore[override]
        return None


_REQUIRED = {"observation_type", "datetime_begin", "exposure_time", "detector_name"}
_SUBSET = _REQUIRED | {
    "physical_filter",
    "tracking_radec",
    "boresight_airmass",
    "object",
    "detector_serial",
    "temperature",
    "observation_id",
    "exposure_group",
    "location",
    "datetime_end",
}


def translate(header: Mapping[str, Any], filename: str | None = None) -> ObservationInfo:
    """Standard metadata of a Huntsman raw header; :class:`TranslationError` if it is unusable.

    Blank (``''``) values are treated as absent before translation.
    """
    cleaned: MutableMapping[str, Any] = clean_header(header)
    if "CAM-ID" not in cleaned:
        raise TranslationError("CAM-ID is missing, so the camera is unknown")
    # Check the rules first so the error names the real problem, not a translator wrapper.
    classify_observation_type(cleaned.get("IMAGETYP"), cleaned.get("FIELD"))
    try:
        return ObservationInfo(
            cleaned,
            filename=filename,
            translator_class=HuntsmanTranslator,
            pedantic=False,
            required=_REQUIRED,
            subset=_SUBSET,
            quiet=True,
        )
    except TranslationError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, TranslationError) else exc
        raise TranslationError(str(cause)) from exc
