"""Typed, frozen, validated configuration.

Layers, later ones winning: the packaged defaults in this module, ``etc/huntsman.yaml`` (or the
file named by ``--config`` / ``HUNTSMAN_CONFIG``), an optional override file, then environment
variables: ``HUNTSMAN_MONGODB_URI``, ``HUNTSMAN_RAW_DIR``, ``HUNTSMAN_VAR_DIR`` and, for any
field, ``HUNTSMAN_<SECTION>__<FIELD>`` (for example ``HUNTSMAN_INGEST__MAX_TRIES=5``), nested
sections joined the same way (``HUNTSMAN_QC__REFCAT__PATH``, ``HUNTSMAN_CALIB__FRAMES__BIAS__MIN``).

Sections shaped like the science take the science records themselves: ``detector`` is
:class:`~huntsman.models.DetectorConstants`, ``qc.refcat`` a :class:`~huntsman.models.CatalogueSpec`
(plus the file's path), ``qc.grade`` a :class:`~huntsman.models.GradeThresholds`, ``calib.stack`` a
:class:`~huntsman.models.MasterParams` (pydantic
dataclasses, light on imports: loading the config pulls in no astropy), so no adapter copies
fields.  The flat keys of earlier versions
(``qc.refcat_path``, ``qc.grade_min_stars``, ``calib.min_frames_bias``, ``calib.sigma``,
``calib.hot_pixel_sigma``, ...) are still read with
a :class:`ConfigDeprecationWarning` naming the new key, except ``qc.refcat_mag_min``/``_max``,
refused with a one-line error naming ``qc.refcat.mag_range``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass

from huntsman.models import (
    CatalogueSpec,
    DetectorConstants,
    GradeThresholds,
    MasterParams,
    ObservationType,
)

__all__ = [
    "Config",
    "ConfigDeprecationWarning",
    "ConfigError",
    "load_config",
    "redact_data",
    "redact_text",
    "redact_uri",
]

ENV_PREFIX = "HUNTSMAN_"
# After SIGKILL the embedded server is reaped at once; this bounds that wait (in the budget).
EMBEDDED_KILL_WAIT_S = 0.5
_ENV_ALIASES = {
    "HUNTSMAN_MONGODB_URI": ("database", "uri"),
    "HUNTSMAN_RAW_DIR": ("paths", "raw_dir"),
    "HUNTSMAN_VAR_DIR": ("paths", "var_dir"),
    "HUNTSMAN_CALIB_DIR": ("paths", "calib_dir"),
    "HUNTSMAN_LOG_LEVEL": ("logging", "level"),
}


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line meant for the operator."""


class ConfigDeprecationWarning(FutureWarning):
    """An old configuration key, still read: the message (one line) names its new key.

    A ``FutureWarning`` because Python shows those to the operator by default (a plain
    ``DeprecationWarning`` from library code is hidden).
    """


# Old flat keys of a section -> their place in the nested shape (read, with a warning).
_RENAMED: dict[str, dict[str, tuple[str, ...]]] = {
    "qc": {
        **{f"refcat_{name}": ("refcat", name) for name in (
            "path", "format", "ra_column", "dec_column", "mag_columns", "err_columns",
            "stellarity_column", "min_stellarity", "flags_column", "flags_allowed",
            "min_separation_arcsec",
        )},
        **{f"grade_{name}": ("grade", name) for name in (
            "fwhm_arcsec_good", "fwhm_arcsec_bad", "zeropoint_drop_mag", "sky_mag_min", "min_stars",
        )},
    },
    "calib": {
        **{f"{bound}_frames_{kind}": ("frames", kind, bound)
           for kind in ("bias", "dark", "flat") for bound in ("min", "max")},
        **{old: ("stack", new) for old, new in (
            ("sigma", "sigma"), ("maxiters", "maxiters"), ("memory_limit_mb", "memory_limit_mb"),
            ("hot_pixel_sigma", "hot_sigma"), ("dead_pixel_fraction", "dead_fraction"),
        )},
    },
}
# Old keys whose value changed shape (two numbers became one pair): read when both are given
# (:func:`_migrate_mag_pair`), refused alone, naming the new key.
_REFUSED: dict[str, dict[str, tuple[tuple[str, ...], str]]] = {
    "qc": {
        "refcat_mag_min": (("refcat", "mag_range"), "[min, max]"),
        "refcat_mag_max": (("refcat", "mag_range"), "[min, max]"),
    },
}

