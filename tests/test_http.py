"""The status endpoint: /healthz follows the database, /metrics parses, / shows the frames."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from huntsman.config import DiskConfig, HttpConfig, ReportConfig
from huntsman.logs import get_logger
from huntsman.report import write_report
from huntsman.services.disk import DiskMonitor
from huntsman.services.http import StatusServer, page, quantiles
from huntsman.services.reporter import ReportScheduler
from huntsman.store import views
from huntsman.store.database import Database, connect
from huntsman.store.embedded import EmbeddedServer, server_command
from huntsman.workers.pool import ComputePool, process_pool_factory
from tests.conftest import wait_for
from tests.nightdata import NIGHT, WORST, insert_night

pytestmark = pytest.mark.service  # status servers on real database servers and pools

LOG = get_logger(test="http")
ROOT = Path(__file__).resolve().parents[1]


async def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 15)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, body.decode("latin-1")


@pytest.fixture
async def pool() -> AsyncIterator[ComputePool]:
    pool = ComputePool(process_pool_factory(1, "forkserver"), max_in_flight=2, job_timeout_s=30, log=LOG)
    yield pool
    await pool.shutdown(2.0)


async def serve(server: StatusServer) -> asyncio.Task[None]:
    task = asyncio.create_task(server.run(), name="http")
    await asyncio.wait_for(server.ready.wait(), 10)
    return task


def state() -> dict[str, Any]:
    return {
        "ingest_queue": 3,
        "solve_queue": 1,
        "qc": {"queue": 2},
        "counts": {"ok": 40, "failed": 1},
        "solve_counts": {"solved": 20},
    }


async def test_healthz_follows_the_database(tmp_path: Path, pool: ComputePool) -> None:
    storage = tmp_path / "db"
    first = EmbeddedServer(storage, port=0, log=LOG)
    uri = await first.start()
    port = first.port
    database = connect(uri, "health", server_selection_timeout_s=1.0)
    server = StatusServer(
        HttpConfig(port=0, db_timeout_s=1.0),
        database,
        pool,
        state=state,
        reports_dir=tmp_path / "reports",
        log=LOG,
    )
    task = await serve(server)
    second: asyncio.subprocess.Process | None = None
    try:
        status, body = await get(server.port or 0, "/healthz")
        assert status == 200 and body.startswith("ok"), body
        assert "database: ok" in body and "pool: ok" in body and "loop: ok" in body

        await first.stop()

        async def unhealthy() -> bool:
            status, body = await get(server.port or 0, "/healthz")
            return status == 503 and "database" in body and "database: ok" not in body

        await wait_for(unhealthy, 30, 0.2)
        status, body = await get(server.port or 0, "/healthz")
        assert body.startswith("unhealthy") and "pool: ok" in body

        # Same port and storage. Started directly: the launcher's own free-port check refuses a
        # port with connections in TIME_WAIT, the server itself binds it (SO_REUSEADDR).
        second = await asyncio.create_subprocess_exec(
            *server_command(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--storage-path",
            str(first.data_dir),
            "--log-level",
            "WARNING",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

        async def healthy() -> bool:
            return (await get(server.port or 0, "/healthz"))[0] == 200

        await wait_for(healthy, 30, 0.2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await database.close()
        if second is not None:
            second.terminate()
            await asyncio.wait_for(second.wait(), 10)
        await first.stop()


async def test_metrics_and_status_page(database: Database, pool: ComputePool, tmp_path: Path) -> None:
    await insert_night(database)
    reports = tmp_path / "reports"
    await write_report(database, NIGHT, reports / NIGHT)
    server = StatusServer(HttpConfig(port=0), database, pool, state=state, reports_dir=reports, log=LOG)
    task = await serve(server)
    try:
        status, text = await get(server.port or 0, "/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        ingested = {
            (s.labels["observation_type"], s.labels["status"]): s.value
            for s in families["huntsman_files_ingested"].samples
        }
        # tests/nightdata: 24+4 science ok, 1 science failed, 10 each of bias/dark/flat.
        assert ingested == {
            ("science", "ok"): 28,
            ("science", "failed"): 1,
            ("bias", "ok"): 10,
            ("dark", "ok"): 10,
            ("flat", "ok"): 10,
        }
        depths = {s.labels["queue"]: s.value for s in families["huntsman_queue_depth"].samples}
        assert depths == {"ingest": 3, "solve": 1, "qc": 2}
        latency = {
            (s.name, s.labels["stage"], s.labels.get("quantile")): s.value
            for s in families["huntsman_latency_seconds"].samples
        }
        # shutter close -> seen is 3 s and -> ingested 4.2 s for every synthetic frame.
        assert latency[("huntsman_latency_seconds", "seen", "0.5")] == pytest.approx(3.0)
        assert latency[("huntsman_latency_seconds", "ingested", "0.9")] == pytest.approx(4.2)
        assert latency[("huntsman_latency_seconds_count", "qc", None)] == 22 + 3  # qc_done set
        durations = {
            (s.name, s.labels["stage"]): s.value for s in families["huntsman_stage_duration_seconds"].samples
        }
        assert durations[("huntsman_stage_duration_seconds_count", "ingest")] == 59

        status, page = await get(server.port or 0, "/")
        assert status == 200 and "huntsman status" in page
        assert page.count("<tr>") >= 20
        assert f'href="/reports/{NIGHT}/index.html"' in page
        assert f'src="/reports/{NIGHT}/camera_TESTCAM01.png"' in page
        assert "truncated FITS file" in page and "no reference stars matched" in page
        status, png = await get(server.port or 0, f"/reports/{NIGHT}/camera_TESTCAM01.png")
        assert status == 200 and png.encode("latin-1").startswith(b"\x89PNG\r\n\x1a\n")
        assert (await get(server.port or 0, "/reports/../../etc/passwd"))[0] == 404
        assert (await get(server.port or 0, "/nothing"))[0] == 404
        assert (await get(server.port or 0, "/", method="POST"))[0] == 405
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_quantiles_are_observed_values() -> None:
    assert quantiles([4.0, 1.0, 3.0, 2.0], (0.5, 0.9, 0.99)) == {0.5: 2.0, 0.9: 4.0, 0.99: 4.0}


# name -> type of every family /metrics exposes (docs/operations.md lists the same names).
FAMILIES = {
    "huntsman_info": "gauge",
    "huntsman_files_ingested": "counter",
    "huntsman_stage_outcomes": "counter",
    "huntsman_queue_depth": "gauge",
    "huntsman_pool_in_flight": "gauge",
    "huntsman_pool_rebuilds": "counter",
    "huntsman_event_loop_lag_seconds": "gauge",
    "huntsman_disk_free_bytes": "gauge",
    "huntsman_disk_low": "gauge",
    "huntsman_http_refused": "counter",
    "huntsman_stage_duration_seconds": "summary",
    "huntsman_latency_seconds": "summary",
}


async def test_metrics_come_from_their_own_registry(database: Database, tmp_path: Path) -> None:
    """Every documented family, typed, from the server's registry; the global one stays empty."""
    await insert_night(database)
    disk = DiskMonitor(DiskConfig(min_free_mb=0), {"var_dir": tmp_path}, LOG)
    await disk.check()
    server = StatusServer(
        HttpConfig(port=0), database, None, state=state, reports_dir=tmp_path, log=LOG, disk=disk
    )
    text = await server.metrics.render()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families == FAMILIES
    assert text.count("# HELP ") == len(FAMILIES) and text.count("# TYPE ") == len(FAMILIES)
    outcomes = {
        (s.labels["stage"], s.labels["outcome"]): s.value
        for f in text_string_to_metric_families(text) if f.name == "huntsman_stage_outcomes"
        for s in f.samples
    }
    assert outcomes == {("ingest", "ok"): 40, ("ingest", "failed"): 1, ("solve", "solved"): 20}
    assert 'huntsman_disk_low{directory="var_dir"} 0.0' in text
    assert not [m for m in prometheus_client.REGISTRY.collect() if m.name.startswith("huntsman")]
    documented = set(re.findall(r"`(huntsman_[a-z_]+)`", (ROOT / "docs" / "operations.md").read_text()))
    exposed = {name + ("_total" if kind == "counter" else "") for name, kind in FAMILIES.items()}
    assert documented == exposed


