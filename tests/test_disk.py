"""A full disk pauses the writers and they resume by themselves: real tmpfs, real service.

Mounting a tmpfs needs root (CI runs as root): those tests are marked ``root``; elsewhere they
skip with the reason (and fail in CI, :mod:`tests.support.needs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymongo.errors import PyMongoError
from structlog.testing import capture_logs

from huntsman.app import make_calib_service, make_pool
from huntsman.config import DiskConfig
from huntsman.logs import get_logger
from huntsman.services.disk import DiskMonitor, is_disk_full
from huntsman.store.database import Database
from tests.conftest import ServiceHandle, copy_sample, make_config, wait_for
from tests.support.needs import lacking, missing_root
from tests.test_http import get

LOG = get_logger(test="disk")
MB = 1024 * 1024


@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` mounted at ``path`` for the duration (a missing need if impossible)."""
    path.mkdir(parents=True, exist_ok=True)
    if (reason := missing_root()) is not None:
        lacking(f"mounting a tmpfs {reason}")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path)],
        capture_output=True, text=True, timeout=30,
    )
    if done.returncode != 0:
        lacking(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", 16) as path:
        yield path


@pytest.fixture
def var_fs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "var", 160) as path:
        yield path


def fill(path: Path, leave_mb: float = 0.0, max_fs_mb: float = 256.0) -> int:
    """Write a ballast file until the filesystem is full (or only ``leave_mb`` is left).

    Refuses a filesystem larger than ``max_fs_mb``: only ever the small tmpfs of a test.
    """
    st = os.statvfs(path.parent)
    size_mb = st.f_blocks * st.f_frsize / MB
    if size_mb > max_fs_mb or not os.path.ismount(path.parent):
        raise AssertionError(f"refusing to fill {path.parent} ({size_mb:.0f} MB): not a test tmpfs")
    chunk = b"\0" * MB
    written = 0
    with open(path, "wb") as f:
        while True:
            st = os.statvfs(path.parent)
            if st.f_bavail * st.f_frsize <= leave_mb * MB:
                break
            try:
                f.write(chunk)
                f.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
            written += len(chunk)
    return written


def test_disk_full_is_recognised_through_causes() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("write failed") from exc
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


@pytest.mark.root
async def test_monitor_logs_each_episode_once_and_gates_writers(small_fs: Path) -> None:
    monitor = DiskMonitor(
        DiskConfig(interval_s=0.1, min_free_mb=4.0), {"var_dir": small_fs, "calib_dir": Path("/")}, LOG
    )
    with capture_logs() as logs:
        await monitor.check()
        assert monitor.reason() is None and monitor.low() == []
        task = asyncio.create_task(monitor.run(), name="disk")
        ballast = small_fs / "ballast"
        await asyncio.to_thread(fill, ballast, 1.0)

        async def low() -> bool:
            return monitor.low() == ["var_dir"]

        await wait_for(low, 10)
        reason = monitor.reason()
        assert reason is not None and "var_dir" in reason and str(small_fs) in reason
        assert "calib_dir" not in reason  # only the low filesystem is named
        assert monitor.low(["calib_dir"]) == []
        await monitor.wait_writable("calib_dir")  # another filesystem: no wait

        waiter = asyncio.create_task(monitor.wait_writable())
        checks = monitor.checks
        await wait_for(lambda: _true(monitor.checks >= checks + 3), 10)  # still low: stays paused
        assert not waiter.done()

        # Just above the threshold (4.2 MB free of a 4 MB threshold) is not yet a recovery.
        st = os.statvfs(small_fs)
        free = st.f_bavail * st.f_frsize
        os.truncate(ballast, ballast.stat().st_size - (int(4.2 * MB) - free))
        checks = monitor.checks
        await wait_for(lambda: _true(monitor.checks >= checks + 3), 10)
        assert 4.0 < monitor.spaces["var_dir"].free_mb < 4.4, monitor.spaces
        assert monitor.low() == ["var_dir"] and not waiter.done()
        t0 = time.monotonic()
        await asyncio.to_thread(ballast.unlink)
        await asyncio.wait_for(waiter, 5)
        resumed_s = time.monotonic() - t0
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    events = [e["event"] for e in logs if e["event"] in ("disk_low", "disk_ok")]
    assert events == ["disk_low", "disk_ok"], events  # once per episode, however many checks
    assert monitor.episodes == 1
    assert resumed_s < 2.0


async def _true(value: bool) -> bool:
    return value