KeyNamer = Callable[[tuple[str, ...]], str]


def _dotted(keys: tuple[str, ...]) -> str:
    return ".".join(keys)


def _env_name(keys: tuple[str, ...]) -> str:
    return ENV_PREFIX + "__".join(keys).upper()


def migrate_section(
    section: str, data: Any, name: KeyNamer = _dotted, where: str = "<config>"
) -> Any:
    """``data`` of a config section with its old flat keys moved to their nested places.

    Each moved key gives one :class:`ConfigDeprecationWarning` naming the new key (``name``
    spells keys as the source does: dotted, or as environment variables; ``where`` is the
    file); a refused key, or an old key set beside its new one, is a ``ValueError`` (one line).
    Anything but a mapping is returned unchanged, for validation to judge.
    """
    if not isinstance(data, Mapping):
        return data
    data = _migrate_mag_pair(section, data, name, where)
    refused = [key for key in _REFUSED.get(section, {}) if key in data]
    if refused:
        new, shape = _REFUSED[section][refused[0]]
        raise ValueError(
            f"{name((section, refused[0]))} is no longer read: set {name((section, *new))} to {shape}"
        )
    renamed = [key for key in _RENAMED.get(section, {}) if key in data]
    if not renamed:
        return data
    out = dict(data)  # each level on the way is copied below: the input is never changed
    for old in renamed:
        new = _RENAMED[section][old]
        clash = ValueError(
            f"{name((section, old))} and {name((section, *new))} are both set: keep only "
            f"{name((section, *new))}"
        )
        node = out
        for key in new[:-1]:
            inner = node.get(key, {})
            if not isinstance(inner, Mapping):
                raise clash  # the whole sub-section is given (as a record): the old key has no place
            node[key] = dict(inner)
            node = node[key]
        if new[-1] in node:
            raise clash
        node[new[-1]] = out.pop(old)
        message = f"{name((section, old))} is deprecated: use {name((section, *new))}"
        if name is _env_name:
            message += f" ({_dotted((section, *new))})"
        warnings.warn_explicit(message, ConfigDeprecationWarning, where, 0, module=__name__)
    return out


def _migrate_mag_pair(section: str, data: Mapping[str, Any], name: KeyNamer, where: str) -> Mapping[str, Any]:
    """``qc.refcat_mag_min``/``_max`` given together (both numbers, or both null as the
    previous reference file has them) become ``qc.refcat.mag_range`` with one warning; one of
    them alone stays for :data:`_REFUSED` to refuse."""
    pair = ("refcat_mag_min", "refcat_mag_max")
    if section != "qc" or not all(key in data for key in pair):
        return data
    low, high = data[pair[0]], data[pair[1]]
    if (low is None) != (high is None):
        return data
    out = {k: v for k, v in data.items() if k not in pair}
    refcat = out.get("refcat", {})
    new = name((section, "refcat", "mag_range"))
    if not isinstance(refcat, Mapping) or "mag_range" in refcat:
        raise ValueError(f"{name((section, pair[0]))}/_max and {new} are both set: keep only {new}")
    out["refcat"] = {**refcat, "mag_range": None if low is None else [low, high]}
    message = f"{name((section, pair[0]))} and {name((section, pair[1]))} are deprecated: use {new}"
    warnings.warn_explicit(message, ConfigDeprecationWarning, where, 0, module=__name__)
    return out