async def test_views_give_the_page_its_rows(database: Database) -> None:
    """The store's views: counts, failed stages and stage times of the synthetic night."""
    await insert_night(database)
    counts = await views.exposure_counts(database.exposures, timeout_s=5)
    assert {(c.observation_type, c.ingest_status): c.n for c in counts}[("science", "failed")] == 1
    errors = await views.recent_errors(database.exposures, 20, timeout_s=5)
    assert {(os.path.basename(e.filename), e.stage, e.error) for e in errors} == {
        ("truncated.fits", "ingest", "truncated FITS file: 100000 bytes on disk, headers describe 1304640"),
        ("science_TESTCAM01_005.fits", "qc", "no reference stars matched"),
        ("science_TESTCAM02_002.fits", "wcs", "no solution found"),
    }
    frames = await views.recent_exposures(database.exposures, ["qc.grade"], 5, timeout_s=5)
    assert len(frames) == 5 and all(set(d) <= {"filename", "qc"} for d in frames)
    times = await views.recent_stage_times(database.exposures, 500, timeout_s=5)
    assert len(times.durations["ingest"]) == 59 and set(times.latencies["seen"]) == {3.0}


def test_page_reads_through_the_store_views() -> None:
    source = Path(page.__file__).read_text()
    assert "views." in source and ".collection" not in source and "pymongo" not in source


