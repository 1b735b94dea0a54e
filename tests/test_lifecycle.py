"""Lifecycle: one service per var directory, a supervised database, signals and deadlines.

Real ``python -m huntsman run`` subprocesses on the real embedded database, real files and
real signals; in-process services (``ServiceHandle``) where a test needs to own the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from pymongo import MongoClient
from pymongo.errors import ConnectionFailure

from huntsman.cli import EXIT_ALREADY_RUNNING
from huntsman.config import load_config
from huntsman.lock import SERVICE_LOCK, LockHeld, PidLock, holder
from huntsman.logs import get_logger
from huntsman.store.database import DatabaseMonitor, connect, open_database, retry_writes
from huntsman.store.embedded import (
    EMBEDDED_LOCK,
    STATE_FILE,
    EmbeddedServer,
    EmbeddedServerError,
    find_running,
)
from tests.conftest import (
    PYTHON,
    RAW_SAMPLES,
    ROOT,
    SAMPLE_NAMES,
    ServiceHandle,
    make_config,
    python_env,
    wait_for,
)

pytestmark = pytest.mark.service  # the service, its commands and database servers as processes

CONFIG = ROOT / "etc" / "huntsman.yaml"


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic() - start


def servers_on(storage: Path) -> list[psutil.Process]:
    """Every live ``secantusd`` process whose command line names this storage."""
    data = str(storage / "data")
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            cmd = proc.info["cmdline"] or []
            alive = proc.info["status"] != psutil.STATUS_ZOMBIE
            if alive and any("secantusd" in c for c in cmd) and data in cmd:
                found.append(proc)
    return found


class ServiceProcess:
    """``python -m huntsman run`` on a temporary var directory (embedded database), logs kept."""

    def __init__(self, workdir: Path, **env: str) -> None:
        self.workdir = workdir
        self.var = workdir / "var"
        self.raw = self.var / "raw"
        self.storage = self.var / "db"
        self.env = python_env(
            HUNTSMAN_VAR_DIR=str(self.var),
            HUNTSMAN_MONGODB_URI="embedded",
            HUNTSMAN_DATABASE__EMBEDDED__PORT="0",
            HUNTSMAN_SERVICE__HEARTBEAT_INTERVAL_S="0.5",
            HUNTSMAN_WATCHER__SETTLE_S="0.5",
            HUNTSMAN_LOGGING__FORMAT="json",
            **env,
        )
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self, wait: bool = True) -> ServiceProcess:
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "huntsman", "--config", str(CONFIG), "run"],
            cwd=self.workdir, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            self.wait_for_event("watcher_started", 90)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.proc.stdout:  # closed at the end of the output: the service has exited
            for line in self.proc.stdout:
                self.lines.append(line)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if name is None or event.get("event") == name:
                        out.append(event)
        return out

    def wait_for_event(self, name: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.events(name)
            if found:
                return found[0]
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"service exited early: {''.join(self.lines)[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {name} event within {timeout_s} s: {''.join(self.lines)[-3000:]}")

    def server_pid(self) -> int:
        return int(json.loads((self.storage / STATE_FILE).read_text())["pid"])

    def client(self) -> MongoClient[dict[str, Any]]:
        uri = find_running(self.storage)
        assert uri is not None, "embedded server not running"
        return MongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=3000)

    def cli(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "huntsman", "--config", str(CONFIG), *args], cwd=self.workdir,
            env=self.env, capture_output=True, text=True, timeout=timeout_s,
        )

    def stop(self, timeout_s: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A temporary working directory; no process started on it outlives the test."""
    before = {p.pid for p in psutil.process_iter()}
    yield tmp_path
    for proc in servers_on(tmp_path / "var" / "db"):
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
    for proc in psutil.process_iter(["cmdline"]):
        # Pool workers orphaned by a test that SIGKILLed its service (another test covers them).
        with contextlib.suppress(psutil.Error):
            cmd = proc.info["cmdline"] or []
            ours = proc.pid not in before and proc.ppid() == 1 and cmd[:1] == [PYTHON]
            if ours and any("multiprocessing" in c for c in cmd):
                proc.kill()


def copy_burst(raw: Path, n: int, on_copied: Callable[[int], None] | None = None) -> list[Path]:
    """Copy the sample frames under ``n`` new names (copied aside, then renamed in)."""
    raw.mkdir(parents=True, exist_ok=True)
    staging = raw.parent / "staging"
    staging.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        name = SAMPLE_NAMES[i % len(SAMPLE_NAMES)]
        tmp = staging / f"b{i:03d}_{name}.fits"
        shutil.copyfile(RAW_SAMPLES / f"{name}.fits", tmp)
        dest = raw / tmp.name
        os.replace(tmp, dest)
        paths.append(dest)
        if on_copied is not None:
            on_copied(i + 1)
    return paths