def _migrate(data: dict[str, Any], name: KeyNamer, where: str) -> dict[str, Any]:
    """One configuration layer with its old keys moved (each layer on its own, so that an old
    key of a later layer still wins over the new key of an earlier one)."""
    try:
        return {
            section: migrate_section(section, value, name, where) if section in _RENAMED else value
            for section, value in data.items()
        }
    except ValueError as exc:
        prefix = "" if name is _env_name else f"{where}: "
        raise ConfigError(f"invalid configuration: {prefix}{exc}") from None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    """Directories; any not given explicitly lives under ``var_dir``."""

    var_dir: Path = Path("var")
    raw_dir: Path = Path("var/raw")
    calib_dir: Path = Path("var/calib")
    calibrated_dir: Path = Path("var/calibrated")
    astrometry_dir: Path = Path("var/astrometry")
    reports_dir: Path = Path("var/reports")


# Sub-directories of var_dir used for paths that are not configured explicitly.
_VAR_SUBDIRS = {
    "raw_dir": "raw",
    "calib_dir": "calib",
    "calibrated_dir": "calibrated",
    "astrometry_dir": "astrometry",
    "reports_dir": "reports",
}


class EmbeddedConfig(_Section):
    storage_dir: Path = Path("var/db")
    port: int = Field(27117, ge=0, le=65535, description="0 picks a free port")
    start_timeout_s: float = Field(30.0, gt=0)
    stop_timeout_s: float = Field(2.5, gt=0, description="SIGTERM, then SIGKILL after this")
    max_restarts: int = Field(
        5, ge=0, description="restarts of a dead server, without a stable one between, before exit"
    )
    restart_backoff_s: float = Field(0.5, ge=0, description="first restart delay, doubled each try")
    unhealthy_restart_s: float = Field(
        20.0, ge=0, description="a running server failing health checks this long is restarted; 0: never"
    )


class DatabaseConfig(_Section):
    uri: str = "embedded"
    name: str = "huntsman"
    server_selection_timeout_s: float = Field(5.0, gt=0)
    monitor_interval_s: float = Field(1.0, gt=0, description="database health check period")
    max_outage_s: float = Field(
        120.0, gt=0, description="unreachable this long: the service exits non-zero"
    )
    write_retry_s: float = Field(
        60.0, ge=0, description="an ingestion result's write is retried this long while away"
    )
    embedded: EmbeddedConfig = EmbeddedConfig()

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, value: str) -> str:
        if value != "embedded" and not re.match(r"^mongodb(\+srv)?://", value):
            raise ValueError("must be 'embedded' or a mongodb:// or mongodb+srv:// URI")
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,63}", value):
            raise ValueError("database name may use letters, digits, '_' and '-' only")
        return value


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"


# Address space of an idle worker with the science stack imported is ~0.3 GB; a master build
# uses calib.stack.memory_limit_mb on top of it.
_WORKER_BASELINE_MB = 512


class PoolConfig(_Section):
    """Worker processes: one pool for ingestion, one for solving, calibration and QC."""

    max_workers: int = Field(2, ge=1, le=64)
    background_workers: int = Field(1, ge=1, le=64)
    max_in_flight: int = Field(4, ge=1, le=1024)
    context: Literal["spawn", "forkserver"] = "forkserver"
    job_timeout_s: float = Field(120.0, gt=0)
    worker_memory_mb: int = Field(
        4096, ge=0, description="address-space cap of each worker (RLIMIT_AS); 0 = no cap"
    )


class WatcherConfig(_Section):
    rescan_interval_s: float = Field(300.0, gt=0, description="periodic safety rescan")
    settle_s: float = Field(
        2.0, ge=0, description="a scanned file must be unchanged this long before ingestion"
    )
    queue_size: int = Field(10000, ge=1)
    extensions: tuple[str, ...] = (".fits", ".fit", ".fts", ".fits.fz")