async def test_report_scheduler_writes_each_night_once(database: Database, tmp_path: Path) -> None:
    await insert_night(database)
    now = [dt.datetime.fromisoformat(f"{NIGHT}T21:30:00+00:00")]
    config = ReportConfig(auto=True, hour_utc=22, worst_n=3)

    def scheduler() -> ReportScheduler:
        return ReportScheduler(database, config, tmp_path / "reports", LOG, clock=lambda: now[0])

    first = scheduler()
    assert [r.night for r in await first.run_once()] == ["2024-05-09"]  # the night before is over
    now[0] = dt.datetime.fromisoformat(f"{NIGHT}T22:00:30+00:00")
    [result] = await first.run_once()
    assert result.night == NIGHT and not result.empty and len(result.plots) == 4
    assert WORST in result.path.read_text()
    assert await first.run_once() == []
    assert await scheduler().run_once() == []  # a restart does not redo it
    now[0] += dt.timedelta(days=3)  # down for three nights: none is skipped
    assert [r.night for r in await scheduler().run_once()] == ["2024-05-11", "2024-05-12", "2024-05-13"]
    assert await database.db["reports"].count_documents({}) == 5


async def test_flood_gets_200_or_immediate_503_never_hangs(
    database: Database, pool: ComputePool, tmp_path: Path
) -> None:
    await insert_night(database)
    limit = 4
    server = StatusServer(
        HttpConfig(port=0, max_concurrent_requests=limit), database, pool, state=state,
        reports_dir=tmp_path / "reports", log=LOG,
    )
    task = await serve(server)
    clients = 300

    async def one(path: str) -> tuple[int, float]:
        t0 = time.monotonic()
        status, _ = await get(server.port or 0, path)
        return status, time.monotonic() - t0

    try:
        t0 = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(*(one("/" if i % 2 else "/metrics") for i in range(clients))), 60
        )
        elapsed = time.monotonic() - t0
        statuses = Counter(s for s, _ in results)
        assert set(statuses) <= {200, 503}, statuses
        assert statuses[200] >= limit and statuses[503] > 0, statuses
        assert server.refused == statuses[503] and server.active == 0
        # Page and metrics rendered once per cache_s whatever the number of clients.
        assert server.renders <= 2 * (1 + int(elapsed / server.config.cache_s)), (server.renders, elapsed)
        refused_s = sorted(t for s, t in results if s == 503)
        print(f"{clients} concurrent: {dict(statuses)}, 503 answered in p50 "
              f"{refused_s[len(refused_s) // 2] * 1000:.1f} ms, max {refused_s[-1] * 1000:.1f} ms")
        assert (await get(server.port or 0, "/healthz"))[0] == 200  # served normally afterwards

        # Every slot held by a client that never sends its request: the others get 503 at once.
        idle = [await asyncio.open_connection("127.0.0.1", server.port or 0) for _ in range(limit)]
        await wait_for(lambda: _is(server.active == limit), 5)
        busy = await asyncio.wait_for(asyncio.gather(*(one("/") for _ in range(100))), 30)
        assert {s for s, _ in busy} == {503}
        worst = max(t for _, t in busy)
        print(f"all {limit} slots held: 100 requests answered 503 in max {worst * 1000:.1f} ms")
        assert worst < 1.0
        for _, writer in idle:
            writer.close()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # Refused connections wait 1 s for their close; the server's stop closes them at once.
    assert server._closing == 0


async def test_page_queries_have_deadlines(tmp_path: Path, pool: ComputePool) -> None:
    """With the database frozen (SIGSTOP) every page answers 503 within its deadlines."""
    server_db = EmbeddedServer(tmp_path / "db", port=0, log=LOG)
    uri = await server_db.start()
    database = connect(uri, "deadlines", server_selection_timeout_s=1.0)
    await insert_night(database)
    http = StatusServer(
        HttpConfig(port=0, db_timeout_s=0.5, query_timeout_s=0.5, cache_s=0), database, pool, state=state,
        reports_dir=tmp_path / "reports", log=LOG,
    )
    task = await serve(http)
    assert server_db.pid is not None
    try:
        assert (await get(http.port or 0, "/"))[0] == 200
        os.kill(server_db.pid, signal.SIGSTOP)
        try:
            for path in ("/", "/metrics", "/healthz"):
                t0 = time.monotonic()
                status, body = await get(http.port or 0, path)
                elapsed = time.monotonic() - t0
                assert status == 503, (path, status, body[:200])
                assert "database did not answer" in body, body[:300]
                assert elapsed < 3.0, (path, elapsed)
        finally:
            os.kill(server_db.pid, signal.SIGCONT)
        await wait_for(lambda: _ok(http.port or 0), 20, 0.2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await database.close()
        await server_db.stop()


async def _is(value: bool) -> bool:
    return value


async def _ok(port: int) -> bool:
    return (await get(port, "/"))[0] == 200