# -- one service per data directory -----------------------------------------------------------


def test_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "var" / SERVICE_LOCK
    assert holder(path) is None
    first = PidLock(path).acquire()
    assert holder(path) == os.getpid()
    assert (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(LockHeld) as refused:
        PidLock(path).acquire()
    assert refused.value.pid == os.getpid()
    first.release()
    assert holder(path) is None
    with PidLock(path):
        assert holder(path) == os.getpid()


@pytest.mark.e2e
def test_second_run_refused_while_first_keeps_ingesting(workdir: Path) -> None:
    first = ServiceProcess(workdir).start()
    try:
        assert first.proc is not None
        server_pid = first.server_pid()
        state_before = (first.storage / STATE_FILE).read_text()
        started = time.monotonic()
        second = first.cli("run", timeout_s=30)
        elapsed = time.monotonic() - started
        assert second.returncode == EXIT_ALREADY_RUNNING, second.stderr
        assert elapsed < 5, f"second run took {elapsed:.1f} s to give up"
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, second.stderr
        assert f"pid {first.proc.pid}" in lines[0] and "already running" in lines[0]
        assert "embedded_leftover_stopped" not in second.stdout + second.stderr
        # The first service and its database are untouched and keep ingesting.
        assert psutil.pid_exists(server_pid) and first.server_pid() == server_pid
        assert (first.storage / STATE_FILE).read_text() == state_before
        assert first.proc.poll() is None
        target = first.raw / "after_refusal.fits"
        shutil.copyfile(RAW_SAMPLES / "science_0.fits", target)
        client = first.client()
        try:
            exposures = client["huntsman"]["exposures"]
            wait_until(lambda: exposures.find_one({"filename": str(target), "ingest.status": "ok"}),
                       20, "file ingested after the refused second run")
        finally:
            client.close()
        assert len(servers_on(first.storage)) == 1
    finally:
        assert first.stop() == 0


async def test_cli_waits_for_the_owner_instead_of_starting_a_database(tmp_path: Path) -> None:
    """While a service owns the storage but its server is not up, a CLI tool never starts one."""
    config = load_config(CONFIG, environ={
        "HUNTSMAN_VAR_DIR": str(tmp_path / "var"), "HUNTSMAN_MONGODB_URI": "embedded",
        "HUNTSMAN_DATABASE__EMBEDDED__PORT": "0", "HUNTSMAN_DATABASE__EMBEDDED__START_TIMEOUT_S": "2",
    }, root=tmp_path)
    storage = config.database.embedded.storage_dir
    # A "starting service": it holds both locks, its server is not there yet.
    service_lock = PidLock(config.paths.var_dir / SERVICE_LOCK).acquire()
    owner = PidLock(storage / EMBEDDED_LOCK).acquire()
    log = get_logger()
    try:
        started = time.monotonic()
        with pytest.raises(EmbeddedServerError, match=f"owned by pid {os.getpid()}"):
            async with open_database(config.database, log, reuse_running=True):
                pass
        assert 1.9 < time.monotonic() - started < 10
        assert servers_on(storage) == []
        # The owner's server appears while the tool waits: the tool uses it.
        server = EmbeddedServer(storage, port=0, lock=owner)
        waiting = asyncio.create_task(_ping_via_cli(config, log))
        await asyncio.sleep(0.3)
        await server.start()
        try:
            assert await asyncio.wait_for(waiting, 10) == server.uri
            assert [p.pid for p in servers_on(storage)] == [server.pid]
        finally:
            waiting.cancel()
            with contextlib.suppress(BaseException):
                await waiting
            await server.stop()
    finally:
        owner.release()
        service_lock.release()


async def _ping_via_cli(config: Any, log: Any) -> str:
    async with open_database(config.database, log, reuse_running=True) as database:
        await database.ping()
        assert database.server is None  # reused, not started
        address = await database.client.address
        assert address is not None
        return f"mongodb://{address[0]}:{address[1]}/"


@pytest.mark.e2e
def test_status_and_check_during_startup_never_start_a_second_database(workdir: Path) -> None:
    service = ServiceProcess(workdir)
    max_servers = 0
    results: list[subprocess.CompletedProcess[str]] = []
    stop_counting = threading.Event()

    def count() -> None:
        nonlocal max_servers
        while not stop_counting.is_set():
            max_servers = max(max_servers, len(servers_on(service.storage)))
            time.sleep(0.02)

    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    service.start(wait=False)
    try:
        assert service.proc is not None
        wait_until(lambda: holder(service.var / SERVICE_LOCK) is not None, 30, "service lock taken")
        # Tools started while the service is starting (lock held, server not yet answering).
        assert not (service.storage / STATE_FILE).exists()
        with_tools = [
            threading.Thread(target=lambda cmd=cmd: results.append(service.cli(cmd)))
            for cmd in ("status", "check", "status", "check")
        ]
        for thread in with_tools:
            thread.start()
        for thread in with_tools:
            thread.join(90)
        service.wait_for_event("watcher_started", 90)
        stop_counting.set()
        counter.join(5)
        assert max_servers == 1
        assert len(results) == 4
        for result in results:
            assert "Traceback" not in result.stderr, result.stderr
            assert result.returncode in (0, 1), result.stderr
        statuses = [r for r in results if r.args[-1] == "status"]
        assert all(r.returncode == 0 and "exposures:" in r.stdout for r in statuses)
        assert service.events("embedded_leftover_stopped") == []
        assert service.proc.poll() is None
    finally:
        stop_counting.set()
        assert service.stop() == 0


@pytest.mark.e2e
def test_leftover_server_of_a_sigkilled_service_is_stopped_by_the_next_start(workdir: Path) -> None:
    first = ServiceProcess(workdir).start()
    assert first.proc is not None
    leftover = first.server_pid()
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert psutil.pid_exists(leftover), "the server outlives a SIGKILLed service"
    second = ServiceProcess(workdir).start()
    try:
        event = second.wait_for_event("embedded_leftover_stopped", 5)
        assert event["pid"] == leftover
        wait_until(lambda: not psutil.pid_exists(leftover) or psutil.Process(leftover).status() == "zombie",
                   10, "leftover server stopped")
        assert [p.pid for p in servers_on(second.storage)] == [second.server_pid()]
    finally:
        assert second.stop() == 0
    assert servers_on(second.storage) == []


# -- supervised database ----------------------------------------------------------------------


@pytest.mark.e2e
def test_embedded_database_killed_mid_burst_every_file_ends_ok(workdir: Path) -> None:
    n = 100
    service = ServiceProcess(workdir, HUNTSMAN_DATABASE__EMBEDDED__RESTART_BACKOFF_S="0.2").start()
    try:
        assert service.proc is not None
        victim = service.server_pid()
        killed = threading.Event()

        def kill_midway(copied: int) -> None:
            if copied == n // 3:
                os.kill(victim, signal.SIGKILL)
                killed.set()

        copy_burst(service.raw, n, kill_midway)
        assert killed.is_set()
        restarted = service.wait_for_event("embedded_server_restarted", 30)
        assert restarted["pid"] != victim
        assert service.events("embedded_server_died")
        client = service.client()
        try:
            exposures = client["huntsman"]["exposures"]
            wait_until(lambda: exposures.count_documents({"ingest.status": "ok"}) >= n, 90,
                       "every file of the burst ingested ok", 0.25)
            assert exposures.count_documents({}) == n
            names = {d["filename"] for d in exposures.find({}, {"filename": 1})}
            assert names == {str(service.raw / f"b{i:03d}_{SAMPLE_NAMES[i % 5]}.fits") for i in range(n)}
        finally:
            client.close()
        assert service.proc.poll() is None, "the service kept running"
        assert len(servers_on(service.storage)) == 1
        print(
            f"burst of {n}: all ok; server restarted {len(service.events('embedded_server_restarted'))}x, "
            f"write retries {len(service.events('database_write_retry'))}, "
            f"ingest_crashed {len(service.events('ingest_crashed'))}, "
            f"reconcile scans {len(service.events('reconciled_after_outage'))}, "
            f"loops restarted {len(service.events('service_loop_interrupted'))}"
        )
    finally:
        assert service.stop() == 0


@pytest.mark.e2e
def test_database_that_cannot_come_back_exits_non_zero(workdir: Path) -> None:
    service = ServiceProcess(
        workdir,
        HUNTSMAN_DATABASE__EMBEDDED__MAX_RESTARTS="2",
        HUNTSMAN_DATABASE__EMBEDDED__RESTART_BACKOFF_S="0.1",
        HUNTSMAN_DATABASE__EMBEDDED__START_TIMEOUT_S="5",
    ).start()
    assert service.proc is not None
    # The storage becomes unusable (a file where the data directory was), then the server dies.
    data = service.storage / "data"
    data.rename(service.storage / "data.moved")
    data.write_text("not a directory")
    os.kill(service.server_pid(), signal.SIGKILL)
    code = service.proc.wait(60)
    assert code not in (0, None)
    assert len(service.events("embedded_restart_failed")) == 2
    lost = service.wait_for_event("database_lost", 1)
    assert "restarted 2 times" in lost["reason"]
    assert servers_on(service.storage) == []


async def test_external_database_outage_is_survived_and_reconciled(tmp_path: Path, db_name: str) -> None:
    external = EmbeddedServer(tmp_path / "external", port=0)
    uri = await external.start()
    config = make_config(tmp_path, uri, db_name, DATABASE__MONITOR_INTERVAL_S="0.2",
                         DATABASE__SERVER_SELECTION_TIMEOUT_S="1", DATABASE__WRITE_RETRY_S="1")
    handle = await ServiceHandle(config).start()
    try:
        database = handle.app.database
        for name in SAMPLE_NAMES[:2]:
            shutil.copyfile(RAW_SAMPLES / f"{name}.fits", handle.raw / f"before_{name}.fits")
        await wait_for(lambda: _count_ok(database, 2), 30)
        port = external.port
        assert port is not None
        await external.stop()  # the external database goes away
        await wait_for(lambda: _async(handle.app.monitor.outages == 1), 10)
        for name in SAMPLE_NAMES[2:]:
            shutil.copyfile(RAW_SAMPLES / f"{name}.fits", handle.raw / f"during_{name}.fits")
        # ...and comes back on the same address: nothing was restarted by the service.
        external.requested_port = port
        await external.start()
        await wait_for(lambda: _count_ok(database, len(SAMPLE_NAMES)), 30)
        assert handle.app.monitor.state()["reachable"] is True
        assert handle.app.monitor.restarts == 0
        assert handle.task is not None and not handle.task.done()
        assert await handle.shutdown() == 0
    finally:
        if handle.task is not None and not handle.task.done():
            await handle.shutdown()
        await external.stop()


async def test_external_database_outage_past_the_bound_exits_non_zero(
    tmp_path: Path, db_name: str
) -> None:
    external = EmbeddedServer(tmp_path / "external", port=0)
    uri = await external.start()
    config = make_config(tmp_path, uri, db_name, DATABASE__MONITOR_INTERVAL_S="0.2",
                         DATABASE__SERVER_SELECTION_TIMEOUT_S="0.5", DATABASE__MAX_OUTAGE_S="1.5")
    handle = await ServiceHandle(config).start()
    try:
        await external.stop()
        assert handle.task is not None
        started = time.monotonic()
        code = await asyncio.wait_for(handle.task, 30)
        assert code == 1
        assert time.monotonic() - started < 1.5 + config.shutdown_budget_s() + 3
    finally:
        # The service gave up closing its client after close_timeout_s (its process would exit
        # now); in this process the test closes it, or its sockets outlive the test.
        await asyncio.wait_for(handle.app.database.client.close(), 10)
        await external.stop()


async def test_outage_clock_stops_while_the_database_disk_is_full(tmp_path: Path, db_name: str) -> None:
    """A database away because its disk is full is the disk watch's to report: the service waits
    (writers are paused) instead of exiting after max_outage_s; once the disk has room the
    clock runs again."""
    external = EmbeddedServer(tmp_path / "external", port=0)
    uri = await external.start()
    config = load_config(CONFIG, environ={
        "HUNTSMAN_VAR_DIR": str(tmp_path / "var"), "HUNTSMAN_MONGODB_URI": uri,
        "HUNTSMAN_DATABASE__NAME": db_name, "HUNTSMAN_DATABASE__MONITOR_INTERVAL_S": "0.1",
        "HUNTSMAN_DATABASE__SERVER_SELECTION_TIMEOUT_S": "0.3", "HUNTSMAN_DATABASE__MAX_OUTAGE_S": "0.5",
    }, root=tmp_path)
    disk_full = True
    lost: list[str] = []
    database = connect(uri, db_name, 0.3)
    monitor = DatabaseMonitor(database, config.database, get_logger(), on_recovered=lambda: None,
                              on_lost=lost.append, may_restart=lambda: not disk_full)
    task = asyncio.create_task(monitor.run())
    try:
        await external.stop()
        await asyncio.sleep(2.0)  # four times max_outage_s, all of it with the disk full
        assert lost == [] and not task.done()
        disk_full = False
        await asyncio.wait_for(task, 5)
        assert lost and "unreachable for more than 0.5 s" in lost[0]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await database.close(1.0)
        await external.stop()


async def _count_ok(database: Any, n: int) -> bool:
    try:
        return bool(await database.exposures.count({"ingest.status": "ok"}) >= n)
    except Exception:
        return False


async def _async(value: bool) -> bool:
    return value


# -- signals and deadlines --------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("fault", [signal.SIGSTOP, signal.SIGKILL], ids=["hung", "dead"])
def test_sigterm_with_database_hung_or_dead_exits_zero_within_budget(
    workdir: Path, fault: signal.Signals
) -> None:
    service = ServiceProcess(workdir).start()
    assert service.proc is not None
    config = load_config(CONFIG, environ={}, root=workdir)
    budget = config.shutdown_budget_s()
    server = service.server_pid()
    copy_burst(service.raw, 10)
    service.wait_for_event("exposure_ingested", 30)
    os.kill(server, fault)
    try:
        started = time.monotonic()
        service.proc.send_signal(signal.SIGTERM)
        code = service.proc.wait(budget + 5)
        elapsed = time.monotonic() - started
        assert code == 0, "".join(service.lines)[-3000:]
        assert elapsed <= budget, f"shutdown took {elapsed:.1f} s, budget {budget:g} s"
        wait_until(lambda: not psutil.pid_exists(server) or psutil.Process(server).status() == "zombie",
                   2, "the stopped server was killed")
        assert service.events("service_stopped")
        assert servers_on(service.storage) == []  # a server restarted meanwhile is stopped too
        stages = [(e["event"], e.get("stage"), e["timestamp"][11:23]) for e in service.events()
                  if e["event"] in ("signal_received", "shutdown_started", "shutdown_stage",
                                    "embedded_server_stopped", "service_stopped")]
        print(stages)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGCONT)
    print(f"SIGTERM with the database {fault.name}: exit 0 after {elapsed:.2f} s (budget {budget:g} s)")


