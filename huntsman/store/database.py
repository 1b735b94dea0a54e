"""Connecting to MongoDB (or the embedded server) and the repositories on top of it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import ConnectionFailure, PyMongoError

from huntsman.config import DatabaseConfig
from huntsman.lock import PidLock
from huntsman.logs import Logger
from huntsman.models import utcnow
from huntsman.store.calibs import CalibCollection
from huntsman.store.embedded import (
    EmbeddedServer,
    EmbeddedServerError,
    StorageBusy,
    wait_for_owner,
)
from huntsman.store.exposures import ExposureCollection

__all__ = [
    "Database", "DatabaseMonitor", "ServiceRegistry", "connect", "database_away", "open_database",
    "retry_writes", "short_error",
]

T = TypeVar("T")

# Errors that mean "the database is away", not "this write is wrong".
UNREACHABLE = (ConnectionFailure,)


class ServiceRegistry:
    """The ``service`` collection: one heartbeat document per running service instance."""

    def __init__(self, collection: AsyncCollection[dict[str, Any]]) -> None:
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
        self.server: EmbeddedServer | None = None  # set when this process runs the server

    async def ensure_indexes(self) -> None:
        await self.exposures.ensure_indexes()
        await self.calibs.ensure_indexes()

    async def ping(self) -> bool:
        await self.client.admin.command("ping")
        return True

    async def check(self) -> None:
        """Raise unless the database answers *and* can read its storage.

        ``ping`` alone is not enough: after its disk filled up, the embedded server answers
        ``ping`` while every read and write fails with ``internal server error`` (measured with
        SecantusDB) until it is restarted.  One indexed read of the small heartbeat collection
        shows a broken storage engine.
        """
        await self.client.admin.command("ping")
        await self.services.collection.find_one({}, projection={"_id": 1})

    async def close(self, timeout_s: float | None = None) -> None:
        """Close the client; with ``timeout_s``, give up waiting on a hung server after it."""
        # On timeout the process is exiting anyway: the sockets close with it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.client.close(), timeout_s)


def short_error(exc: BaseException) -> str:
    """A driver error in one short line (without the topology description it appends)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for cut in (" (configured timeouts", ", Timeout:", ", Topology Description:"):
        text = text.split(cut)[0]
    return text if len(text) <= 200 else text[:197] + "..."


def database_away(exc: BaseException) -> bool:
    """Whether ``exc`` (or every leaf of an exception group) means the database is away."""
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(UNREACHABLE)
        return rest is None
    return isinstance(exc, UNREACHABLE)


async def retry_writes(
    write: Callable[[], Awaitable[T]], *, deadline_s: float, log: Logger, what: str
) -> T:
    """Run ``write``, retrying while the database is unreachable, for up to ``deadline_s``.

    Meant for idempotent writes (upserts by key) whose loss would drop a result, e.g. an
    ingestion outcome while the embedded server is being restarted.  Other errors, and the
    last unreachable one once the deadline has passed, propagate.
    """
    deadline = time.monotonic() + deadline_s
    delay = 0.2
    while True:
        try:
            return await write()
        except UNREACHABLE as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database_write_retry", what=what, error=short_error(exc),
                        retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class DatabaseMonitor:
    """Watches the database; restarts the embedded server when it dies, reports outages.

    ``on_recovered`` runs after every recovery (the service reconciles the raw tree then);
    ``on_lost`` is called once, with a one-line reason, when the database cannot come back:
    more than ``embedded.max_restarts`` restarts without a stable server in between, or an
    outage longer than ``max_outage_s``.  The monitor returns after ``on_lost``.
    """

    STABLE_S = 60.0  # a server that has answered this long resets the restart count

    def __init__(
        self,
        database: Database,
        config: DatabaseConfig,
        log: Logger,
        *,
        on_recovered: Callable[[], None],
        on_lost: Callable[[str], None],
        may_restart: Callable[[], bool] = lambda: True,
    ) -> None:
        self.database = database
        self.server = database.server
        self.config = config
        self.log = log.bind(component="database_monitor")
        self.on_recovered = on_recovered
        self.on_lost = on_lost
        self.may_restart = may_restart
        self.restarts = 0
        self.outages = 0
        self._attempts = 0
        self._up_since = time.monotonic()
        self._outage_since: float | None = None
        self._last_error = ""

    def state(self) -> dict[str, Any]:
        return {"restarts": self.restarts, "outages": self.outages,
                "reachable": self._outage_since is None}

    async def run(self) -> None:
        interval = self.config.monitor_interval_s
        while True:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # a driver call ate the cancellation
                raise asyncio.CancelledError
            if self.server is not None and await self._died(interval):
                if not await self._restart():
                    return
                continue
            if self.server is None:
                await asyncio.sleep(interval)
            if await self._healthy():
                self._up()
            elif not await self._down():
                return

    def _up(self) -> None:
        """A health check passed: end an outage (and reconcile), reset the restart bound."""
        if time.monotonic() - self._up_since > self.STABLE_S:
            self._attempts = 0
        if self._outage_since is not None:
            self.log.info("database_recovered",
                          outage_s=round(time.monotonic() - self._outage_since, 1))
            self._outage_since = None
            self.on_recovered()

    async def _down(self) -> bool:
        """A health check failed: run the outage clock; ``False`` once the database is lost."""
        now = time.monotonic()
        if self._outage_since is not None and not self.may_restart():
            # Its disk is full: that is the disk watch's to report, and writers wait for it.
            # The outage clock (exit, restart) runs only while the disk has room.
            self._outage_since = now
        if self._outage_since is None:
            self._outage_since = now
            self.outages += 1
            self.log.warning("database_unreachable")
        elif now - self._outage_since > self.config.max_outage_s:
            self._lost(f"database unreachable for more than {self.config.max_outage_s:g} s")
            return False
        elif self._unhealthy_server(now):
            self.log.error("embedded_server_unhealthy", error=self._last_error,
                           unhealthy_s=round(now - self._outage_since, 1))
            return await self._restart()
        return True

    async def _died(self, interval_s: float) -> bool:
        """Wait up to ``interval_s`` for the embedded child to exit; whether it did."""
        assert self.server is not None
        try:
            code = await asyncio.wait_for(self.server.wait_exited(), interval_s)
        except TimeoutError:
            return False
        except EmbeddedServerError:  # no child (a failed restart): restart again
            code = None
        self.log.error("embedded_server_died", returncode=code, pid=self.server.pid)
        return True

    async def _healthy(self) -> bool:
        try:
            await asyncio.wait_for(self.database.check(), self.config.server_selection_timeout_s)
        except TimeoutError:
            self._last_error = "no answer within the server selection timeout"
            return False
        except PyMongoError as exc:
            self._last_error = short_error(exc)
            return False
        return True

    def _unhealthy_server(self, now: float) -> bool:
        """An embedded child that runs but has not answered health checks for too long.

        It is restarted (a hung or broken server never heals by itself: e.g. after ``ENOSPC``
        its storage engine refuses everything until a restart), but not while its disk is still
        full, where a restart would fail the same way.
        """
        if self.server is None or self._outage_since is None:
            return False
        limit = self.config.embedded.unhealthy_restart_s
        return limit > 0 and now - self._outage_since > limit and self.may_restart()

    async def _restart(self) -> bool:
        """Restart the embedded server with back-off; ``False`` once the bound is passed."""
        assert self.server is not None
        embedded = self.config.embedded
        while True:
            self._attempts += 1
            if self._attempts > embedded.max_restarts:
                self._lost(
                    f"embedded database restarted {embedded.max_restarts} times without "
                    f"staying up; see {self.server.storage_dir / 'server.log'}"
                )
                return False
            delay = min(embedded.restart_backoff_s * 2 ** (self._attempts - 1), 30.0)
            await asyncio.sleep(delay)
            try:
                await self.server.restart()
            except EmbeddedServerError as exc:
                self.log.error("embedded_restart_failed", attempt=self._attempts, error=str(exc))
                continue
            self.restarts += 1
            self._up_since = time.monotonic()
            self._outage_since = None
            self.log.warning("embedded_server_restarted", attempt=self._attempts,
                             pid=self.server.pid, port=self.server.port)
            self.on_recovered()
            return True

    def _lost(self, reason: str) -> None:
        self.log.error("database_lost", reason=reason)
        self.on_lost(reason)