class AstrometryConfig(_Section):
    """Plate solving of science frames with astrometry.net's solve-field."""

    enabled: bool = True
    index_dirs: tuple[Path, ...] = (Path("/usr/share/astrometry"),)
    scale_tolerance: float = Field(0.10, gt=0, lt=1)
    cpu_limit_s: float = Field(30.0, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    search_radius_deg: float = Field(3.0, gt=0, le=180)
    max_sources: int = Field(60, ge=10)
    blind_fallback: bool = True
    max_tries: int = Field(2, ge=1, le=10)
    write_wcs: bool = True
    concurrency: int = Field(1, ge=1, le=16)
    queue_size: int = Field(500, ge=1)
    sweep_interval_s: float = Field(120.0, gt=0)


class IngestConfig(_Section):
    max_tries: int = Field(3, ge=1, le=100)
    queue_size: int = Field(2000, ge=1)
    metrics: bool = True
    max_pixels: int = Field(
        80_725_248, ge=0, description="larger frames are refused unread; 0 = no limit"
    )


# The detector section is the science record itself: pydantic validates it from the file.
DetectorConfig = DetectorConstants


class FrameLimits(_Section):
    """How many raw frames make one master: fewer usable ones, no master; more, the nearest in time."""

    min: int = Field(5, ge=1, description="fewer usable frames: no master, reason recorded")
    max: int = Field(50, ge=1, description="more: the nearest in time to the date are used")

    @model_validator(mode="after")
    def _check_range(self) -> FrameLimits:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) exceeds max ({self.max})")
        return self


class FramesConfig(_Section):
    """``calib.frames.<type>``: the frame limits of each kind of master."""

    bias: FrameLimits = FrameLimits()
    dark: FrameLimits = FrameLimits()
    flat: FrameLimits = FrameLimits()

    def of(self, calib_type: str) -> FrameLimits:
        """The limits of masters of ``calib_type`` (bias, dark or flat)."""
        by_type = {ObservationType.BIAS: self.bias, ObservationType.DARK: self.dark,
                   ObservationType.FLAT: self.flat}
        return by_type[ObservationType(calib_type)]


