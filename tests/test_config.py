"""Configuration: layering, validation, redaction, and the shutdown budget vs supervisord."""

from __future__ import annotations

import configparser
import subprocess
from pathlib import Path

import pytest
import yaml

from huntsman.config import Config, ConfigError, load_config, redact_uri
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
