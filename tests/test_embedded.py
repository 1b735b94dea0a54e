"""The embedded server: start, answer, stop; a leftover from a killed run never blocks a start."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from huntsman.logs import get_logger
from huntsman.store.database import connect
from huntsman.store.embedded import STATE_FILE, EmbeddedServer, find_running

pytestmark = pytest.mark.service  # real database servers, started and killed


async def test_start_write_restart_keeps_data(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "db", port=0)
    uri = await server.start()
    assert find_running(tmp_path / "db") == uri
    db = connect(uri, "persist")
    await db.ensure_indexes()
    await db.db["exposures"].insert_one({"filename": "/raw/a.fits"})
    await db.close()
    await server.stop()
    assert not (tmp_path / "db" / STATE_FILE).exists()
    assert find_running(tmp_path / "db") is None

    again = EmbeddedServer(tmp_path / "db", port=0)
    db = connect(await again.start(), "persist")
    try:
        assert await db.exposures.get("/raw/a.fits") is not None
    finally:
        await db.close()
        await again.stop()


async def test_leftover_server_from_killed_run_is_replaced(tmp_path: Path) -> None:
    first = EmbeddedServer(tmp_path / "db", port=0)
    await first.start()
    leftover_pid = first.pid
    assert leftover_pid is not None
    # The owning process "dies": the kernel drops its lock, its server keeps running.
    first._proc = None
    first._lock.release()
    second = EmbeddedServer(tmp_path / "db", port=0, log=get_logger())
    try:
        uri = await second.start()
        assert second.pid != leftover_pid
        assert not psutil.pid_exists(leftover_pid) or psutil.Process(leftover_pid).status() == "zombie"
        db = connect(uri, "x")
        assert await db.ping()
        await db.close()
    finally:
        await second.stop()


async def test_busy_port_falls_back_to_a_free_one(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        server = EmbeddedServer(tmp_path / "db", port=busy, log=get_logger())
        try:
            await server.start()
            assert server.port != busy
        finally:
            await server.stop()


async def test_stale_state_file_is_ignored(tmp_path: Path) -> None:
    storage = tmp_path / "db"
    storage.mkdir()
    # A state file naming a pid that is not our server (here: this test process).
    (storage / STATE_FILE).write_text(json.dumps({"pid": os.getpid(), "port": 1}))
    assert find_running(storage) is None
    server = EmbeddedServer(storage, port=0)
    try:
        await server.start()
        assert psutil.pid_exists(os.getpid())  # we were not killed as a "leftover"
    finally:
        await server.stop()


async def test_server_that_dies_at_start_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "db"
    blocker.mkdir()
    (blocker / "data").write_text("a file where the storage directory should be")
    server = EmbeddedServer(blocker, port=0, start_timeout_s=20)
    with pytest.raises(Exception, match="embedded server"):
        await server.start()
    await server.stop()
    assert signal.SIGTERM  # the server process is gone either way
