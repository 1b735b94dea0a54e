"""Configuration: layering, validation, redaction, and the shutdown budget vs supervisord."""

from __future__ import annotations

import configparser
import json
import pickle
import re
import subprocess
import typing
import warnings
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from huntsman.config import (
    CalibConfig,
    Config,
    ConfigDeprecationWarning,
    ConfigError,
    QCConfig,
    load_config,
    redact_uri,
)
from tests.conftest import PYTHON, ROOT, python_env

SHIPPED = sorted((ROOT / "etc").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_validates(path: Path, tmp_path: Path) -> None:
    config = load_config(path, environ={}, root=tmp_path)
    assert isinstance(config, Config)


def test_shipped_yaml_sets_every_section() -> None:
    data = yaml.safe_load((ROOT / "etc" / "huntsman.yaml").read_text())
    assert set(data) == set(Config.model_fields), "every section is documented in the reference file"


def test_defaults_live_under_var_dir(tmp_path: Path) -> None:
    env = {"HUNTSMAN_VAR_DIR": "/data/hm"}
    config = load_config(ROOT / "etc" / "huntsman.yaml", environ=env, root=tmp_path)
    assert config.paths.raw_dir == Path("/data/hm/raw")
    assert config.paths.calib_dir == Path("/data/hm/calib")
    assert config.database.embedded.storage_dir == Path("/data/hm/db")
    relative = load_config(ROOT / "etc" / "huntsman.yaml", environ={}, root=tmp_path)
    assert relative.paths.raw_dir == tmp_path / "var" / "raw"


def test_environment_overrides_and_override_file(tmp_path: Path) -> None:
    override = tmp_path / "local.yaml"
    override.write_text("ingest:\n  max_tries: 7\npool:\n  max_workers: 3\n")
    env = {
        "HUNTSMAN_MONGODB_URI": "mongodb://user:s3cret@db.example:27017/?authSource=admin",
        "HUNTSMAN_RAW_DIR": "/srv/raw",
        "HUNTSMAN_POOL__MAX_WORKERS": "5",
    }
    config = load_config(ROOT / "etc" / "huntsman.yaml", override=override, environ=env, root=tmp_path)
    assert config.ingest.max_tries == 7  # from the override file
    assert config.pool.max_workers == 5  # the environment wins over the file
    assert config.paths.raw_dir == Path("/srv/raw")
    assert "s3cret" not in str(config.redacted())
    assert config.redacted()["database"]["uri"] == "mongodb://user:***@db.example:27017/?authSource=admin"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HUNTSMAN_INGEST__MAX_TRIES": "0"}, "ingest.max_tries"),
        ({"HUNTSMAN_MONGODB_URI": "postgres://x"}, "database.uri"),
        ({"HUNTSMAN_INGEST__NOT_A_FIELD": "1"}, "ingest.not_a_field"),
        ({"HUNTSMAN_SHUTDOWN__DRAIN_TIMEOUT_S": "30"}, "stopwaitsecs"),
    ],
)
def test_invalid_config_is_one_clear_line(env: dict[str, str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "etc" / "huntsman.yaml", environ=env, root=tmp_path)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_environment_value_yaml_cannot_parse_is_taken_as_written(tmp_path: Path) -> None:
    env = {"HUNTSMAN_HTTP__HOST": "[::1]", "HUNTSMAN_HTTP__PORT": "9000"}
    config = load_config(ROOT / "etc" / "huntsman.yaml", environ=env, root=tmp_path)
    assert config.http.host == "[::1]" and config.http.is_loopback()
    assert config.http.port == 9000  # still read as YAML where it parses
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "etc" / "huntsman.yaml", environ={"HUNTSMAN_HTTP__HOST": "0.0.0.0"}, root=tmp_path)
    assert str(info.value).startswith("invalid configuration: http: host '0.0.0.0' is not a loopback")


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, environ={}, root=tmp_path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", environ={}, root=tmp_path)


def test_redact_uri_keeps_uris_without_password() -> None:
    assert redact_uri("mongodb://host:27017/") == "mongodb://host:27017/"
    assert redact_uri("mongodb+srv://u:p@cluster.example/db") == "mongodb+srv://u:***@cluster.example/db"