@pytest.mark.root
async def test_full_var_dir_pauses_ingestion_and_resumes(
    tmp_path: Path, var_fs: Path, db_name: str
) -> None:
    """The embedded database on a tmpfs var directory filled up while files arrive, then freed:
    every file ends ``ok``, /healthz said 503 with the reason, disk_low and disk_ok were logged."""
    config = make_config(
        tmp_path,
        "embedded",
        db_name,
        var_dir=var_fs,
        raw_dir=tmp_path / "raw",  # the raw tree is on another filesystem, as in production
        database__embedded__port=0,
        http__enabled="true",
        http__port=0,
        http__cache_s=0,
        disk__interval_s=0.2,
        disk__min_free_mb=24,
        astrometry__enabled="false",
        calib__enabled="false",
        qc__enabled="false",
        report__auto="false",
    )
    assert config.paths.var_dir == var_fs and config.database.embedded.storage_dir == var_fs / "db"
    names = ("bias_0", "dark_0", "flat_0", "science_0")
    with capture_logs() as logs:
        handle = await ServiceHandle(config).start()
        app = handle.app
        try:
            await asyncio.wait_for(app.http.ready.wait(), 10)
            port = app.http.port
            before = [copy_sample(n, handle.raw / "before", f"{n}_{i}.fits") for i in range(2) for n in names]

            async def ingested(paths: list[Path]) -> bool:
                docs = await app.database.exposures.count(
                    {"filename": {"$in": [str(p) for p in paths]}, "ingest.status": "ok"}
                )
                return docs == len(paths)

            await wait_for(lambda: ingested(before), 60)
            status, body = await get(port, "/healthz")
            assert status == 200 and "disk: ok" in body, body

            ballast = var_fs / "ballast"
            await asyncio.to_thread(fill, ballast)  # to the last byte: the database sees ENOSPC too

            async def unhealthy() -> bool:
                status, body = await get(port, "/healthz")
                return status == 503 and "disk space low" in body

            await wait_for(unhealthy, 10, 0.1)
            status, body = await get(port, "/healthz")
            disk_line = next(line for line in body.splitlines() if line.startswith("disk:"))
            assert "var_dir" in disk_line and "MB free" in disk_line, body
            status, text = await get(port, "/metrics")
            assert status == 200 and 'huntsman_disk_low{directory="var_dir"} 1' in text
            print(f"while full, /healthz said: {disk_line}")

            during = [copy_sample(n, handle.raw / "during", f"{n}_{i}.fits") for i in range(3) for n in names]
            # The files are seen and wait: none gets a failed document while the disk is full.
            await wait_for(lambda: _true(not app.ingestor.idle()), 10)
            checks = app.disk.checks
            await wait_for(lambda: _true(app.disk.checks >= checks + 5), 10)
            assert await app.database.exposures.count({"ingest.status": {"$ne": "ok"}}) == 0

            await asyncio.to_thread(ballast.unlink)
            await wait_for(lambda: ingested(before + during), 90, 0.2)
            status, body = await get(port, "/healthz")
            assert status == 200 and "disk: ok" in body, body
            status, text = await get(port, "/metrics")
            assert status == 200 and 'huntsman_disk_low{directory="var_dir"} 0' in text
            docs = await app.database.exposures.count({})
            assert docs == len(before) + len(during)
        finally:
            await handle.shutdown()
    events = [e for e in logs if e["event"] in ("disk_low", "disk_ok")]
    assert [e["event"] for e in events] == ["disk_low", "disk_ok"], events
    assert {"var_dir", "database"} <= set(events[0]["directories"])
    assert "disk space low" in events[0]["reason"]
    failures = [e for e in logs if e["event"] in ("ingest_failed", "ingest_crashed")]
    assert failures == []
    refused = [e for e in logs if e["event"] in ("ingest_write_waiting", "heartbeat_failed")]
    print(f"writes refused by the database while full: {len(refused)}",
          sorted({str(e.get("error"))[:120] for e in refused}))


