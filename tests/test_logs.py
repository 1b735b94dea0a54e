"""One log stream: structlog's lines and the libraries' (pymongo, astropy, asyncio, warnings),
in the main process and in pool workers, are the same JSON on stdout; nothing on stderr."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, RAW_SAMPLES, ROOT, python_env

KEYS = ("timestamp", "level", "event", "logger", "process")


def _lines(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line as a JSON log event with the common keys (fails on any other line)."""
    events = []
    for line in stdout.splitlines():
        event = json.loads(line)
        assert all(key in event for key in KEYS), line
        events.append(event)
    return events


def _by(events: list[dict[str, Any]], logger: str) -> list[dict[str, Any]]:
    return [e for e in events if e["logger"] == logger]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-c", code], env=python_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_library_records_and_warnings_are_json_lines_on_stdout() -> None:
    code = (
        "import asyncio, logging, warnings\n"
        "import huntsman.app  # as the service: astropy and pymongo loaded before logging is set up\n"
        "import astropy\n"
        "from astropy.utils.exceptions import AstropyWarning\n"
        "from huntsman.logs import configure_logging, get_logger\n"
        "configure_logging('INFO', 'json')\n"
        "get_logger(component='test').info('ours_info', n=1)\n"
        "get_logger().debug('ours_debug')\n"
        "logging.getLogger('pymongo.topology').info('library_info')\n"
        "logging.getLogger('pymongo.topology').warning('server %s unreachable', 'h:1')\n"
        "astropy.log.warning('astropy_says')\n"
        "warnings.warn('astropy warns', AstropyWarning)\n"
        "warnings.warn('plain warning', UserWarning)\n"
        "async def main():\n"
        "    asyncio.get_running_loop().call_exception_handler(\n"
        "        {'message': 'asyncio_error', 'exception': RuntimeError('at mongodb://u:Pw1x@h:1/')})\n"
        "asyncio.run(main())\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    events = _lines(proc.stdout)
    ours = _by(events, "huntsman")
    assert [(e["event"], e["level"], e["component"]) for e in ours] == [("ours_info", "info", "test")]
    pymongo = _by(events, "pymongo.topology")
    assert [(e["event"], e["level"]) for e in pymongo] == [("server h:1 unreachable", "warning")]
    assert [(e["event"], e["level"]) for e in _by(events, "astropy")] == [("astropy_says", "warning")]
    warned = _by(events, "py.warnings")
    assert [e["level"] for e in warned] == ["warning", "warning"]
    assert "AstropyWarning: astropy warns" in warned[0]["event"]
    assert "UserWarning: plain warning" in warned[1]["event"]
    (loop_error,) = _by(events, "asyncio")
    assert loop_error["event"] == "asyncio_error" and loop_error["level"] == "error"
    assert "RuntimeError: at mongodb://u:***@h:1/" in loop_error["exception"]  # redacted too
    assert "Pw1x" not in proc.stdout
    assert {e["process"] for e in events} == {"main"}


def test_configured_level_applies_to_our_lines_and_libraries_stay_at_warning() -> None:
    code = (
        "import logging\n"
        "from huntsman.logs import configure_logging, get_logger\n"
        "configure_logging('ERROR', 'json')\n"
        "get_logger().warning('ours_warning')\n"
        "get_logger().error('ours_error')\n"
        "logging.getLogger('pymongo').warning('library_warning')\n"
        "logging.getLogger('pymongo').error('library_error')\n"
        "configure_logging('DEBUG', 'json')\n"
        "get_logger().debug('ours_debug')\n"
        "logging.getLogger('pymongo.command').debug('library_debug')\n"
        "logging.getLogger('pymongo').warning('library_warning_again')\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    events = [e["event"] for e in _lines(proc.stdout)]
    assert events == ["ours_error", "library_error", "ours_debug", "library_warning_again"]


def speak_in_worker() -> int:
    """A pool job that logs through structlog, stdlib logging, astropy and warnings."""
    import astropy
    from astropy.utils.exceptions import AstropyWarning

    from huntsman.logs import get_logger

    get_logger().info("worker_said")
    logging.getLogger("pymongo.pool").warning("worker_library_warning")
    astropy.log.warning("worker_astropy_says")
    warnings.warn("worker warns", AstropyWarning, stacklevel=1)
    return os.getpid()


@pytest.mark.slow  # starts a forkserver pool
def test_pool_workers_log_the_same_json() -> None:
    code = (
        "import asyncio\n"
        "from huntsman.logs import configure_logging, get_logger\n"
        "from huntsman.workers.pool import ComputePool, process_pool_factory\n"
        "from tests.test_logs import speak_in_worker\n"
        "configure_logging('INFO', 'json')\n"
        "async def main():\n"
        "    pool = ComputePool(process_pool_factory(1, 'forkserver', 'INFO', 'json'),\n"
        "                       max_in_flight=1, job_timeout_s=60, log=get_logger())\n"
        "    try:\n"
        "        pid = await pool.run(speak_in_worker)\n"
        "    finally:\n"
        "        await pool.shutdown(30)\n"
        "    get_logger().info('job_done', pid=pid)\n"
        "asyncio.run(main())\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    events = _lines(proc.stdout)
    pid = next(e["pid"] for e in events if e["event"] == "job_done")
    mine = [e for e in events if e["process"] == f"worker-{pid}"]
    assert [(e["logger"], e["event"]) for e in mine[:3]] == [
        ("huntsman", "worker_said"),
        ("pymongo.pool", "worker_library_warning"),
        ("astropy", "worker_astropy_says"),
    ]
    assert mine[3]["logger"] == "py.warnings" and "AstropyWarning: worker warns" in mine[3]["event"]
    assert len(mine) == 4


@pytest.mark.e2e
def test_service_run_prints_only_json_lines_on_stdout(tmp_path: Path) -> None:
    var = tmp_path / "var"
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    env = python_env(HUNTSMAN_VAR_DIR=str(var), HUNTSMAN_LOGGING__FORMAT="json")
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([PYTHON, "-m", "huntsman", "run"], cwd=tmp_path, env=env,
                                stdout=stdout, stderr=stderr, start_new_session=True)
    try:

        def wait_for_event(name: str, timeout_s: float) -> None:
            deadline = time.monotonic() + timeout_s
            while f'"event": "{name}"' not in out.read_text():
                assert proc.poll() is None, out.read_text()[-3000:] + err.read_text()[-3000:]
                assert time.monotonic() < deadline, f"no {name} within {timeout_s} s"
                time.sleep(0.05)

        wait_for_event("watcher_started", 90)
        shutil.copyfile(RAW_SAMPLES / "science_0.fits", var / "raw" / "science_0.fits")
        wait_for_event("exposure_ingested", 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert err.read_text() == ""
    events = _lines(out.read_text())
    assert events[-1]["event"] == "service_stopped" and events[-1]["exit_code"] == 0
    ingested = next(e for e in events if e["event"] == "exposure_ingested")
    assert ingested["logger"] == "huntsman" and ingested["component"] == "ingestor"