def test_shutdown_budget_fits_supervisord_stopwaitsecs(tmp_path: Path) -> None:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "etc" / "supervisord" / "huntsman.conf")
    stopwaitsecs = parser.getint("program:huntsman", "stopwaitsecs")
    config = load_config(ROOT / "etc" / "huntsman.yaml", environ={}, root=tmp_path)
    budget = config.shutdown_budget_s()
    assert budget == config.shutdown.budget_s(config.database.embedded.stop_timeout_s)
    assert budget > config.shutdown.budget_s() + config.database.embedded.stop_timeout_s
    assert config.shutdown.stopwaitsecs == stopwaitsecs
    assert budget <= 10 < stopwaitsecs  # the service promises exit within 10 s
    assert parser.get("program:huntsman", "stopsignal") == "TERM"


def test_validate_config_command(tmp_path: Path) -> None:
    ok = subprocess.run(
        [PYTHON, "-m", "huntsman", "validate-config"], cwd=ROOT, env=python_env(),
        capture_output=True, text=True, timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert '"uri": "embedded"' in ok.stdout
    bad = subprocess.run(
        [PYTHON, "-m", "huntsman", "validate-config"], cwd=ROOT,
        env=python_env(HUNTSMAN_POOL__MAX_WORKERS="-1"), capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "pool.max_workers" in bad.stderr


# -- sections shaped like the science ------------------------------------------------------------

def _fields(cls: type, prefix: str) -> list[tuple[str, type | None]]:
    """Dotted names of every setting below a section class, with the class of nested sections."""
    import dataclasses

    from pydantic import BaseModel

    from huntsman.models import GradeThresholds

    if isinstance(cls, type) and issubclass(cls, BaseModel):
        items = [(name, f.annotation) for name, f in cls.model_fields.items()]
    elif dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        items = [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]
        if cls is GradeThresholds:  # the frame's own nominal zeropoint is no setting
            items = [(n, t) for n, t in items if n != "nominal_zeropoint"]
    else:
        return [(prefix, None)]
    out: list[tuple[str, type | None]] = []
    for name, annotation in items:
        nested = annotation if isinstance(annotation, type) and (
            issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)) else None
        out.append((f"{prefix}{name}", nested))
        if nested is not None:
            out.extend(_fields(nested, f"{prefix}{name}."))
    return out


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key -> line number (0-based) of every mapping key of a YAML text."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{prefix}{key.value}"
                lines[name] = key.start_mark.line
                walk(value, f"{name}.")

    walk(yaml.compose(text), "")
    return lines


def test_shipped_yaml_names_and_documents_every_field() -> None:
    text = (ROOT / "etc" / "huntsman.yaml").read_text()
    rows = text.splitlines()
    lines = _key_lines(text)
    undocumented, missing = [], []
    for name, _ in _fields(Config, ""):
        if name.startswith("cameras."):
            continue
        if name not in lines:
            # A default left commented out ("# raw_dir: var/raw  # ..."), documented in place.
            if not re.search(rf"^\s*#\s*{re.escape(name.rsplit('.', 1)[-1])}:", text, re.MULTILINE):
                missing.append(name)
            continue
        line = lines[name]  # documented: a comment on the line, just above or just below it
        near = [rows[line - 1], rows[line + 1]] if line + 1 < len(rows) else [rows[line - 1]]
        if "#" not in rows[line] and not any(r.lstrip().startswith("#") for r in near):
            undocumented.append(name)
    assert not missing, f"fields absent from etc/huntsman.yaml: {missing}"
    assert not undocumented, f"fields without a comment in etc/huntsman.yaml: {undocumented}"


def test_shipped_yaml_states_the_defaults_of_the_science_sections(tmp_path: Path) -> None:
    from huntsman.models import CatalogueSpec, DetectorConstants, GradeThresholds

    config = load_config(ROOT / "etc" / "huntsman.yaml", environ={}, root=tmp_path)
    defaults = Config()
    assert config.qc.refcat == defaults.qc.refcat and config.qc.grade == defaults.qc.grade
    assert config.calib.frames == defaults.calib.frames and config.detector == defaults.detector
    # The sections are the science records themselves, validated by pydantic.
    assert isinstance(config.qc.refcat, CatalogueSpec) and config.qc.refcat.path is None
    assert config.qc.grade == GradeThresholds()
    assert type(config.detector) is DetectorConstants and config.detector == DetectorConstants()
    assert config.qc.refcat.magnitude_map == CatalogueSpec().magnitude_map


def test_records_travel_to_workers_and_dump_as_written(tmp_path: Path) -> None:
    env = {"HUNTSMAN_QC__REFCAT__PATH": "/data/refcat.csv", "HUNTSMAN_QC__REFCAT__MAG_RANGE": "[12, 19.5]",
           "HUNTSMAN_QC__GRADE__MIN_STARS": "4", "HUNTSMAN_DETECTOR__GAIN_E_PER_ADU": "1.3"}
    config = load_config(ROOT / "etc" / "huntsman.yaml", environ=env, root=tmp_path)
    refcat, grade, detector = config.qc.refcat, config.qc.grade, config.detector
    assert refcat.path == Path("/data/refcat.csv") and refcat.mag_range == (12.0, 19.5)
    assert grade.min_stars == 4 and detector.gain_e_per_adu == 1.3
    for record in (refcat, grade, detector):
        copy = pickle.loads(pickle.dumps(record))
        assert copy == record and hash(copy) == hash(record)
    data = config.redacted()
    assert data["qc"]["refcat"]["mag_columns"] == {"g_band": "g_psf", "r_band": "r_psf"}
    assert "nominal_zeropoint" not in data["qc"]["grade"]  # per frame: qc.nominal_zeropoint
    assert Config.model_validate(data) == config  # service-config.json round trip


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HUNTSMAN_QC__REFCAT__FORMAT": "votable"}, "qc.refcat.format"),
        ({"HUNTSMAN_QC__REFCAT__NOT_A_FIELD": "1"}, "qc.refcat.not_a_field"),
        ({"HUNTSMAN_QC__REFCAT__MIN_SEPARATION_ARCSEC": "0"}, "qc.refcat.min_separation_arcsec"),
        ({"HUNTSMAN_QC__GRADE__FWHM_ARCSEC_GOOD": "6"},
         "qc.grade: fwhm_arcsec_good must be below fwhm_arcsec_bad"),
        ({"HUNTSMAN_QC__GRADE__NOMINAL_ZEROPOINT": "20.2"}, "set qc.nominal_zeropoint instead"),
        ({"HUNTSMAN_DETECTOR__GAIN_E_PER_ADU": "0"}, "detector.gain_e_per_adu"),
        ({"HUNTSMAN_DETECTOR__NOT_A_FIELD": "1"}, "detector.not_a_field"),
        ({"HUNTSMAN_CALIB__FRAMES__DARK__MIN": "60"}, "calib.frames.dark: min (60) exceeds max (50)"),
        ({"HUNTSMAN_CALIB__FRAMES__SCIENCE__MIN": "1"}, "calib.frames.science"),
    ],
)
def test_science_sections_are_validated(env: dict[str, str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "etc" / "huntsman.yaml", environ=env, root=tmp_path)
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_nested_keys_through_the_environment(tmp_path: Path) -> None:
    env = {"HUNTSMAN_CALIB__FRAMES__BIAS__MIN": "3", "HUNTSMAN_CALIB__FRAMES__FLAT__MAX": "9",
           "HUNTSMAN_QC__REFCAT__MAG_COLUMNS": "{i_band: i_psf}", "HUNTSMAN_QC__GRADE__SKY_MAG_MIN": "17.5"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new keys warn about nothing
        config = load_config(ROOT / "etc" / "huntsman.yaml", environ=env, root=tmp_path)
    frames = config.calib.frames
    assert (frames.bias.min, frames.bias.max, frames.flat.min, frames.flat.max) == (3, 50, 5, 9)
    assert frames.of("bias") is frames.bias and frames.of("dark") is frames.dark
    assert config.qc.refcat.magnitude_map == {"g_band": "g_psf", "i_band": "i_psf", "r_band": "r_psf"}
    assert config.qc.grade.sky_mag_min == 17.5


# -- keys of earlier versions --------------------------------------------------------------------

OLD_FILE = """\
qc:
  refcat_path: /data/refcat.csv
  refcat_format: csv
  refcat_mag_columns: {g_band: gmag}
  refcat_flags_allowed: [0, 4]
  grade_fwhm_arcsec_good: 3.0
  grade_min_stars: 7
calib:
  min_frames_bias: 3
  max_frames_flat: 20
"""


def test_old_keys_of_a_file_are_read_with_one_warning_each(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(OLD_FILE)
    with pytest.warns(ConfigDeprecationWarning) as caught:
        config = load_config(old, environ={}, root=tmp_path)
    messages = [str(w.message) for w in caught]
    assert messages == [
        "qc.refcat_path is deprecated: use qc.refcat.path",
        "qc.refcat_format is deprecated: use qc.refcat.format",
        "qc.refcat_mag_columns is deprecated: use qc.refcat.mag_columns",
        "qc.refcat_flags_allowed is deprecated: use qc.refcat.flags_allowed",
        "qc.grade_fwhm_arcsec_good is deprecated: use qc.grade.fwhm_arcsec_good",
        "qc.grade_min_stars is deprecated: use qc.grade.min_stars",
        "calib.min_frames_bias is deprecated: use calib.frames.bias.min",
        "calib.max_frames_flat is deprecated: use calib.frames.flat.max",
    ]
    assert all(w.filename == str(old) for w in caught)  # points at the file to edit
    refcat, grade, frames = config.qc.refcat, config.qc.grade, config.calib.frames
    assert refcat.path == Path("/data/refcat.csv") and refcat.format == "csv"
    assert refcat.magnitude_map == {"g_band": "gmag"} and refcat.flags_allowed == (0, 4)
    assert (grade.fwhm_arcsec_good, grade.min_stars) == (3.0, 7)
    assert (frames.bias.min, frames.flat.max) == (3, 20)
    # The same settings in the new shape make the same configuration.
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump({
        "qc": {"refcat": {"path": "/data/refcat.csv", "format": "csv", "mag_columns": {"g_band": "gmag"},
                          "flags_allowed": [0, 4]},
               "grade": {"fwhm_arcsec_good": 3.0, "min_stars": 7}},
        "calib": {"frames": {"bias": {"min": 3}, "flat": {"max": 20}}},
    }))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(new, environ={}, root=tmp_path) == config


def test_old_keys_of_the_environment_name_the_new_variable(tmp_path: Path) -> None:
    env = {"HUNTSMAN_QC__REFCAT_PATH": "/env/refcat.csv", "HUNTSMAN_CALIB__MIN_FRAMES_DARK": "4"}
    override = tmp_path / "local.yaml"
    override.write_text("qc:\n  refcat:\n    path: /file/refcat.csv\n")
    with pytest.warns(ConfigDeprecationWarning) as caught:
        config = load_config(ROOT / "etc" / "huntsman.yaml", override=override, environ=env, root=tmp_path)
    assert sorted(str(w.message) for w in caught) == [
        "HUNTSMAN_CALIB__MIN_FRAMES_DARK is deprecated: use HUNTSMAN_CALIB__FRAMES__DARK__MIN "
        "(calib.frames.dark.min)",
        "HUNTSMAN_QC__REFCAT_PATH is deprecated: use HUNTSMAN_QC__REFCAT__PATH (qc.refcat.path)",
    ]
    # Layers keep their order: the environment's old key wins over the override file's new one.
    assert config.qc.refcat.path == Path("/env/refcat.csv")
    assert config.calib.frames.dark.min == 4


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"HUNTSMAN_QC__REFCAT_MAG_MIN": "12"},
         "HUNTSMAN_QC__REFCAT_MAG_MIN is no longer read: set HUNTSMAN_QC__REFCAT__MAG_RANGE to [min, max]"),
        ("qc:\n  refcat_mag_max: 19\n",
         "qc.refcat_mag_max is no longer read: set qc.refcat.mag_range to [min, max]"),
        ("qc:\n  refcat_path: /a.csv\n  refcat: {path: /b.csv}\n",
         "qc.refcat_path and qc.refcat.path are both set: keep only qc.refcat.path"),
    ],
)
def test_refused_old_keys_are_one_line_naming_the_new_key(
    source: dict[str, str] | str, message: str, tmp_path: Path
) -> None:
    path, env = ROOT / "etc" / "huntsman.yaml", source if isinstance(source, dict) else {}
    if isinstance(source, str):
        path = tmp_path / "old.yaml"
        path.write_text(source)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env, root=tmp_path)
    text = str(info.value)
    assert text.startswith("invalid configuration: ") and text.endswith(message) and "\n" not in text


