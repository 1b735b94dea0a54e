"""Typed, frozen, validated configuration.

Layers, later ones winning: the packaged defaults in this module, ``etc/huntsman.yaml`` (or the
file named by ``--config`` / ``HUNTSMAN_CONFIG``), an optional override file, then environment
variables: ``HUNTSMAN_MONGODB_URI``, ``HUNTSMAN_RAW_DIR``, ``HUNTSMAN_VAR_DIR`` and, for any
field, ``HUNTSMAN_<SECTION>__<FIELD>`` (for example ``HUNTSMAN_INGEST__MAX_TRIES=5``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "redact_uri",
]

ENV_PREFIX = "HUNTSMAN_"
_ENV_ALIASES = {
    "HUNTSMAN_MONGODB_URI": ("database", "uri"),
    "HUNTSMAN_RAW_DIR": ("paths", "raw_dir"),
    "HUNTSMAN_VAR_DIR": ("paths", "var_dir"),
    "HUNTSMAN_CALIB_DIR": ("paths", "calib_dir"),
    "HUNTSMAN_LOG_LEVEL": ("logging", "level"),
}


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line meant for the operator."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    """Directories; any not given explicitly lives under ``var_dir``."""

    var_dir: Path = Path("var")
    raw_dir: Path = Path("var/raw")
    calib_dir: Path = Path("var/calib")
    calibrated_dir: Path = Path("var/calibrated")


# Sub-directories of var_dir used for paths that are not configured explicitly.
_VAR_SUBDIRS = {"raw_dir": "raw", "calib_dir": "calib", "calibrated_dir": "calibrated"}


class EmbeddedConfig(_Section):
    storage_dir: Path = Path("var/db")
    port: int = Field(27117, ge=0, le=65535, description="0 picks a free port")
    start_timeout_s: float = Field(30.0, gt=0)
    stop_timeout_s: float = Field(3.0, gt=0)


class DatabaseConfig(_Section):
    uri: str = "embedded"
    name: str = "huntsman"
    server_selection_timeout_s: float = Field(5.0, gt=0)
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


class PoolConfig(_Section):
    max_workers: int = Field(2, ge=1, le=64)
    max_in_flight: int = Field(4, ge=1, le=1024)
    context: Literal["spawn", "forkserver"] = "forkserver"
    job_timeout_s: float = Field(120.0, gt=0)


class WatcherConfig(_Section):
    rescan_interval_s: float = Field(300.0, gt=0, description="periodic safety rescan")
    settle_s: float = Field(
        2.0, ge=0, description="a scanned file must be unchanged this long before ingestion"
    )
    queue_size: int = Field(10000, ge=1)
    extensions: tuple[str, ...] = (".fits", ".fit", ".fts", ".fits.fz")


class IngestConfig(_Section):
    max_tries: int = Field(3, ge=1, le=100)
    queue_size: int = Field(2000, ge=1)
    metrics: bool = True


class DetectorConfig(_Section):
    """Nominal constants of the cameras (ZWO ASI183MM Pro behind a Canon 400 mm f/2.8)."""

    saturation_adu: float = Field(4094.0, gt=0)
    gain_e_per_adu: float = Field(1.145, gt=0)
    read_noise_e: float = Field(2.4, gt=0)
    bias_level_adu: float = Field(32.0, ge=0)
    dark_current_e_per_s: float = Field(0.005, ge=0)
    pixel_scale_arcsec: float = Field(1.24, gt=0)


class CameraConfig(_Section):
    cam_id: str
    detector_num: int = Field(ge=0)
    serial: str | None = None


class ShutdownConfig(_Section):
    drain_timeout_s: float = Field(4.0, ge=0)
    pool_timeout_s: float = Field(2.0, ge=0)
    database_timeout_s: float = Field(1.0, ge=0)
    stopwaitsecs: int = Field(15, ge=1, description="supervisord's stopwaitsecs")

    @model_validator(mode="after")
    def _fits_budget(self) -> ShutdownConfig:
        total = self.drain_timeout_s + self.pool_timeout_s + self.database_timeout_s
        if total >= self.stopwaitsecs:
            raise ValueError(
                f"drain+pool+database timeouts ({total:g} s) must stay below "
                f"stopwaitsecs ({self.stopwaitsecs} s)"
            )
        return self


class ServiceConfig(_Section):
    heartbeat_interval_s: float = Field(5.0, gt=0)
    heartbeat_stale_s: float = Field(30.0, gt=0)


class Config(_Section):
    paths: PathsConfig = PathsConfig()
    database: DatabaseConfig = DatabaseConfig()
    logging: LoggingConfig = LoggingConfig()
    pool: PoolConfig = PoolConfig()
    watcher: WatcherConfig = WatcherConfig()
    ingest: IngestConfig = IngestConfig()
    detector: DetectorConfig = DetectorConfig()
    cameras: tuple[CameraConfig, ...] = ()
    shutdown: ShutdownConfig = ShutdownConfig()
    service: ServiceConfig = ServiceConfig()

    @field_validator("cameras")
    @classmethod
    def _unique_cameras(cls, value: tuple[CameraConfig, ...]) -> tuple[CameraConfig, ...]:
        ids = [c.cam_id for c in value]
        if len(set(ids)) != len(ids):
            raise ValueError("camera cam_id values must be unique")
        return value

    def camera_numbers(self) -> dict[str, int]:
        return {c.cam_id: c.detector_num for c in self.cameras}

    def redacted(self) -> dict[str, Any]:
        """The effective config as plain data, with passwords in URIs hidden."""
        data = self.model_dump(mode="json")
        data["database"]["uri"] = redact_uri(self.database.uri)
        return data

    def digest(self) -> str:
        """Short hash of the effective config, stamped into provenance."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def redact_uri(uri: str) -> str:
    """Hide the password of a ``mongodb://user:password@host`` URI."""
    return re.sub(r"^(mongodb(?:\+srv)?://[^:/@]+):[^@]*@", r"\1:***@", uri)


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
        node[keys[-1]] = yaml.safe_load(value) if value.strip() else value
    return overrides


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
        parts.append(f"{where}: {err['msg']}")
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
        data = _read_yaml(base_path)
    if override is not None:
        data = _deep_merge(data, _read_yaml(Path(override)))
    data = _deep_merge(data, _env_overrides(environ))
    data = _resolve_paths(data, root)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