@pytest.mark.e2e
def test_sighup_shuts_down_cleanly_and_leaves_nothing_running(workdir: Path) -> None:
    service = ServiceProcess(workdir).start()
    assert service.proc is not None
    server = service.server_pid()
    children = psutil.Process(service.proc.pid).children(recursive=True)
    assert server in {c.pid for c in children} or psutil.pid_exists(server)
    started = time.monotonic()
    service.proc.send_signal(signal.SIGHUP)
    code = service.proc.wait(15)
    elapsed = time.monotonic() - started
    assert code == 0, "".join(service.lines)[-3000:]
    assert service.wait_for_event("signal_received", 1)["signal"] == "SIGHUP"
    assert service.events("service_stopped")
    assert servers_on(service.storage) == []
    assert not psutil.pid_exists(server) or psutil.Process(server).status() == "zombie"

    def alive() -> list[list[str]]:
        running = []
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE:
                    running.append(child.cmdline())
        return running

    # The forkserver and resource tracker leave when they see their parent's pipe close.
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not alive(), 5, "every child of the service gone")
    assert alive() == []
    assert not (service.storage / STATE_FILE).exists()
    assert holder(service.var / SERVICE_LOCK) is None
    print(f"SIGHUP: exit 0 after {elapsed:.2f} s, {len(children)} children all gone")


async def test_a_write_waits_for_the_database_to_return(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "db", port=0)
    await server.start()
    database = connect(server.uri, "retry", server_selection_timeout_s=0.3)
    log = get_logger()
    try:
        await database.ping()
        port = server.port
        await server.stop()
        writes = 0

        async def write() -> str:
            nonlocal writes
            writes += 1
            await database.db["t"].update_one({"_id": 1}, {"$set": {"v": 1}}, upsert=True)
            return "written"

        # Gone for good within the deadline: the last "unreachable" error propagates.
        with pytest.raises(ConnectionFailure):
            await retry_writes(write, deadline_s=1.5, log=log, what="test")
        assert writes >= 2
        # Back on the same port while the write waits: it is written.
        pending = asyncio.create_task(retry_writes(write, deadline_s=20, log=log, what="test"))
        await asyncio.sleep(1.0)
        assert not pending.done()
        server.requested_port = port or 0
        await server.start()
        assert await asyncio.wait_for(pending, 20) == "written"
        assert await database.db["t"].find_one({"_id": 1}) == {"_id": 1, "v": 1}
    finally:
        await database.close(1.0)
        await server.stop()
