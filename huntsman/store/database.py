"""Connecting to MongoDB (or the embedded server) and the repositories on top of it."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

from pymongo import AsyncMongoClient

from huntsman.config import DatabaseConfig
from huntsman.models import utcnow
from huntsman.store.calibs import CalibCollection
from huntsman.store.embedded import EmbeddedServer, find_running
from huntsman.store.exposures import ExposureCollection

__all__ = ["Database", "ServiceRegistry", "connect", "open_database"]


class ServiceRegistry:
    """The ``service`` collection: one heartbeat document per running service instance."""

    def __init__(self, collection: Any) -> None:
        self.collection = collection
        self.instance = f"{socket.gethostname()}:{os.getpid()}"

    async def beat(self, state: dict[str, Any]) -> None:
        now = utcnow()
        await self.collection.update_one(
            {"_id": self.instance},
            {"$set": {**state, "heartbeat": now, "pid": os.getpid(), "host": socket.gethostname()},
             "$setOnInsert": {"started": now}},
            upsert=True,
        )

    async def stopped(self) -> None:
        await self.collection.update_one(
            {"_id": self.instance}, {"$set": {"stopped": utcnow(), "running": False}}
        )

    async def latest(self) -> dict[str, Any] | None:
        return await self.collection.find_one({}, sort=[("heartbeat", -1)])

    async def fresh(self, stale_s: float) -> dict[str, Any] | None:
        """The newest heartbeat if it is younger than ``stale_s`` and not marked stopped."""
        doc = await self.latest()
        if doc is None or not doc.get("running", False):
            return None
        age = (utcnow() - doc["heartbeat"]).total_seconds()
        return doc if age <= stale_s else None


class Database:
    """The client and the repositories of one database."""

    def __init__(self, client: AsyncMongoClient[dict[str, Any]], name: str) -> None:
        self.client = client
        self.db = client[name]
        self.exposures = ExposureCollection(self.db["exposures"])
        self.calibs = CalibCollection(self.db["calibs"], self.db["calib_status"])
        self.services = ServiceRegistry(self.db["service"])

    async def ensure_indexes(self) -> None:
        await self.exposures.ensure_indexes()
        await self.calibs.ensure_indexes()

    async def ping(self) -> bool:
        await self.client.admin.command("ping")
        return True

    async def close(self) -> None:
        await self.client.close()


def connect(uri: str, name: str, server_selection_timeout_s: float = 5.0) -> Database:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        uri,
        tz_aware=True,
        tzinfo=dt.UTC,
        serverSelectionTimeoutMS=int(server_selection_timeout_s * 1000),
        appname="huntsman",
    )
    return Database(client, name)


@contextlib.asynccontextmanager
async def open_database(
    config: DatabaseConfig, log: Any, *, reuse_running: bool = False
) -> AsyncIterator[Database]:
    """The configured database; starts (and finally stops) the embedded server if needed.

    With ``reuse_running`` (command-line tools), an embedded server already started by a
    running service on the same storage is used instead of starting a second one.
    """
    server: EmbeddedServer | None = None
    uri = config.uri
    if uri == "embedded":
        running = find_running(config.embedded.storage_dir) if reuse_running else None
        if running is not None:
            uri = running
        else:
            server = EmbeddedServer(
                config.embedded.storage_dir,
                port=config.embedded.port,
                start_timeout_s=config.embedded.start_timeout_s,
                stop_timeout_s=config.embedded.stop_timeout_s,
                log=log,
            )
            uri = await server.start()
            log.info("embedded_server_started", port=server.port, pid=server.pid,
                     storage=str(server.data_dir))
    database = connect(uri, config.name, config.server_selection_timeout_s)
    try:
        await database.ping()
        yield database
    finally:
        await database.close()
        if server is not None:
            await server.stop()
            log.info("embedded_server_stopped")
