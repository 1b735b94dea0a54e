"""The command-line tools: one-line errors, validated arguments, the service's configuration."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pty
import select
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from huntsman.app import ingest_params, make_pool
from huntsman.config import Config
from huntsman.logs import get_logger
from huntsman.models import FileSource, IngestRequest, utcnow
from huntsman.service_config import SERVICE_CONFIG, read_service_config, write_service_config
from huntsman.services.ingestor import FileIngestor
from huntsman.store.database import Database
from tests.conftest import (
    PYTHON,
    ROOT,
    SAMPLE_NAMES,
    ServiceHandle,
    copy_sample,
    make_config,
    python_env,
)
from tests.support.needs import lacking
from tests.test_reprocess import N1, write_frames

pytestmark = pytest.mark.service  # every test runs the command line as a process

YAML = str(ROOT / "etc" / "huntsman.yaml")
EXIT_DATABASE = 4


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there


def cli_env(tmp_path: Path, uri: str, db_name: str | None = None, **extra: str) -> dict[str, str]:
    env = {
        "HUNTSMAN_VAR_DIR": str(tmp_path / "var"),
        "HUNTSMAN_MONGODB_URI": uri,
        "HUNTSMAN_DATABASE__SERVER_SELECTION_TIMEOUT_S": "0.5",
        "HUNTSMAN_POOL__MAX_WORKERS": "1",
        **extra,
    }
    if db_name is not None:
        env["HUNTSMAN_DATABASE__NAME"] = db_name
    return python_env(**env)


def huntsman(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "huntsman", *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=timeout,
    )


async def ahuntsman(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``huntsman`` from an async test: the test's event loop (and a service in it) keeps running."""
    return await asyncio.to_thread(huntsman, args, env, cwd)


async def run_all(
    jobs: list[tuple[list[str], dict[str, str]]], cwd: Path
) -> list[subprocess.CompletedProcess[str]]:
    """Independent commands, concurrently."""
    return list(await asyncio.gather(*(ahuntsman(args, env, cwd) for args, env in jobs)))


async def ingest_in_process(config: Config, database: Database, files: list[Path]) -> None:
    pool = make_pool(config, get_logger(test="cli"))
    try:
        ingestor = FileIngestor(
            database.exposures, pool, ingest_params(config), config.ingest, config.watcher,
            get_logger(test="cli"), concurrency=4,
        )
        for path in files:
            assert await ingestor.process(IngestRequest(str(path), utcnow(), FileSource.CLI)) == "ok"
    finally:
        await pool.shutdown(2.0)


# -- an unreachable database ------------------------------------------------------------------

DB_COMMANDS = [
    ["status"],
    ["check"],
    ["export"],
    ["report", "--night", "2021-01-07"],
    ["reprocess", "qc"],
    ["reprocess", "ingest", "--dry-run"],
    ["calib"],
    ["qc"],
    ["ingest", "RAW"],
    ["run"],
]


def test_unreachable_database_is_one_line_and_exit_4(tmp_path: Path) -> None:
    """Every command, ``run`` included: one line on stderr, exit 4, no traceback."""
    uri = f"mongodb://127.0.0.1:{closed_port()}/"
    env = cli_env(tmp_path, uri, HUNTSMAN_HTTP__ENABLED="false")
    raw = tmp_path / "var" / "raw"
    sample = copy_sample("bias_0", raw)
    procs = []
    for args in DB_COMMANDS:
        argv = [str(sample) if a == "RAW" else a for a in args]
        procs.append((args, subprocess.Popen(
            [PYTHON, "-m", "huntsman", "--config", YAML, *argv], env=env, cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )))
    for args, proc in procs:
        out, err = proc.communicate(timeout=120)
        lines = err.splitlines()
        assert proc.returncode == EXIT_DATABASE, (args, proc.returncode, err)
        assert len(lines) == 1, (args, err)
        assert lines[0].startswith("huntsman: database unreachable") and uri in lines[0], (args, err)
        assert "Traceback" not in out + err, args
    assert not (tmp_path / "var" / SERVICE_CONFIG).exists()  # a run that never started