class CalibConfig(_Section):
    """Automatic master bias/dark/flat building (see docs/calibs.md)."""

    enabled: bool = True
    interval_s: float = Field(600.0, gt=0, description="full pass over every date")
    debounce_s: float = Field(30.0, ge=0, description="quiet time after new calibration frames")
    window_days: int = Field(1, ge=0, description="neighbouring days used when a date has too few")
    max_age_days: float = Field(14.0, ge=0, description="validity of a master either side of its date")
    temperature_tolerance_c: float = Field(2.0, gt=0)
    frames: FramesConfig = FramesConfig()
    bias_max_level_offset_adu: float = Field(10.0, gt=0)
    max_sources_bias_dark: int = Field(3, ge=0)
    flat_min_illumination_fraction: float = Field(0.1, ge=0, le=1)
    flat_max_illumination_fraction: float = Field(0.8, ge=0, le=1)
    flat_max_sources: int = Field(500, ge=0)
    flat_max_elongation: float = Field(1.5, ge=1)
    stack: MasterParams = MasterParams()  # the science record itself: clipping, memory, masks
    job_timeout_s: float = Field(900.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        return migrate_section("calib", data)

    @model_validator(mode="after")
    def _check_ranges(self) -> CalibConfig:
        if self.flat_min_illumination_fraction >= self.flat_max_illumination_fraction:
            raise ValueError("flat_min_illumination_fraction must be below flat_max_illumination_fraction")
        return self


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class RefcatConfig(CatalogueSpec):
    """``qc.refcat``: the reference catalogue file and its :class:`CatalogueSpec` (columns, cuts)."""

    path: Annotated[Path | None, Field(description="local catalogue file; None: no zeropoint")] = None


class QCConfig(_Section):
    """Calibrated science frames and their image-quality numbers (see docs/quality.md)."""

    enabled: bool = True
    max_tries: int = Field(3, ge=1, le=100, description="failed frames are retried up to this")
    queue_size: int = Field(1000, ge=1)
    concurrency: int = Field(2, ge=1, le=64)
    sweep_interval_s: float = Field(300.0, gt=0)
    job_timeout_s: float = Field(180.0, gt=0)
    write_calibrated: bool = True
    min_flat_value: float = Field(0.2, ge=0, description="flat pixels below this are masked")
    psf_max_stars: int = Field(150, ge=5)
    refcat: RefcatConfig = RefcatConfig()
    grade: GradeThresholds = GradeThresholds()
    nominal_zeropoint: dict[str, float] = Field(
        default_factory=dict, description="filter or 'CAM-ID/filter' -> nominal zeropoint (mag)"
    )

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        return migrate_section("qc", data)

    @field_validator("grade")
    @classmethod
    def _grade_of_the_section(cls, value: GradeThresholds) -> GradeThresholds:
        if value.nominal_zeropoint is not None:
            raise ValueError("the nominal zeropoint is per filter: set qc.nominal_zeropoint instead")
        return value

    @field_serializer("grade")
    def _grade_limits(self, value: GradeThresholds) -> dict[str, Any]:
        # The frame's nominal zeropoint is not a setting of this section (qc.nominal_zeropoint).
        fields = dataclasses.fields(value)
        return {f.name: getattr(value, f.name) for f in fields if f.name != "nominal_zeropoint"}


class CameraConfig(_Section):
    cam_id: str
    detector_num: int = Field(ge=0)
    serial: str | None = None


class ShutdownConfig(_Section):
    drain_timeout_s: float = Field(3.0, ge=0)
    cancel_timeout_s: float = Field(0.5, gt=0, description="per stage, to stop cancelled tasks")
    pool_timeout_s: float = Field(2.0, ge=0)
    database_timeout_s: float = Field(0.5, ge=0, description="the heartbeat's final write")
    close_timeout_s: float = Field(0.5, ge=0, description="closing the database client")
    stopwaitsecs: int = Field(15, ge=1, description="supervisord's stopwaitsecs")

    def budget_s(self, embedded_stop_timeout_s: float = 0.0) -> float:
        """Worst-case shutdown time: every stage's deadline, the embedded server's stop included.

        Stages: drain, two cancellations, pool, final heartbeat, client close, then (embedded
        database) SIGTERM wait plus the SIGKILL reap.  Holds with the database hung or dead.
        """
        embedded = embedded_stop_timeout_s + EMBEDDED_KILL_WAIT_S if embedded_stop_timeout_s else 0.0
        return (
            self.drain_timeout_s
            + 2 * self.cancel_timeout_s
            + self.pool_timeout_s
            + self.database_timeout_s
            + self.close_timeout_s
            + embedded
        )


class ReportConfig(_Section):
    """The night report (``huntsman report``), optionally written after each night."""

    auto: bool = Field(True, description="write the previous night's report once it is over")
    hour_utc: int = Field(
        22, ge=0, le=23, description="UTC hour after which the UTC day's night is over"
    )
    worst_n: int = Field(10, ge=1, le=1000, description="worst frames listed")


class HttpConfig(_Section):
    """Built-in status page, /healthz and /metrics (off by default)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    allow_remote: bool = Field(False, description="required to bind a non-loopback address")
    port: int = Field(8765, ge=0, le=65535, description="0 picks a free port")
    db_timeout_s: float = Field(1.0, gt=0, description="/healthz: database ping deadline")
    pool_timeout_s: float = Field(2.0, gt=0, description="/healthz: trivial pool job deadline")
    max_loop_lag_s: float = Field(1.0, gt=0, description="/healthz: event-loop lag limit")
    max_concurrent_requests: int = Field(
        8, ge=1, le=10000, description="requests handled at once; more are answered 503 at once"
    )
    query_timeout_s: float = Field(2.0, gt=0, description="deadline of each database query of a page")
    cache_s: float = Field(2.0, ge=0, description="the page and /metrics are rendered at most this often")

    @model_validator(mode="after")
    def _check_bind(self) -> HttpConfig:
        if not self.allow_remote and not self.is_loopback():
            raise ValueError(
                f"host {self.host!r} is not a loopback address; set http.allow_remote: true "
                "to serve the status page to the network"
            )
        return self

    def is_loopback(self) -> bool:
        """Whether ``host`` only accepts local connections (no name resolution here)."""
        if self.host.lower() in ("localhost", "localhost.", "ip6-localhost"):
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False  # a name other than localhost, or "" (every interface)


class DiskConfig(_Section):
    """Free-space watch of the directories the service writes (var, database, calib, calibrated)."""

    interval_s: float = Field(5.0, gt=0, description="how often free space is measured")
    min_free_mb: float = Field(256.0, ge=0, description="less free space than this is 'low'")
    min_free_fraction: float = Field(
        0.0, ge=0, lt=1, description="... or less than this fraction of the filesystem"
    )


class ServiceConfig(_Section):
    heartbeat_interval_s: float = Field(5.0, gt=0)
    heartbeat_stale_s: float = Field(30.0, gt=0)


class Config(_Section):
    paths: PathsConfig = PathsConfig()
    database: DatabaseConfig = DatabaseConfig()
    logging: LoggingConfig = LoggingConfig()
    pool: PoolConfig = PoolConfig()
    watcher: WatcherConfig = WatcherConfig()
    astrometry: AstrometryConfig = AstrometryConfig()
    ingest: IngestConfig = IngestConfig()
    detector: DetectorConfig = DetectorConfig()
    calib: CalibConfig = CalibConfig()
    qc: QCConfig = QCConfig()
    cameras: tuple[CameraConfig, ...] = ()
    shutdown: ShutdownConfig = ShutdownConfig()
    service: ServiceConfig = ServiceConfig()
    report: ReportConfig = ReportConfig()
    http: HttpConfig = HttpConfig()
    disk: DiskConfig = DiskConfig()

    @field_validator("cameras")
    @classmethod
    def _unique_cameras(cls, value: tuple[CameraConfig, ...]) -> tuple[CameraConfig, ...]:
        ids = [c.cam_id for c in value]
        if len(set(ids)) != len(ids):
            raise ValueError("camera cam_id values must be unique")
        return value

    @model_validator(mode="after")
    def _fits_stopwaitsecs(self) -> Config:
        total = self.shutdown_budget_s()
        if total >= self.shutdown.stopwaitsecs:
            raise ValueError(
                f"shutdown timeouts, embedded server stop included ({total:g} s), must stay "
                f"below stopwaitsecs ({self.shutdown.stopwaitsecs} s)"
            )
        return self

    def shutdown_budget_s(self) -> float:
        """The whole shutdown's worst case (the embedded server's stop counted if it is used)."""
        embedded = self.database.uri == "embedded"
        return self.shutdown.budget_s(self.database.embedded.stop_timeout_s if embedded else 0.0)

    @model_validator(mode="after")
    def _master_fits_in_a_worker(self) -> Config:
        cap, stack = self.pool.worker_memory_mb, self.calib.stack.memory_limit_mb
        if cap and stack + _WORKER_BASELINE_MB > cap:
            raise ValueError(
                f"pool.worker_memory_mb ({cap}) must be at least calib.stack.memory_limit_mb ({stack:g}) "
                f"+ {_WORKER_BASELINE_MB} MB for the worker itself (or 0 for no cap)"
            )
        return self

    def camera_numbers(self) -> dict[str, int]:
        return {c.cam_id: c.detector_num for c in self.cameras}

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data, with every secret hidden (:func:`redact_data`)."""
        data: dict[str, Any] = redact_data(self.model_dump(mode="json"))
        return data

    def digest(self) -> str:
        """Short hash of the effective config, stamped into provenance."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


REDACTED = "***"
# URI options that carry secrets, by name: passwords, tokens, secrets, credentials, keys.
_SECRET_OPTION = re.compile(
    r"pass|pwd|secret|token|credential|authmechanismproperties|apikey|api_key|privatekey|private_key",
    re.IGNORECASE,
)
_URI_USERINFO = re.compile(
    r"^(?P<scheme>mongodb(?:\+srv)?://)(?P<user>[^:@/?#]*):(?P<password>.*)@(?P<hosts>[^@/?#]*)(?P<rest>[/?#].*)?$",
    re.DOTALL | re.IGNORECASE,
)
# A URI inside any text: up to white space or a quote.
_URI_IN_TEXT = re.compile(r"mongodb(?:\+srv)?://[^\s'\"<>`]+", re.IGNORECASE)
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|credential|private", re.IGNORECASE)


def _redact_query(query: str) -> str:
    parts = re.split(r"([&;])", query)
    for i in range(0, len(parts), 2):
        name, sep, _ = parts[i].partition("=")
        if sep and _SECRET_OPTION.search(name):
            parts[i] = f"{name}={REDACTED}"
    return "".join(parts)


def redact_uri(uri: str) -> str:
    """A MongoDB URI with its secrets hidden: the password of ``user:password@`` and the value
    of every secret-bearing option (``password``, ``tlsCertificateKeyFilePassword``,
    ``authMechanismProperties``, anything named like a token, secret or credential).

    When in doubt it hides too much: an unescaped ``@`` makes everything up to the last one
    count as the password.
    """
    match = _URI_USERINFO.match(uri)
    if match is not None:
        uri = f"{match['scheme']}{match['user']}:{REDACTED}@{match['hosts']}{match['rest'] or ''}"
    head, sep, query = uri.partition("?")
    if not sep:
        return uri
    query, hash_sep, fragment = query.partition("#")
    return f"{head}?{_redact_query(query)}{hash_sep}{fragment}"


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every MongoDB URI in it redacted."""
    if "://" not in text:
        return text
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