# Command-line tools: no single database answer may take longer (a hung server must not hang a
# monitoring ``check`` for ever); generous, as one aggregation over a large archive is one answer.
CLI_SOCKET_TIMEOUT_S = 120.0


def connect(
    uri: str, name: str, server_selection_timeout_s: float = 5.0, socket_timeout_s: float | None = None
) -> Database:
    options: dict[str, Any] = {}
    if socket_timeout_s is not None:
        options["socketTimeoutMS"] = int(socket_timeout_s * 1000)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        uri,
        tz_aware=True,
        tzinfo=dt.UTC,
        serverSelectionTimeoutMS=int(server_selection_timeout_s * 1000),
        appname="huntsman",
        **options,
    )
    return Database(client, name)


@contextlib.asynccontextmanager
async def open_database(
    config: DatabaseConfig,
    log: Logger,
    *,
    reuse_running: bool = False,
    close_timeout_s: float | None = None,
    storage_lock: PidLock | None = None,
) -> AsyncIterator[Database]:
    """The configured database; starts (and finally stops) the embedded server if needed.

    With ``reuse_running`` (command-line tools), an embedded server already started by a
    running service on the same storage is used instead of starting a second one; while a
    service owns the storage but its server is not answering yet, the tool waits for it.
    ``close_timeout_s`` bounds the client's close (the service's shutdown budget);
    ``storage_lock`` is the embedded storage's lock when the caller (the service) took it first.
    """
    server: EmbeddedServer | None = None
    uri = config.uri
    embedded = config.embedded
    while uri == "embedded":
        if reuse_running:
            # A live owner (a service, even one still starting or restarting its server)
            # is waited for; a second server on its storage is never started.
            running = await wait_for_owner(embedded.storage_dir, embedded.start_timeout_s)
            if running is not None:
                uri = running
                break
        server = EmbeddedServer(
            embedded.storage_dir,
            port=embedded.port,
            start_timeout_s=embedded.start_timeout_s,
            stop_timeout_s=embedded.stop_timeout_s,
            # The service waits for a command-line tool that owns the storage to finish.
            lock_wait_s=0.0 if reuse_running else embedded.start_timeout_s,
            lock=storage_lock,
            log=log,
        )
        try:
            uri = await server.start()
        except StorageBusy:
            if reuse_running:
                server = None
                continue  # lost the race for the storage to a starting service: use its server
            raise
        log.info("embedded_server_started", port=server.port, pid=server.pid,
                 storage=str(server.data_dir))
    database = connect(
        uri, config.name, config.server_selection_timeout_s,
        socket_timeout_s=CLI_SOCKET_TIMEOUT_S if reuse_running else None,
    )
    database.server = server
    try:
        await database.ping()
        yield database
    finally:
        await database.close(close_timeout_s)
        if server is not None:
            await server.stop()
            log.info("embedded_server_stopped")