def test_embedded_server_that_cannot_start_is_one_line_and_exit_4(tmp_path: Path) -> None:
    procs = []
    for args in (["run"], ["status"]):  # each on its own var directory
        work = tmp_path / args[0]
        work.mkdir()
        env = cli_env(work, "embedded", HUNTSMAN_DATABASE__EMBEDDED__START_TIMEOUT_S="0.01",
                      HUNTSMAN_DATABASE__EMBEDDED__PORT="0")
        procs.append((args, subprocess.Popen(
            [PYTHON, "-m", "huntsman", "--config", YAML, *args], env=env, cwd=work,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )))
    for args, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == EXIT_DATABASE, (args, err)
        assert err.count("\n") == 1 and "database unreachable (embedded database in" in err, (args, err)
        assert "did not answer within 0.01 s" in err and "Traceback" not in out + err


def test_database_errors_inside_exception_groups_are_one_line(tmp_path: Path) -> None:
    from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

    from huntsman.cli import database_error, database_message

    config = make_config(tmp_path, "mongodb://u:pw@127.0.0.1:1/", "x")
    timeout = ServerSelectionTimeoutError(
        "127.0.0.1:1: [Errno 111] Connection refused (configured timeouts: socketTimeoutMS: "
        "20000.0ms), Timeout: 0.5s, Topology Description: <TopologyDescription id: 1,\n ...>"
    )
    group = ExceptionGroup("tasks", [ValueError("other"), ExceptionGroup("inner", [timeout])])
    assert database_error(group) is timeout
    assert database_error(ValueError("not a database error")) is None
    assert database_message(timeout, config) == (
        "huntsman: database unreachable (mongodb://u:***@127.0.0.1:1/): "
        "127.0.0.1:1: [Errno 111] Connection refused"
    )
    refused = OperationFailure("Authentication failed.")
    assert database_message(refused, config).startswith("huntsman: database error (")


def test_conflicts_are_only_data_settings(tmp_path: Path, mongo_uri: str) -> None:
    from huntsman.service_config import config_differences

    service = make_config(tmp_path, mongo_uri, "night", QC__REFCAT__PATH="/data/refcat.csv")
    same_data = make_config(tmp_path, mongo_uri, "night", QC__REFCAT__PATH="/data/refcat.csv",
                            LOGGING__LEVEL="DEBUG", HTTP__PORT="9999")
    assert config_differences(same_data, service.redacted()) == []
    other = make_config(tmp_path, mongo_uri, "other")
    assert config_differences(other, service.redacted()) == ["database.name", "qc.refcat.path"]


def test_a_tool_never_silently_uses_another_external_database(tmp_path: Path) -> None:
    from huntsman.config import ConfigError
    from huntsman.service_config import read_service_config, write_service_config

    service = make_config(tmp_path, "mongodb://hunt:S3cret@db1.example:27017/", "night")
    write_service_config(service)
    stored = read_service_config(service)
    assert stored is not None
    # The same server, with the password the stored (redacted) URI lacks: used.
    same = make_config(tmp_path, "mongodb://hunt:S3cret@db1.example:27017/", "night")
    assert stored.to_config(same).database.uri == "mongodb://hunt:S3cret@db1.example:27017/"
    # Another server: refused with one line naming both (redacted), never used silently.
    other = make_config(tmp_path, "mongodb://hunt:Other@db2.example:27017/", "night")
    with pytest.raises(ConfigError) as info:
        stored.to_config(other)
    text = str(info.value)
    assert "db1.example" in text and "db2.example" in text and "\n" not in text
    assert "S3cret" not in text and "Other" not in text