def redact_data(value: Any) -> Any:
    """Plain data (dicts, lists, strings) with URIs redacted and secret-named keys hidden."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) and v not in (None, "")
            else redact_data(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_data(v) for v in value]
    return value


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at the top level")
    return data


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "HUNTSMAN_CONFIG":
            continue
        if name in _ENV_ALIASES:
            keys: tuple[str, ...] = _ENV_ALIASES[name]
        elif "__" in name:
            keys = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        else:
            continue
        node = overrides
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = _env_value(value)
    return overrides


def _env_value(text: str) -> Any:
    """An environment value read as YAML (numbers, lists, booleans), else as the plain string.

    A value YAML cannot parse (``[::1]``, an unbalanced quote) is taken as written rather than
    stopping start-up with a parser traceback; validation then judges it like any other value.
    """
    if not text.strip():
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _resolve_paths(data: dict[str, Any], root: Path) -> dict[str, Any]:
    """Make relative paths absolute against ``root`` (the working directory)."""
    paths = dict(data.get("paths") or {})
    var_dir = Path(paths.get("var_dir", PathsConfig().var_dir))
    var_dir = var_dir if var_dir.is_absolute() else root / var_dir
    paths["var_dir"] = str(var_dir)
    for key, sub in _VAR_SUBDIRS.items():
        value = Path(paths[key]) if key in paths else var_dir / sub
        paths[key] = str(value if value.is_absolute() else (root / value))
    data = {**data, "paths": paths}
    database = dict(data.get("database") or {})
    embedded = dict(database.get("embedded") or {})
    storage = Path(embedded["storage_dir"]) if "storage_dir" in embedded else var_dir / "db"
    embedded["storage_dir"] = str(storage if storage.is_absolute() else root / storage)
    database["embedded"] = embedded
    data["database"] = database
    return data


def _format_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        message = err["msg"].removeprefix("Value error, ")  # pydantic's prefix says nothing
        parts.append(f"{where}: {message}")
    return "invalid configuration: " + "; ".join(parts)


def default_config_path() -> Path | None:
    """``etc/huntsman.yaml`` of the working directory, when present."""
    candidate = Path.cwd() / "etc" / "huntsman.yaml"
    return candidate if candidate.is_file() else None


def load_config(
    path: str | Path | None = None,
    *,
    override: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    root: Path | None = None,
) -> Config:
    """Load, layer and validate the configuration; :class:`ConfigError` with one line if bad."""
    environ = os.environ if environ is None else environ
    root = root or Path.cwd()
    if path is None and environ.get("HUNTSMAN_CONFIG"):
        path = environ["HUNTSMAN_CONFIG"]
    base_path = Path(path) if path is not None else default_config_path()
    data: dict[str, Any] = {}
    if base_path is not None:
        data = _migrate(_read_yaml(base_path), _dotted, str(base_path))
    if override is not None:
        data = _deep_merge(data, _migrate(_read_yaml(Path(override)), _dotted, str(override)))
    data = _deep_merge(data, _migrate(_env_overrides(environ), _env_name, "<environment>"))
    data = _resolve_paths(data, root)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