def test_old_keys_are_read_wherever_a_config_is_validated() -> None:
    # service-config.json written by an earlier version, or a section built in code.
    message = r"qc\.grade_min_stars is deprecated: use qc\.grade\.min_stars"
    with pytest.warns(ConfigDeprecationWarning, match=message):
        qc = QCConfig.model_validate({"grade_min_stars": 3})
    assert qc.grade.min_stars == 3
    with pytest.warns(ConfigDeprecationWarning, match=r"use calib\.frames\.flat\.min"):
        assert CalibConfig.model_validate({"min_frames_flat": 2}).frames.flat.min == 2
    with pytest.raises(ValidationError, match=r"set qc\.refcat\.mag_range to"):
        QCConfig.model_validate({"refcat_mag_min": 1.0})


def test_validate_config_warns_in_one_line_per_old_key(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PYTHON, "-m", "huntsman", "validate-config"], cwd=ROOT, capture_output=True, text=True,
        env=python_env(HUNTSMAN_QC__GRADE_MIN_STARS="4"), timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    warning, *rest = proc.stderr.strip().splitlines()
    assert rest == ["configuration OK"], proc.stderr  # the warning is one line
    assert warning.endswith("ConfigDeprecationWarning: HUNTSMAN_QC__GRADE_MIN_STARS is deprecated: "
                            "use HUNTSMAN_QC__GRADE__MIN_STARS (qc.grade.min_stars)"), warning
    assert json.loads(proc.stdout)["qc"]["grade"]["min_stars"] == 4