# -- arguments --------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (["calib", "--date", "2021/01/07"], "'2021/01/07' is not a date YYYY-MM-DD"),
    (["qc", "--night", "20210107"], "'20210107' is not a date YYYY-MM-DD"),
    (["export", "--night", "18-01-2021"], "'18-01-2021' is not a date YYYY-MM-DD"),
    (["report", "--night", "2021-02-30"], "'2021-02-30' is not a date YYYY-MM-DD"),
    (["reprocess", "qc", "--night", "yesterday"], "'yesterday' is not a date"),
    (["export", "--type", "sciense"], "invalid choice: 'sciense'"),
    (["export", "--status", "good"], "invalid choice: 'good'"),
    (["reprocess", "flat"], "invalid choice: 'flat'"),
    (["reprocess", "solve", "--status", "bogus"], "invalid choice: 'bogus'"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = huntsman(args, cli_env(tmp_path, f"mongodb://127.0.0.1:{closed_port()}/"), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_ingest_force_names_the_new_spelling(tmp_path: Path) -> None:
    """Re-ingesting is ``reprocess ingest`` (which keeps history): one line, exit 2, nothing done."""
    raw = tmp_path / "var" / "raw"
    sample = copy_sample("bias_0", raw)
    proc = huntsman(["ingest", "--force", str(sample), str(raw)],
                    cli_env(tmp_path, f"mongodb://127.0.0.1:{closed_port()}/"), tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr == (
        f"huntsman: ingest --force is now: huntsman reprocess ingest --pattern {sample} "
        f"--pattern '{raw}/*'\n"
    )


def test_one_table_one_selection_no_import_circle() -> None:
    """Every command comes from the table; the selection flags have one shape; no import circle."""
    import ast

    from huntsman.cli import parse_args
    from huntsman.cli.commands import COMMANDS, Tool, parser
    from huntsman.cli.selection import Selection

    sub = next(a for a in parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(c.name for c in COMMANDS)
    assert all(asyncio.iscoroutinefunction(c.handler) for c in COMMANDS if isinstance(c, Tool))

    args = parse_args(["reprocess", "qc", "--night", "2024-05-10", "--camera", "A", "--night",
                       "2024-05-11", "--pattern", "*/A/*"])
    selection = Selection.from_args(args)
    assert selection == Selection(night=("2024-05-10", "2024-05-11"), camera="A", pattern="*/A/*")
    assert selection.query("qc") == {
        "calib_date": {"$in": ["2024-05-10", "2024-05-11"]}, "camera": "A", "ingest.status": "ok",
        "observation_type": {"$in": ["science"]},
    }
    assert selection.matches("/raw/A/x.fits") and not selection.matches("/raw/B/x.fits")
    assert selection.describe() == "--night 2024-05-10 --camera A --night 2024-05-11 --pattern */A/*"
    # The same flags, the same selection, whichever command (calib still accepts --date).
    calib = Selection.from_args(parse_args(["calib", "--date", "2024-05-10", "--camera", "A"]))
    assert calib == Selection(night="2024-05-10", camera="A") and calib.describe().startswith("--date")
    export = Selection.from_args(parse_args(["export", "--night", "2024-05-10", "--camera", "A"]))
    assert export == Selection(night="2024-05-10", camera="A")
    assert export.query() == {"calib_date": "2024-05-10", "camera": "A"}
    assert Selection(observation_type="science").query("calib")["observation_type"] == {"$in": []}

    package = ROOT / "huntsman" / "cli"
    modules = {p.stem for p in package.glob("*.py")}
    imports: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "huntsman.cli":
                found |= {a.name if a.name in modules else "__init__" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("huntsman.cli."):
                found.add((node.module or "").split(".")[2])
        imports[path.stem] = found - {path.stem}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(m == goal or (m not in seen and reaches(m, goal, seen | {m})) for m in imports[start])

    assert [m for m in sorted(imports) if reaches(m, m, set())] == []


def test_stage_status_mismatch_and_catalogue_columns(tmp_path: Path) -> None:
    env = cli_env(tmp_path, f"mongodb://127.0.0.1:{closed_port()}/")
    proc = huntsman(["reprocess", "qc", "--status", "quarantined"], env, tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "not a status of the qc stage" in proc.stderr and "waiting_calibs" in proc.stderr
    refcat = tmp_path / "refcat.csv"
    refcat.write_text("raj2000,dej2000,g_psf,r_psf,class_star\n10.0,-30.0,14.2,13.9,0.98\n")
    out = tmp_path / "index"
    proc = huntsman(["build-index", "--refcat", str(refcat), "--out", str(out), "--mag-col", "z_psf"],
                    env, tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--mag-col z_psf" in proc.stderr
    assert "raj2000, dej2000, g_psf, r_psf, class_star" in proc.stderr
    assert not out.exists()  # refused before any work


# -- ingest: missing paths and paths outside the raw root ---------------------------------------

async def test_ingest_refuses_missing_and_outside_paths(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    env = cli_env(tmp_path, mongo_uri, db_name)
    raw = tmp_path / "var" / "raw"
    inside = copy_sample("bias_0", raw)
    outside = copy_sample("science_0", tmp_path / "elsewhere")
    before = hashlib.sha256(outside.read_bytes()).hexdigest()

    proc = await ahuntsman(["ingest", "/nonexistent.fits"], env, tmp_path)
    assert proc.returncode == 2 and "no such file or directory: /nonexistent.fits" in proc.stderr
    proc = await ahuntsman(["ingest", str(inside), str(outside)], env, tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{outside} is outside the raw directory" in proc.stderr and "--outside-root" in proc.stderr
    assert await database.exposures.count() == 0  # refused: not even the good one, no document
    # A symlink in the raw root pointing out is outside too.
    (raw / "link.fits").symlink_to(outside)
    proc = await ahuntsman(["ingest", str(raw / "link.fits")], env, tmp_path)
    assert proc.returncode == 2 and "outside the raw directory" in proc.stderr
    (raw / "link.fits").unlink()

    proc = await ahuntsman(["ingest", "--outside-root", str(inside), str(outside)], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 files: 2 ok" in proc.stdout
    assert await database.exposures.count({"ingest.status": "ok"}) == 2
    assert hashlib.sha256(outside.read_bytes()).hexdigest() == before


@pytest.mark.tools("solve-field", "tycho2")
async def test_outside_root_files_are_solved_but_never_written(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    """The solver records the solution of a file outside the raw root but leaves the file alone."""
    from huntsman.services.solver import PlateSolver
    from huntsman.testing.starfield import make_tan_sip_wcs, render_sky_frame
    from huntsman.testing.synthetic import MoffatPSF, huntsman_header, write_raw

    config = make_config(tmp_path, mongo_uri, db_name)
    shape = (1500, 2000)
    true_wcs = make_tan_sip_wcs(270.0, -30.0, shape, 1.24, 30.0, {})
    data, _ = render_sky_frame(shape, true_wcs, MoffatPSF(2.0, 3.0), sky_adu=200.0, exptime_s=30.0,
                               seed=5, n_extra_stars=800)
    header = huntsman_header(observation_type="science", ra_deg=270.2, dec_deg=-29.8, exptime_s=30.0)
    (tmp_path / "elsewhere").mkdir()
    outside = write_raw(tmp_path / "elsewhere" / "frame.fits", data, header)
    before = hashlib.sha256(outside.read_bytes()).hexdigest()
    proc = await ahuntsman(["ingest", "--outside-root", str(outside)], cli_env(tmp_path, mongo_uri, db_name),
                    tmp_path)
    assert proc.returncode == 0, proc.stderr
    pool = make_pool(config, get_logger(test="cli"), background=True)
    try:
        solver = PlateSolver(database.exposures, pool, config.astrometry, config.detector,
                             raw_dir=config.paths.raw_dir, extra_index_dir=config.paths.astrometry_dir,
                             log=get_logger(test="cli"))
        if not await solver.check_available():
            lacking(f"plate solving unusable here: {solver.unusable_reason}")
        assert await solver.solve(str(outside)) == "solved"
    finally:
        await pool.shutdown(2.0)
    doc = await database.exposures.get(str(outside))
    assert doc is not None and doc["wcs"]["status"] == "solved"
    assert doc["wcs"]["written_to_file"] is False
    assert hashlib.sha256(outside.read_bytes()).hexdigest() == before


# -- export: Extended JSON, filters matching nothing ---------------------------------------------

async def test_export_extended_json_and_empty_filters(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    config = make_config(tmp_path, mongo_uri, db_name)
    files = [copy_sample(name, config.paths.raw_dir) for name in SAMPLE_NAMES]
    await ingest_in_process(config, database, files)
    dates = sorted([d["date_obs"] async for d in database.exposures.find({}, projection={"date_obs": 1})])
    cut = dates[len(dates) // 2]
    expected = sum(1 for d in dates if d > cut)
    env = cli_env(tmp_path, mongo_uri, db_name)
    query = json.dumps({"date_obs": {"$gt": {"$date": cut.isoformat().replace("+00:00", "Z")}}})
    proc = await ahuntsman(["export", "--no-header", "--query", query], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert 0 < len(proc.stdout.splitlines()) == expected
    camera, bad_query, qc, reprocess, calib = await run_all([
        (["export", "--camera", "NOPE"], env),
        (["export", "--query", "[1, 2]"], env),
        (["qc", "--night", "2000-01-01"], env),
        (["reprocess", "ingest", "--camera", "NOPE"], env),
        (["calib", "--date", "2000-01-01"], env),
    ], tmp_path)
    assert camera.returncode == 1 and camera.stdout == ""
    assert camera.stderr.strip() == "huntsman: no exposure matches --camera NOPE"
    assert bad_query.returncode == 2 and "--query is not a valid Extended JSON filter" in bad_query.stderr
    assert qc.returncode == 1 and "no ingested science frames match --night 2000-01-01" in qc.stderr
    assert reprocess.returncode == 1 and "no exposure matches --camera NOPE for ingest" in reprocess.stderr
    assert calib.returncode == 1 and "no calibration frames match --date 2000-01-01" in calib.stderr


# -- reprocess must not replace measured values with empty ones ---------------------------------

async def test_reprocess_qc_refuses_to_wipe_zeropoints(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    config = make_config(tmp_path, mongo_uri, db_name)
    await ingest_in_process(config, database, write_frames(config.paths.raw_dir))
    measured = {"status": "done", "zeropoint": 24.61, "zeropoint_err": 0.02, "tries": 1}
    science = {"observation_type": "science", "calib_date": N1}
    await database.exposures.collection.update_many(
        science, {"$set": {"qc": measured, "wcs": {"status": "skipped"}}}
    )
    n = await database.exposures.count(science)
    assert n == 4
    env = cli_env(tmp_path, mongo_uri, db_name)
    proc = await ahuntsman(["reprocess", "qc", "--night", N1], env, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "refusing to reprocess qc" in proc.stderr
    assert f"{n} of {n} frames have a zeropoint" in proc.stderr and "qc.refcat.path" in proc.stderr
    async for doc in database.exposures.find(science):
        assert doc["qc"]["zeropoint"] == 24.61 and "history" not in doc  # nothing changed
    # The older spelling is the same implementation: the same refusal, word for word.
    alias = await ahuntsman(["qc", "--reprocess", "--night", N1], env, tmp_path)
    assert (alias.returncode, alias.stderr) == (proc.returncode, proc.stderr)
    assert "reprocess_refused" in alias.stdout  # the log line of the same code path

    # The night of the issue: the service runs with a catalogue given by its override; a bare
    # command line now uses the service's configuration, so it is not refused.
    refcat = tmp_path / "refcat.csv"
    refcat.write_text("raj2000,dej2000,g_psf,r_psf\n")
    service = make_config(tmp_path, mongo_uri, db_name, QC__REFCAT__PATH=str(refcat))
    path = write_service_config(service)
    proc = await ahuntsman(["reprocess", "qc", "--night", N1, "--dry-run"], cli_env(tmp_path, mongo_uri),
                           tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("huntsman: using the service's configuration")
    assert f"dry run: {n} exposures selected" in proc.stdout
    path.unlink()

    proc = await ahuntsman(["reprocess", "qc", "--night", N1, "--force"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    async for doc in database.exposures.find(science):
        assert doc["qc"].get("zeropoint") is None  # replaced (no masters: waiting_calibs)
        assert doc["history"][-1]["stage"] == "qc"
        assert doc["history"][-1]["previous"]["qc"]["zeropoint"] == 24.61

    # `calib --force` is `reprocess calib`: its summary, for the frames the selection names.
    proc = await ahuntsman(["calib", "--force", "--date", N1, "--camera", "TESTCAM01"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stdout.splitlines() if not line.startswith("{")]
    assert said[-1].startswith("calib: 3 selected, "), proc.stdout


# -- the running service's configuration --------------------------------------------------------

async def test_service_writes_its_config_and_tools_use_it(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    # The service runs with settings a bare command line would not have (its own database
    # name, an override of a data setting).
    config = make_config(tmp_path, mongo_uri, db_name, CALIB__FRAMES__BIAS__MIN=3, HTTP__ENABLED="false")
    handle = await ServiceHandle(config).start()
    try:
        path = tmp_path / "var" / SERVICE_CONFIG
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["config"]["database"]["name"] == db_name
        assert record["config"]["calib"]["frames"]["bias"]["min"] == 3

        # No --config, no database name: the service's is used, and the tool says so.
        bare = cli_env(tmp_path, mongo_uri)
        proc = await ahuntsman(["status"], bare, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.splitlines() == [
            f"huntsman: using the service's configuration (pid {os.getpid()}, running, {path})"
        ]
        assert "service: running" in proc.stdout
        proc = await ahuntsman(["status"], {**bare, "HUNTSMAN_QC__PSF_MAX_STARS": "20"}, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.splitlines()[0].endswith(
            "; ignoring this environment's qc.psf_max_stars (give --config to use them)"
        )

        # An explicit configuration that differs in data settings: warned, and refused for
        # commands that change data unless --force.
        own = cli_env(tmp_path, mongo_uri, db_name)
        proc = await ahuntsman(["--config", YAML, "export", "--no-header"], own, tmp_path)
        assert proc.returncode == 1  # nothing ingested yet
        assert "warning: using" in proc.stderr and "calib.frames.bias.min" in proc.stderr
        guarded = (["calib"], ["qc"], ["reprocess", "ingest"])
        procs = await run_all([(["--config", YAML, *args], own) for args in guarded], tmp_path)
        for args, proc in zip(guarded, procs, strict=True):
            assert proc.returncode == 2, (args, proc.stderr)
            lines = proc.stderr.splitlines()
            assert len(lines) == 2 and "calib.frames.bias.min" in lines[0], lines
            assert lines[1].startswith(f"huntsman: refusing to {args[0]} with a configuration")
        same = cli_env(tmp_path, mongo_uri, db_name, HUNTSMAN_CALIB__FRAMES__BIAS__MIN="3",
                       HUNTSMAN_HTTP__ENABLED="false")
        proc = await ahuntsman(["--config", YAML, "qc"], same, tmp_path)
        assert "same as the service's" in proc.stderr and "refusing" not in proc.stderr
        proc = await ahuntsman(["--config", YAML, "qc", "--force"], own, tmp_path)
        assert "refusing" not in proc.stderr and "no ingested science frames" in proc.stderr
    finally:
        assert await handle.shutdown() == 0


def test_service_config_is_redacted_and_owner_only(tmp_path: Path) -> None:
    config = make_config(tmp_path, "mongodb://huntsman:s3cret-pw@db.example:27017/", "x")
    path = write_service_config(config)
    text = path.read_text()
    assert "s3cret-pw" not in text and "huntsman:***@db.example" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    # The tool connects with its own URI (the stored one has no password).
    stored = read_service_config(config)
    assert stored is not None
    assert stored.to_config(config).database.uri == "mongodb://huntsman:s3cret-pw@db.example:27017/"


# -- run: start-up summary, service_ready, the human line on a terminal --------------------------

def test_run_announces_where_to_copy_files(tmp_path: Path, mongo_uri: str, db_name: str) -> None:
    env = cli_env(tmp_path, mongo_uri, db_name, HUNTSMAN_LOGGING__FORMAT="json",
                  HUNTSMAN_HTTP__ENABLED="false", HUNTSMAN_ASTROMETRY__ENABLED="false")
    master, slave = pty.openpty()
    proc = subprocess.Popen([PYTHON, "-m", "huntsman", "--config", YAML, "run"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    events: dict[str, dict[str, Any]] = {}
    terminal = b""
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while "service_ready" not in events:
            assert time.monotonic() < deadline and proc.poll() is None, events.keys()
            ready, _, _ = select.select([proc.stdout, master], [], [], 1.0)
            if master in ready:
                terminal += os.read(master, 65536)
            if proc.stdout in ready:
                line = proc.stdout.readline()
                if line.startswith("{"):
                    event = json.loads(line)
                    events.setdefault(event["event"], event)
        while b"huntsman is running" not in terminal or not terminal.endswith(b"\n"):
            assert time.monotonic() < deadline
            if select.select([master], [], [], 1.0)[0]:
                terminal += os.read(master, 65536)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        os.close(master)
    assert proc.returncode == 0
    raw = str(tmp_path / "var" / "raw")
    starting = events["service_starting"]
    assert "config" not in starting and "service_config" not in events  # the dump is debug only
    assert starting["raw_dir"] == raw and starting["database"] == "external"
    assert starting["database_uri"] == mongo_uri and starting["workers"] == 1
    ready_event = events["service_ready"]
    assert ready_event["level"] == "info" and ready_event["raw_dir"] == raw
    assert "python -m huntsman status" in ready_event["commands"]
    text = terminal.decode()
    assert f"copy FITS files into {raw}" in text and "huntsman status" in text


def test_make_run_installs_only_the_runtime(tmp_path: Path) -> None:
    make = shutil.which("make")
    if make is None:
        lacking("make is not installed (Debian package make)")
    venv = tmp_path / "venv"
    run = subprocess.run([make, "-n", "run", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 0, run.stderr
    installs = [line for line in run.stdout.splitlines() if "pip install" in line and "-e" in line]
    assert installs and all("'.[embedded]'" in line for line in installs), installs
    test = subprocess.run([make, "-n", "lint", f"VENV={venv}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert "'.[embedded,test,dev]'" in test.stdout
