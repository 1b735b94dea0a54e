"""End to end: ``python -m huntsman`` as a subprocess on its embedded default database."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pymongo import MongoClient

from huntsman.store.embedded import find_running
from huntsman.testing.synthetic import huntsman_header, write_raw
from tests.conftest import PYTHON, RAW_SAMPLES, ROOT, python_env

pytestmark = pytest.mark.e2e


class ServiceProcess:
    """``python -m huntsman run`` in a temporary working directory, logs collected."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.raw = workdir / "var" / "raw"
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> ServiceProcess:
        env = python_env(
            HUNTSMAN_VAR_DIR=str(self.workdir / "var"), HUNTSMAN_SERVICE__HEARTBEAT_INTERVAL_S="0.5"
        )
        self.lines = []
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "huntsman", "--config", str(ROOT / "etc" / "huntsman.yaml")],
            cwd=self.workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group, as under supervisord
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for_event("watcher_started", 90)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.proc.stdout:  # closed at the end of the output: the service has exited
            for line in self.proc.stdout:
                self.lines.append(line)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def wait_for_event(self, name: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == name:
                    return event
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"service exited early: {''.join(self.lines)[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {name} event within {timeout_s} s: {''.join(self.lines)[-3000:]}")

    def client(self) -> MongoClient[dict[str, Any]]:
        uri = find_running(self.workdir / "var" / "db")
        assert uri is not None, "embedded server not running"
        return MongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=2000)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """As supervisord stops a program (``stopasgroup``), or a terminal hang-up reaches it."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # Never leave a server behind, whatever the test did to its service.
    uri_state = tmp_path / "var" / "db" / "server.json"
    if uri_state.exists():
        pid = json.loads(uri_state.read_text()).get("pid")
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.02) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic() - start


def frame(path: Path, index: int, shape: tuple[int, int] = (64, 64)) -> None:
    data = np.full(shape, 100 + index % 50, dtype=np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_raw(path, data, huntsman_header(observation_type="science"))


def test_sample_visible_in_status_within_two_seconds(workdir: Path) -> None:
    service = ServiceProcess(workdir).start()
    try:
        client = service.client()
        exposures = client["huntsman"]["exposures"]
        target = service.raw / "science_0.fits"
        shutil.copyfile(RAW_SAMPLES / "science_0.fits", target)
        elapsed = wait_until(lambda: exposures.find_one({"filename": str(target)}) is not None, 10)
        assert elapsed < 2.0, f"document written {elapsed:.2f} s after the copy"
        status = subprocess.run(
            [PYTHON, "-m", "huntsman", "status"], cwd=workdir, capture_output=True, text=True,
            env=python_env(HUNTSMAN_VAR_DIR=str(workdir / "var")), timeout=60,
        )
        assert status.returncode == 0, status.stderr
        assert "service: running" in status.stdout
        assert "science    ok" in status.stdout
        check = subprocess.run(
            [PYTHON, "-m", "huntsman", "check"], cwd=workdir, capture_output=True, text=True,
            env=python_env(HUNTSMAN_VAR_DIR=str(workdir / "var")), timeout=60,
        )
        assert check.returncode == 0, check.stderr
        exported = subprocess.run(
            [PYTHON, "-m", "huntsman", "export", "--type", "science", "--no-header"], cwd=workdir,
            capture_output=True, text=True, env=python_env(HUNTSMAN_VAR_DIR=str(workdir / "var")), timeout=60,
        )
        docs = [json.loads(line) for line in exported.stdout.splitlines()]
        assert [d["filename"] for d in docs] == [str(target)]
        assert "header" not in docs[0] and docs[0]["camera"] == "TESTCAM03"
        client.close()
        # Every line on stdout is a JSON log event with a name and a level.
        events = service.events()
        assert events and all("event" in e and "level" in e for e in events)
        assert sum(1 for line in service.lines if line.strip()) == len(events)
        started = next(e for e in events if e["event"] == "service_starting")
        assert started["database"] == "embedded" and "config" not in started  # dump: debug only
    finally:
        service.signal(signal.SIGTERM)
        assert service.wait(15) == 0
    check = subprocess.run(
        [PYTHON, "-m", "huntsman", "check"], cwd=workdir, capture_output=True, text=True,
        env=python_env(HUNTSMAN_VAR_DIR=str(workdir / "var")), timeout=60,
    )
    assert check.returncode == 1


def test_sigterm_with_work_in_flight(workdir: Path) -> None:
    service = ServiceProcess(workdir).start()
    n = 60
    for i in range(n):
        frame(service.raw / f"t{i:03d}.fits", i, shape=(1500, 1500))
    service.wait_for_event("exposure_ingested", 30)
    start = time.monotonic()
    # To the whole group: the workers ignore it and finish or are stopped by the service, so no
    # file is failed with "a worker process died" (every document below has tries == 1).
    service.signal_group(signal.SIGTERM)
    assert service.wait(10) == 0
    assert time.monotonic() - start < 10
    assert not any(e["level"] == "error" for e in service.events())
    # No partial documents: every document written is complete.
    service = ServiceProcess(workdir).start()
    try:
        client = service.client()
        exposures = client["huntsman"]["exposures"]
        wait_until(lambda: exposures.count_documents({"ingest.status": "ok"}) == n, 120, 0.2)
        for doc in exposures.find({}):
            assert doc["ingest"]["status"] == "ok" and doc["ingest"]["tries"] == 1
            assert doc["timing"]["ingested"] and doc["header"] and doc["metrics"]
        client.close()
    finally:
        service.signal(signal.SIGTERM)
        assert service.wait(15) == 0


def test_sigkill_mid_burst_then_restart(workdir: Path) -> None:
    service = ServiceProcess(workdir).start()
    n = 400
    client = service.client()
    exposures = client["huntsman"]["exposures"]
    for i in range(n):
        frame(service.raw / f"night/cam{i % 4}/k{i:04d}.fits", i)
        if i == n // 2:
            wait_until(lambda: exposures.count_documents({}) > 20, 60)
            service.signal(signal.SIGKILL)
            service.wait(10)
    client.close()
    # The embedded server of the killed run is still running; the restart must replace it.
    service = ServiceProcess(workdir).start()
    try:
        client = service.client()
        exposures = client["huntsman"]["exposures"]
        wait_until(lambda: exposures.count_documents({"ingest.status": "ok"}) == n, 120, 0.2)
        assert exposures.count_documents({}) == n
        names = [d["filename"] for d in exposures.find({}, {"filename": 1})]
        assert len(set(names)) == n
        client.close()
    finally:
        service.signal(signal.SIGTERM)
        assert service.wait(15) == 0