def test_old_calib_stack_keys_are_read_with_a_warning_naming_the_new_key(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("calib:\n  sigma: 2.5\n  memory_limit_mb: 512\n")
    with pytest.warns(ConfigDeprecationWarning) as caught:
        config = load_config(old, environ={}, root=tmp_path)
    assert [str(w.message) for w in caught] == [
        "calib.sigma is deprecated: use calib.stack.sigma",
        "calib.memory_limit_mb is deprecated: use calib.stack.memory_limit_mb",
    ]
    assert (config.calib.stack.sigma, config.calib.stack.memory_limit_mb) == (2.5, 512)
    both = tmp_path / "both.yaml"
    both.write_text("calib:\n  sigma: 2.5\n  stack: {sigma: 3.0}\n")
    with pytest.raises(ConfigError, match=r"calib\.sigma and calib\.stack\.sigma are both set"):
        load_config(both, environ={}, root=tmp_path)


def test_the_previous_reference_file_still_loads(tmp_path: Path) -> None:
    """The flat refcat magnitude pair of the previous etc/huntsman.yaml (both null, or both
    numbers) is read as qc.refcat.mag_range with one warning; one of them alone is refused."""
    for text, expected in (("qc:\n  refcat_mag_min: null\n  refcat_mag_max: null\n", None),
                           ("qc:\n  refcat_mag_min: 12\n  refcat_mag_max: 19.5\n", (12.0, 19.5))):
        old = tmp_path / "old.yaml"
        old.write_text(text)
        with pytest.warns(ConfigDeprecationWarning) as caught:
            config = load_config(old, environ={}, root=tmp_path)
        assert [str(w.message) for w in caught] == [
            "qc.refcat_mag_min and qc.refcat_mag_max are deprecated: use qc.refcat.mag_range"
        ]
        assert config.qc.refcat.mag_range == expected