@pytest.mark.root
async def test_database_broken_by_a_full_disk_is_restarted_and_every_file_ends_ok(
    tmp_path: Path, var_fs: Path, db_name: str
) -> None:
    """The disk filled to the last byte faster than the watch could pause the writers (the gate
    is off here): the embedded server's storage breaks (``internal server error`` on every read
    and write, while ``ping`` still answers, even after space returns). The service sees it in
    its health check, restarts the server once the disk has room, and reconciles: every file
    ends ``ok`` without a manual restart."""
    config = make_config(
        tmp_path,
        "embedded",
        db_name,
        var_dir=var_fs,
        raw_dir=tmp_path / "raw",
        database__embedded__port=0,
        database__embedded__unhealthy_restart_s=2,
        database__monitor_interval_s=0.2,
        database__server_selection_timeout_s=2,
        disk__min_free_mb=0,  # no gate: something else filled the disk between two checks
        astrometry__enabled="false",
        calib__enabled="false",
        qc__enabled="false",
        report__auto="false",
    )
    names = ("bias_0", "dark_0", "flat_0", "science_0")
    with capture_logs() as logs:
        handle = await ServiceHandle(config).start()
        app = handle.app
        try:
            before = [copy_sample(n, handle.raw / "before", f"{n}.fits") for n in names]

            async def ingested(paths: list[Path]) -> bool:
                try:
                    docs = await app.database.exposures.count(
                        {"filename": {"$in": [str(p) for p in paths]}, "ingest.status": "ok"}
                    )
                except PyMongoError:  # the broken server refuses reads too
                    return False
                return docs == len(paths)

            await wait_for(lambda: ingested(before), 60)
            ballast = var_fs / "ballast"
            await asyncio.to_thread(fill, ballast)
            during = [copy_sample(n, handle.raw / "during", f"{n}_{i}.fits") for i in range(3) for n in names]

            def seen(event: str) -> bool:
                return any(e["event"] == event for e in logs)

            await wait_for(lambda: _true(seen("embedded_server_unhealthy")), 60, 0.2)
            await asyncio.to_thread(ballast.unlink)
            await wait_for(lambda: ingested(before + during), 120, 0.2)
            assert await app.database.exposures.count({}) == len(before) + len(during)
            # (the documents can be written while the restart is still confirming the server,
            # before the reconciliation that follows it)
            await wait_for(lambda: _true(app.monitor.restarts >= 1), 30)
            await wait_for(lambda: _true(seen("reconciled_after_outage")), 30)
        finally:
            await handle.shutdown()
    unhealthy = [e for e in logs if e["event"] == "embedded_server_unhealthy"]
    assert "internal server error" in unhealthy[0]["error"], unhealthy[0]
    assert any(e["event"] == "embedded_server_restarted" for e in logs)
    assert any(e["event"] == "reconciled_after_outage" for e in logs)


@pytest.mark.root
async def test_write_error_is_recorded_with_the_real_reason_and_gate_waits(
    tmp_path: Path, small_fs: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    """A master written to a full calib filesystem: the status record gives ``[Errno 28] No
    space left on device``; with the gate on, the build waits for space and then succeeds."""
    from tests.test_calib_service import D1, SMALL_GROUPS, ingest, night

    config = make_config(tmp_path, mongo_uri, db_name, calib_dir=small_fs, **SMALL_GROUPS)
    log = get_logger(test="disk")
    pool = make_pool(config, log)
    ballast = small_fs / "ballast"
    try:
        await ingest(database, night(tmp_path / "raw" / D1, D1, {"bias": 3}))
        calib = make_calib_service(config, database, pool, log)
        await asyncio.to_thread(fill, ballast)

        # No gate (the disk filled between the check and the write): the real reason is kept.
        await calib.run_pass(dates={D1}, reason="test")
        [status] = [s async for s in database.calibs.find_status()]
        assert status["state"] == "failed"
        assert "[Errno 28] No space left on device" in status["reason"], status["reason"]
        assert "internal server error" not in status["reason"]

        # With the gate: the build waits while the disk is low, and is built once space returns.
        calib.disk = DiskMonitor(DiskConfig(interval_s=0.1, min_free_mb=1.0), {"calib_dir": small_fs}, log)
        await calib.disk.check()
        monitor = asyncio.create_task(calib.disk.run(), name="disk")
        build = asyncio.create_task(calib.run_pass(dates={D1}, force=True, reason="test"), name="pass")
        checks = calib.disk.checks
        await wait_for(lambda: _true(calib.disk is not None and calib.disk.checks >= checks + 5), 10)
        assert not build.done()
        await asyncio.to_thread(ballast.unlink)
        await asyncio.wait_for(build, 60)
        monitor.cancel()
        [status] = [s async for s in database.calibs.find_status()]
        assert status["state"] == "built", status
        assert await database.calibs.count({}) == 1
    finally:
        await pool.shutdown(2.0)

