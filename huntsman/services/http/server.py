"""The status server: HTTP/1.1 on asyncio streams, admission limits, deadlines and the routes.

Three read-only routes and the report files do not justify a web framework.  One request per
connection (``Connection: close``), GET/HEAD only, bounded request size and read deadline.
Bind it to 127.0.0.1 (the default) and put a proxy in front for anything else.

Under load it protects ingestion, not itself: at most ``http.max_concurrent_requests`` requests
are served at once and any other is answered ``503`` straight away (a prepared response, no
database work), and every database query behind a page has a deadline (the store's views:
``maxTimeMS`` on the server and ``http.query_timeout_s`` here), past which the request is
answered ``503``.  The page and the metrics are rendered at most once per ``http.cache_s``
(:class:`~huntsman.services.http.cache.RenderCache`), so their cost does not grow with the
number of clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from huntsman.config import HttpConfig
from huntsman.logs import Logger
from huntsman.services.disk import DiskMonitor
from huntsman.services.http.cache import RenderCache
from huntsman.services.http.health import Health, HealthChecks
from huntsman.services.http.metrics import CONTENT_TYPE, MetricsExporter, ServiceCollector
from huntsman.services.http.page import StatusPage
from huntsman.services.http.reports import CONTENT_TYPES, report_file
from huntsman.store.database import Database
from huntsman.store.views import QueryTimeout
from huntsman.workers.pool import ComputePool

__all__ = ["StatusServer"]

_MAX_REQUEST = 8192
_BACKLOG = 1024  # a burst of connections is queued by the kernel, not refused with a SYN retry
_READ_TIMEOUT_S = 5.0
_REFUSED_CLOSE_S = 1.0
# Refused connections kept open (answered, awaiting their close) at most a quarter of the file
# descriptors the process may have: past that a refused client is reset at once, so a flood
# cannot exhaust the descriptors the database connections and the workers need.
_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
_MAX_CLOSING = max(64, (_NOFILE if 0 < _NOFILE < 1 << 20 else 1 << 20) // 4)
_PLAIN = "text/plain; charset=utf-8"
_STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_BUSY = (
    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Length: 5\r\nRetry-After: 1\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    "busy\n"
).encode("latin-1")


class Response(NamedTuple):
    status: int
    content_type: str
    body: bytes
    head_only: bool = False


_BAD_REQUEST = Response(400, _PLAIN, b"bad request\n")


class StatusServer:
    """Serves the status page, health and metrics of the running service."""

    def __init__(
        self,
        config: HttpConfig,
        database: Database,
        pool: ComputePool | None,
        *,
        state: Callable[[], dict[str, Any]],
        reports_dir: Path,
        log: Logger,
        disk: DiskMonitor | None = None,
    ) -> None:
        self.config = config
        self.reports_dir = reports_dir
        self._log = log.bind(component="http")
        self._server: asyncio.Server | None = None
        self.port: int | None = None
        self.ready = asyncio.Event()
        self.requests = 0
        self.active = 0  # requests being served now
        self.refused = 0  # answered 503 at once because max_concurrent_requests were active
        # Refused connections answered and waiting for their close, with the timer closing each.
        self._refused_open: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}
        self.health = HealthChecks(config, database, pool, disk)
        self.metrics = MetricsExporter(
            database.exposures,
            ServiceCollector(state, pool, disk, self.health, refused=lambda: self.refused),
            config.query_timeout_s,
        )
        self.page = StatusPage(
            database.exposures,
            pool,
            state=state,
            health=self.health.check,
            reports_dir=reports_dir,
            timeout_s=config.query_timeout_s,
        )
        self._cache = RenderCache(config.cache_s)

    @property
    def renders(self) -> int:
        """Pages and metrics actually rendered (the others came from the cache)."""
        return self._cache.renders

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.config.is_loopback():
            self._log.warning(
                "http_remote_bind",
                host=self.config.host,
                port=self.config.port,
                note="the status page is reachable from the network",
            )
        self._server = await asyncio.start_server(
            self._handle, self.config.host, self.config.port, limit=_MAX_REQUEST, backlog=_BACKLOG
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._log.info("http_started", host=self.config.host, port=self.port)
        self.ready.set()

    async def run(self) -> None:
        """Serve until cancelled (intake stage of the shutdown), measuring event-loop lag."""
        await self.start()
        try:
            await self.health.probe_loop()
        finally:
            await self.stop()

    async def stop(self) -> None:
        server, self._server = self._server, None
        self._cache.cancel()
        for transport, timer in list(self._refused_open.items()):  # their answer is written
            timer.cancel()
            self._close_refused(transport)
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
            self._log.info("http_stopped")

    # -- connections ----------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.config.max_concurrent_requests:
            self._refuse(writer)
            return
        self.active += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.active -= 1

    def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """Too many requests at once: a prepared 503, no parsing and no database work.

        As cheap as it can be on streams: one write and a half-close, then the handler is done.
        The socket itself is closed a second later by a timer (not at once: closing with the
        request still unread would reset the connection before the client read the answer).
        """
        self.refused += 1
        transport = writer.transport
        if self._closing >= _MAX_CLOSING:
            transport.abort()  # a client that retries at once: no descriptor kept for it
            return
        try:
            transport.write(_BUSY)
            if transport.can_write_eof():
                transport.write_eof()
        except (ConnectionError, OSError, RuntimeError):
            transport.abort()
            return
        timer = asyncio.get_running_loop().call_later(_REFUSED_CLOSE_S, self._close_refused, transport)
        self._refused_open[transport] = timer

    @property
    def _closing(self) -> int:
        return len(self._refused_open)

    def _close_refused(self, transport: asyncio.BaseTransport) -> None:
        self._refused_open.pop(transport, None)
        transport.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            response = await self._respond(reader)
        except QueryTimeout as exc:
            self._log.warning("http_query_timeout", error=str(exc))
            response = Response(503, _PLAIN, f"{exc}\n".encode())
        except Exception:
            self._log.exception("http_error")
            response = Response(500, _PLAIN, b"internal error\n")
        self.requests += 1
        head = (
            f"HTTP/1.1 {response.status} {_STATUS_TEXT.get(response.status, 'Error')}\r\n"
            f"Content-Type: {response.content_type}\r\nContent-Length: {len(response.body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode("latin-1") + (b"" if response.head_only else response.body))
            await asyncio.wait_for(writer.drain(), _READ_TIMEOUT_S)
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _respond(self, reader: asyncio.StreamReader) -> Response:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return _BAD_REQUEST
        parts = raw.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            return _BAD_REQUEST
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return Response(405, _PLAIN, b"method not allowed\n")
        response = await self._route(target)
        return response._replace(head_only=method == "HEAD")

    # -- routes ---------------------------------------------------------------------------
    async def _route(self, target: str) -> Response:
        if target == "/healthz":
            health: Health = await self.health.check()
            return Response(200 if health.ok else 503, _PLAIN, health.text().encode())
        if target == "/metrics":
            return Response(
                200, CONTENT_TYPE, (await self._cache.get("metrics", self.metrics.render)).encode()
            )
        if target in ("/", "/index.html"):
            return Response(
                200, CONTENT_TYPES["html"], (await self._cache.get("page", self.page.render)).encode()
            )
        if target.startswith("/reports/"):
            found = await asyncio.to_thread(report_file, self.reports_dir, target)
            if found is not None:
                return Response(200, *found)
        return Response(404, _PLAIN, b"not found\n")
