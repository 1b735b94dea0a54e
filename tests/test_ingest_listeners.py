"""A failing ingest listener: the document stays ``ok`` and the failure is the listener's
(``ingest_listener_failed``), not the file's (it used to be logged as ``ingest_crashed``
after the document was written).  Real ingestion job, pool and embedded database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from huntsman.app import ingest_params, make_pool
from huntsman.logs import get_logger
from huntsman.models import FileSource, IngestRequest, utcnow
from huntsman.services.ingestor import FileIngestor
from huntsman.store.database import Database
from tests.conftest import copy_sample, make_config


async def test_a_failing_listener_is_not_an_ingest_crash(
    tmp_path: Path, mongo_uri: str, db_name: str, database: Database
) -> None:
    config = make_config(tmp_path, mongo_uri, db_name)
    log = get_logger(test="ingest-listeners")
    pool = make_pool(config, log)
    heard: list[tuple[str, Any]] = []

    async def broken(path: str, fields: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    async def recorder(path: str, fields: dict[str, Any]) -> None:
        heard.append((path, fields.get("observation_type")))

    direct = copy_sample("bias_0", config.paths.raw_dir)
    queued = copy_sample("dark_0", config.paths.raw_dir)
    try:
        ingestor = FileIngestor(
            database.exposures, pool, ingest_params(config), config.ingest, config.watcher, log,
            concurrency=2,
        )
        ingestor.add_listener(broken)
        ingestor.add_listener(recorder)
        with capture_logs() as logs:
            # Called directly (as the commands do) and through the queue (as the service does).
            assert await ingestor.process(IngestRequest(str(direct), utcnow(), FileSource.CLI)) == "ok"
            async with ingestor.stage.running():
                await ingestor.submit(IngestRequest(str(queued), utcnow(), FileSource.EVENT))
                assert await ingestor.join([str(queued)], timeout_s=60)
    finally:
        await pool.shutdown(2.0)
    events = [e["event"] for e in logs]
    assert "ingest_crashed" not in events
    failed = [e for e in logs if e["event"] == "ingest_listener_failed"]
    assert [e["filename"] for e in failed] == [str(direct), str(queued)]
    assert all("broken" in e["listener"] for e in failed)
    assert heard == [(str(direct), "bias"), (str(queued), "dark")]  # the other listener still ran
    assert events.count("exposure_ingested") == 2
    for path in (direct, queued):
        doc = await database.exposures.get(str(path))
        assert doc is not None and doc["ingest"]["status"] == "ok" and doc["ingest"]["tries"] == 1
    assert ingestor.counts["ok"] == 2 and ingestor.idle()
