"""Secrets: redacted wherever the config or an error text is printed or logged; owner-only var
and database files; the status page is not served to the network unless asked for."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from structlog.testing import capture_logs

from huntsman.config import ConfigError, HttpConfig, load_config, redact_data, redact_text, redact_uri
from huntsman.logs import get_logger
from huntsman.services.http import StatusServer
from huntsman.store.database import Database
from huntsman.store.embedded import EmbeddedServer
from tests.conftest import PYTHON, ROOT, ServiceHandle, make_config, python_env

SECRETS = ("S3cretPw", "KeyPw123", "SessTok456", "PlainPw789", "ApiTok000", "Cred111")
URI = (
    "mongodb://huntuser:S3cretPw@127.0.0.1:{port}/?tls=true"
    "&tlsCertificateKeyFilePassword=KeyPw123&authMechanism=MONGODB-AWS"
    "&authMechanismProperties=AWS_SESSION_TOKEN:SessTok456&password=PlainPw789"
    "&x_api_token=ApiTok000;someCredential=Cred111&appname=huntsman-test"
)


def _no_secret(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{leaked} in {text[:2000]}"


def test_redact_uri_hides_every_secret_and_keeps_the_rest() -> None:
    out = redact_uri(URI.format(port=27017))
    _no_secret(out)
    assert out.startswith("mongodb://huntuser:***@127.0.0.1:27017/?tls=true")
    assert "tlsCertificateKeyFilePassword=***" in out and "authMechanismProperties=***" in out
    assert "authMechanism=MONGODB-AWS" in out and out.endswith("appname=huntsman-test")
    assert redact_uri("mongodb+srv://u:p%40ss@cluster.example/db") == "mongodb+srv://u:***@cluster.example/db"
    assert redact_uri("mongodb://u:p@ss@host/") == "mongodb://u:***@host/"  # unescaped: hide more
    assert redact_uri("mongodb://host:27017/db?w=1") == "mongodb://host:27017/db?w=1"
    assert redact_uri("embedded") == "embedded"
    assert redact_uri("MongoDB://u:S3cretPw@h/") == "MongoDB://u:***@h/"


def test_redact_text_finds_uris_inside_messages_and_data() -> None:
    message = f"cannot reach '{URI.format(port=1)}': connection refused (see mongodb://a:Cred111@h)"
    out = redact_text(message)
    _no_secret(out)
    assert out.endswith("connection refused (see mongodb://a:***@h)")
    data = redact_data({"database": {"uri": URI.format(port=1)}, "api_token": "ApiTok000",
                        "items": ["mongodb://u:PlainPw789@h/"], "n": 3})
    _no_secret(json.dumps(data))
    assert data["n"] == 3 and data["api_token"] == "***"


@pytest.mark.service
def test_validate_config_redacts_every_secret_option(tmp_path: Path) -> None:
    env = python_env(HUNTSMAN_MONGODB_URI=URI.format(port=27017), HUNTSMAN_VAR_DIR=str(tmp_path / "var"))
    proc = subprocess.run([PYTHON, "-m", "huntsman", "validate-config"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    _no_secret(proc.stdout + proc.stderr)
    uri = json.loads(proc.stdout)["database"]["uri"]
    assert uri.startswith("mongodb://huntuser:***@127.0.0.1:27017/") and uri.count("***") == 6


@pytest.mark.service
def test_start_up_log_and_error_texts_are_redacted(tmp_path: Path) -> None:
    # Nothing listens on the port: the service logs its configuration, fails to reach the
    # database and exits; nothing it prints (log lines, error, traceback) carries a secret.
    env = python_env(
        HUNTSMAN_MONGODB_URI=URI.format(port=1), HUNTSMAN_VAR_DIR=str(tmp_path / "var"),
        HUNTSMAN_LOGGING__FORMAT="json", HUNTSMAN_DATABASE__SERVER_SELECTION_TIMEOUT_S="0.5",
        HUNTSMAN_LOGGING__LEVEL="DEBUG",  # the full configuration is logged at debug level
    )
    proc = subprocess.run([PYTHON, "-m", "huntsman", "run"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode != 0
    _no_secret(proc.stdout + proc.stderr)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    starting = [e for e in events if e.get("event") == "service_starting"]
    dumped = [e for e in events if e.get("event") == "service_config"]
    assert starting and dumped, proc.stdout[:2000]
    for uri in (starting[0]["database_uri"], dumped[0]["config"]["database"]["uri"]):
        assert uri.startswith("mongodb://huntuser:***@127.0.0.1:1/")
        assert "tlsCertificateKeyFilePassword=***" in uri


def test_log_lines_are_redacted_by_the_configured_logger() -> None:
    code = (
        "from huntsman.logs import configure_logging, get_logger\n"
        "configure_logging('INFO', 'json')\n"
        "try:\n"
        "    raise RuntimeError('no server at mongodb://u:S3cretPw@h:1/?password=PlainPw789')\n"
        "except RuntimeError as exc:\n"
        "    get_logger().exception('database_failed', error=str(exc), password='Cred111')\n"
    )
    proc = subprocess.run([PYTHON, "-c", code], env=python_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    event = json.loads(proc.stdout.strip().splitlines()[-1])
    _no_secret(proc.stdout)
    assert event["error"] == "no server at mongodb://u:***@h:1/?password=***"
    assert event["password"] == "***" and "mongodb://u:***@h:1/" in event["exception"]


# -- owner-only files ---------------------------------------------------------------------------
def _modes(top: Path) -> dict[str, int]:
    modes = {".": stat.S_IMODE(top.stat().st_mode)}
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            path = Path(directory) / name
            modes[str(path.relative_to(top))] = stat.S_IMODE(path.lstat().st_mode)
    return modes


@pytest.mark.service
async def test_embedded_database_files_are_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a permissive umask, as a login shell has
    try:
        server = EmbeddedServer(tmp_path / "db", port=0)
        uri = await server.start()
        try:
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
            await client["huntsman"]["exposures"].insert_many([{"n": i} for i in range(100)])
            await client.close()
        finally:
            await server.stop()
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "db")
    assert any(k.startswith("data") and k != "data" for k in modes), modes  # files were made
    wrong = {k: oct(m) for k, m in modes.items()
             if m != (0o700 if (tmp_path / "db" / k).is_dir() else 0o600)}
    assert not wrong, wrong


async def test_var_directory_is_owner_only(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    config = make_config(tmp_path, mongo_uri, db_name)
    config.paths.var_dir.mkdir(mode=0o755)
    os.chmod(config.paths.var_dir, 0o755)  # made by hand, readable by everyone
    handle = await ServiceHandle(config).start()
    try:
        assert stat.S_IMODE(config.paths.var_dir.stat().st_mode) == 0o700
    finally:
        assert await handle.shutdown() == 0


# -- the status page and the network ------------------------------------------------------------
def _load_http(tmp_path: Path, host: str, allow_remote: bool | None = None) -> HttpConfig:
    section: dict[str, Any] = {"host": host}
    if allow_remote is not None:
        section["allow_remote"] = allow_remote
    path = tmp_path / "http.yaml"
    path.write_text(json.dumps({"http": section}))  # JSON is YAML
    return load_config(path, environ={}, root=tmp_path).http


def test_non_loopback_bind_needs_allow_remote(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.7", "status.example.org", ""):
        with pytest.raises(ConfigError) as info:
            _load_http(tmp_path, host)
        message = str(info.value)
        assert "\n" not in message and "http.allow_remote: true" in message, message
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert _load_http(tmp_path, host).host == host
    allowed = _load_http(tmp_path, "0.0.0.0", allow_remote=True)
    assert allowed.allow_remote and not allowed.is_loopback()


async def test_remote_bind_logs_a_warning(tmp_path: Path, database: Database) -> None:
    servers = {}
    for host, allow in (("0.0.0.0", True), ("127.0.0.1", False)):
        config = HttpConfig(enabled=True, host=host, port=0, allow_remote=allow)
        server = StatusServer(config, database, None, state=dict, reports_dir=tmp_path, log=get_logger())
        with capture_logs() as logs:
            await server.start()
            await server.stop()
        servers[host] = [e for e in logs if e["event"] == "http_remote_bind"]
    assert len(servers["0.0.0.0"]) == 1 and servers["0.0.0.0"][0]["log_level"] == "warning"
    assert servers["127.0.0.1"] == []
