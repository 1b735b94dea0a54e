"""Built-in HTTP endpoint: status page ``/``, ``/healthz`` and ``/metrics`` (Prometheus text).

A tiny HTTP/1.1 server on asyncio streams (``asyncio.start_server``): three read-only routes and
the report PNGs do not justify a web framework.  One request per connection
(``Connection: close``), GET/HEAD only, bounded request size and read deadline.  Bind it to
127.0.0.1 (the default) and put a proxy in front for anything else.

Under load it protects ingestion, not itself: at most ``http.max_concurrent_requests`` requests
are served at once and any other is answered ``503`` straight away (a prepared response, no
database work), and every database query behind a page has a deadline (``maxTimeMS`` on the
server and ``http.query_timeout_s`` here), past which the request is answered ``503``.  The
page and the metrics are rendered at most once per ``http.cache_s`` (concurrent requests share
one rendering), so their cost does not grow with the number of clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import html
import math
import os
import re
import resource
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from huntsman import __version__
from huntsman.config import HttpConfig
from huntsman.logs import Logger
from huntsman.models import utcnow
from huntsman.report.data import get_path, number
from huntsman.report.html import CSS, fmt
from huntsman.report.html import table as _table
from huntsman.services.disk import DiskMonitor
from huntsman.store.database import Database
from huntsman.workers.pool import ComputePool

__all__ = ["Health", "QueryTimeout", "StatusServer", "quantiles"]

_T = TypeVar("_T")
_MAX_REQUEST = 8192
_BACKLOG = 1024  # a burst of connections is queued by the kernel, not refused with a SYN retry
_READ_TIMEOUT_S = 5.0
_REFUSED_CLOSE_S = 1.0
# Refused connections kept open (answered, awaiting their close) at most a quarter of the file
# descriptors the process may have: past that a refused client is reset at once, so a flood
# cannot exhaust the descriptors the database connections and the workers need.
_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
_MAX_CLOSING = max(64, (_NOFILE if 0 < _NOFILE < 1 << 20 else 1 << 20) // 4)
_NIGHT = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.(png|html)$")
_QUANTILES = (0.5, 0.9, 0.99)
_RECENT_DOCS = 500
_STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_CONTENT_TYPES = {"png": "image/png", "html": "text/html; charset=utf-8"}
LATENCY_STAGES = (("seen", "file_seen"), ("ingested", "ingested"), ("solved", "solved"), ("qc", "qc_done"))
DURATION_FIELDS = (("ingest", "ingest.duration_s"), ("solve", "wcs.solve_time_s"), ("qc", "qc.duration_s"))


class QueryTimeout(Exception):
    """A database query of a page missed its deadline."""


_BUSY = (
    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Length: 5\r\nRetry-After: 1\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    "busy\n"
).encode("latin-1")


@dataclasses.dataclass(frozen=True)
class Health:
    ok: bool
    checks: dict[str, str]  # check -> "ok" or the reason it failed


def quantiles(values: Sequence[float], qs: Sequence[float] = _QUANTILES) -> dict[float, float]:
    """Nearest-rank quantiles (no interpolation: each is a value that was observed)."""
    ordered = sorted(values)
    if not ordered:
        return {q: math.nan for q in qs}
    return {q: ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] for q in qs}


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: Any) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def _num(value: float) -> str:
    f = float(value)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    return repr(f)


class _Metrics:
    """Prometheus text exposition format 0.0.4."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: Any) -> None:
        self.lines.append(f"{name}{_labels(**labels)} {_num(value)}")

    def summary(self, name: str, values: Sequence[float], **labels: Any) -> None:
        for q, v in quantiles(values).items():
            self.sample(name, v, **labels, quantile=q)
        self.sample(f"{name}_sum", sum(values), **labels)
        self.sample(f"{name}_count", len(values), **labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


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
        self.disk = disk
        self.database = database
        self.pool = pool
        self.state = state
        self.reports_dir = reports_dir
        self._log = log.bind(component="http")
        self._server: asyncio.Server | None = None
        self.port: int | None = None
        self.ready = asyncio.Event()
        self.loop_lag_s = 0.0
        self._pool_cache: tuple[float, str] | None = None
        self.requests = 0
        self.active = 0  # requests being served now
        self.refused = 0  # answered 503 at once because max_concurrent_requests were active
        self._closing = 0  # refused connections answered and waiting for their close
        self.renders = 0  # pages and metrics actually rendered (the others came from the cache)
        self._cache: dict[str, tuple[float, asyncio.Task[str]]] = {}

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.config.is_loopback():
            self._log.warning("http_remote_bind", host=self.config.host, port=self.config.port,
                              note="the status page is reachable from the network")
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
            await self._probe_loop()
        finally:
            await self.stop()

    async def stop(self) -> None:
        server, self._server = self._server, None
        for _, task in self._cache.values():
            task.cancel()
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
            self._log.info("http_stopped")

    async def _probe_loop(self, interval_s: float = 0.25) -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(interval_s)
            self.loop_lag_s = max(0.0, time.monotonic() - start - interval_s)

    # -- health ---------------------------------------------------------------------------
    async def health(self) -> Health:
        checks: dict[str, str] = {}
        lag = self.loop_lag_s
        checks["loop"] = "ok" if lag <= self.config.max_loop_lag_s else f"event loop lag {lag:.2f} s"
        checks["pool"] = await self._pool_health()
        checks["database"] = await self._database_health()
        if self.disk is not None:
            checks["disk"] = self.disk.reason() or "ok"
        return Health(all(v == "ok" for v in checks.values()), checks)

    async def _database_health(self) -> str:
        try:
            await asyncio.wait_for(self.database.check(), self.config.db_timeout_s)
        except TimeoutError:
            return f"database did not answer within {self.config.db_timeout_s:g} s"
        except Exception as exc:
            return f"database check failed: {type(exc).__name__}: {exc}"[:300]
        return "ok"

    async def _pool_health(self, cache_s: float = 5.0) -> str:
        """A trivial job through the executor (not the job slots: never queued behind work)."""
        if self.pool is None:
            return "ok"
        now = time.monotonic()
        if self._pool_cache is not None and now - self._pool_cache[0] < cache_s:
            return self._pool_cache[1]
        executor = self.pool.executor
        if getattr(executor, "_broken", False):
            result = "worker pool is broken"
        else:
            try:
                fut = asyncio.get_running_loop().run_in_executor(executor, os.getpid)
                await asyncio.wait_for(fut, self.config.pool_timeout_s)
                result = "ok"
            except TimeoutError:
                # Every worker busy on long jobs is not a fault; an idle pool that cannot run
                # a no-op is.
                result = (
                    "ok"
                    if self.pool.in_flight > 0
                    else (f"pool did not run a no-op within {self.config.pool_timeout_s:g} s")
                )
            except Exception as exc:
                result = f"pool unusable: {type(exc).__name__}: {exc}"
        self._pool_cache = (time.monotonic(), result)
        return result

    # -- HTTP -----------------------------------------------------------------------------
    async def _query(self, query: Awaitable[_T]) -> _T:
        """One database query of a page, within ``query_timeout_s``."""
        try:
            return await asyncio.wait_for(query, self.config.query_timeout_s)
        except TimeoutError:
            raise QueryTimeout(
                f"database did not answer within {self.config.query_timeout_s:g} s"
            ) from None

    async def _cached(self, key: str, render: Callable[[], Coroutine[Any, Any, str]]) -> str:
        """One rendering shared by every request within ``cache_s`` (and by those that arrive
        while it is being made): a flood of page loads costs the database one query set."""
        if self.config.cache_s <= 0:
            self.renders += 1
            return await render()
        now = time.monotonic()
        entry = self._cache.get(key)
        if entry is None or not _reusable(entry[1], now - entry[0], self.config.cache_s):
            self.renders += 1
            task: asyncio.Task[str] = asyncio.get_running_loop().create_task(
                render(), name=f"http-render-{key}"
            )
            task.add_done_callback(_retrieve)  # a failure nobody waited for is not an error
            entry = self._cache[key] = (now, task)
        # Shielded: a client that goes away does not cancel the rendering the others wait for.
        return await asyncio.shield(entry[1])

    @property
    def _max_time_ms(self) -> int:
        return max(1, int(self.config.query_timeout_s * 1000))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self.config.max_concurrent_requests:
            await self._refuse(reader, writer)
            return
        self.active += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.active -= 1

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
        self._closing += 1
        asyncio.get_running_loop().call_later(_REFUSED_CLOSE_S, self._close_refused, transport)

    def _close_refused(self, transport: asyncio.BaseTransport) -> None:
        self._closing -= 1
        transport.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        plain = "text/plain; charset=utf-8"
        try:
            status, ctype, body, head_only = await self._respond(reader)
        except QueryTimeout as exc:
            self._log.warning("http_query_timeout", error=str(exc))
            status, ctype, body, head_only = 503, plain, f"{exc}\n".encode(), False
        except Exception:
            self._log.exception("http_error")
            status, ctype, body, head_only = 500, plain, b"internal error\n", False
        self.requests += 1
        head = (
            f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode("latin-1") + (b"" if head_only else body))
            await asyncio.wait_for(writer.drain(), _READ_TIMEOUT_S)
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes, bool]:
        plain = "text/plain; charset=utf-8"
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return 400, plain, b"bad request\n", False
        parts = raw.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            return 400, plain, b"bad request\n", False
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, plain, b"method not allowed\n", False
        head_only = method == "HEAD"
        if target == "/healthz":
            health = await self.health()
            lines = ["ok" if health.ok else "unhealthy"]
            lines += [f"{k}: {v}" for k, v in health.checks.items()]
            return (200 if health.ok else 503), plain, ("\n".join(lines) + "\n").encode(), head_only
        if target == "/metrics":
            text = await self._cached("metrics", self.metrics)
            return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode(), head_only
        if target in ("/", "/index.html"):
            return 200, _CONTENT_TYPES["html"], (await self._cached("page", self.page)).encode(), head_only
        if target.startswith("/reports/"):
            found = await asyncio.to_thread(self._report_file, target)
            if found is not None:
                return 200, *found, head_only
        return 404, plain, b"not found\n", head_only

    def _report_file(self, target: str) -> tuple[str, bytes] | None:
        pieces = target.split("/")
        if len(pieces) != 4 or not _NIGHT.match(pieces[2]) or not _FILE.match(pieces[3]):
            return None  # only <reports_dir>/<night>/<file>.{png,html}: no traversal possible
        path = self.reports_dir / pieces[2] / pieces[3]
        if not path.is_file():
            return None
        return _CONTENT_TYPES[pieces[3].rsplit(".", 1)[1]], path.read_bytes()

    # -- metrics --------------------------------------------------------------------------
    async def _recent(self, limit: int = _RECENT_DOCS) -> list[dict[str, Any]]:
        projection = {
            "_id": 0,
            "timing": 1,
            "ingest.duration_s": 1,
            "wcs.solve_time_s": 1,
            "qc.duration_s": 1,
        }
        cursor = (
            self.database.exposures.collection.find({}, projection)
            .sort("date_obs", -1)
            .limit(limit)
            .max_time_ms(self._max_time_ms)
        )
        return await self._query(cursor.to_list())

    async def metrics(self) -> str:
        m = _Metrics()
        state = self.state()
        m.family("huntsman_info", "gauge", "Service version.")
        m.sample("huntsman_info", 1, version=__version__)
        m.family(
            "huntsman_files_ingested_total",
            "counter",
            "Exposure documents by observation type and ingest status (from the database).",
        )
        for row in await self._query(self.database.exposures.counts_by("observation_type", "ingest.status")):
            m.sample(
                "huntsman_files_ingested_total",
                row["n"],
                observation_type=row.get("observation_type") or "unknown",
                status=row.get("ingest_status") or "unknown",
            )
        m.family("huntsman_stage_outcomes_total", "counter", "Outcomes of this process's stages since start.")
        for stage, key in (("ingest", "counts"), ("solve", "solve_counts")):
            for outcome, n in sorted((state.get(key) or {}).items()):
                m.sample("huntsman_stage_outcomes_total", n, stage=stage, outcome=outcome)
        m.family("huntsman_queue_depth", "gauge", "Items waiting in each bounded queue.")
        for queue, depth in _queue_depths(state).items():
            m.sample("huntsman_queue_depth", depth, queue=queue)
        m.family("huntsman_pool_in_flight", "gauge", "Jobs running in the compute pool.")
        m.sample("huntsman_pool_in_flight", self.pool.in_flight if self.pool else 0)
        m.family("huntsman_pool_rebuilds_total", "counter", "Compute pool rebuilds (hung or dead workers).")
        m.sample("huntsman_pool_rebuilds_total", self.pool.rebuilds if self.pool else 0)
        m.family("huntsman_event_loop_lag_seconds", "gauge", "Latest measured event-loop lag.")
        m.sample("huntsman_event_loop_lag_seconds", self.loop_lag_s)
        if self.disk is not None:
            m.family("huntsman_disk_free_bytes", "gauge", "Free space of each watched directory.")
            for name, space in sorted(self.disk.spaces.items()):
                m.sample("huntsman_disk_free_bytes", space.free_mb * 1024 * 1024, directory=name)
            m.family("huntsman_disk_low", "gauge", "1 while a directory's free space is below the threshold.")
            low = set(self.disk.low())
            for name in sorted(self.disk.spaces):
                m.sample("huntsman_disk_low", int(name in low), directory=name)
        m.family("huntsman_http_refused_total", "counter", "Requests answered 503 at once (too many).")
        m.sample("huntsman_http_refused_total", self.refused)
        recent = await self._recent()
        m.family(
            "huntsman_stage_duration_seconds",
            "summary",
            f"Work time per stage over the {_RECENT_DOCS} most recent exposures.",
        )
        for stage, field in DURATION_FIELDS:
            values = [v for d in recent if (v := number(get_path(d, field))) is not None]
            m.summary("huntsman_stage_duration_seconds", values, stage=stage)
        m.family(
            "huntsman_latency_seconds",
            "summary",
            f"From shutter close (else file seen) to each stage, {_RECENT_DOCS} most recent exposures.",
        )
        for stage, field in LATENCY_STAGES:
            values = []
            for d in recent:
                timing = d.get("timing") or {}
                start = timing.get("shutter_close") or (
                    timing.get("file_seen") if field != "file_seen" else None
                )
                end = timing.get(field)
                if isinstance(start, dt.datetime) and isinstance(end, dt.datetime):
                    values.append((end - start).total_seconds())
            m.summary("huntsman_latency_seconds", values, stage=stage)
        return m.text()

    # -- the page -------------------------------------------------------------------------
    def _latest_report(self) -> tuple[str, list[str]] | None:
        if not self.reports_dir.is_dir():
            return None
        nights = sorted(
            (
                p.name
                for p in self.reports_dir.iterdir()
                if _NIGHT.match(p.name) and (p / "index.html").is_file()
            ),
            reverse=True,
        )
        if not nights:
            return None
        pngs = sorted(p.name for p in (self.reports_dir / nights[0]).glob("*.png") if _FILE.match(p.name))
        return nights[0], pngs

    async def page(self) -> str:
        state = self.state()
        health = await self.health()
        e = html.escape
        parts = [
            f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="refresh" content="30"><title>huntsman status</title>'
            f"<style>{CSS}</style></head><body><h1>huntsman status</h1>"
            f'<p class="meta">{e(utcnow().strftime("%Y-%m-%d %H:%M:%S UTC"))} — huntsman {e(__version__)}'
            f' — <a href="/metrics">metrics</a> — <a href="/healthz">healthz</a></p>',
            f'<p id="health" class="{"good" if health.ok else "bad"}">'
            f"{'healthy' if health.ok else 'UNHEALTHY'}: "
            + "; ".join(f"{e(k)} {e(v)}" for k, v in health.checks.items())
            + "</p>",
        ]
        queues = list(_queue_depths(state).items())
        rows = [[f"<td>{e(q)}</td>", f'<td class="num">{e(fmt(n))}</td>'] for q, n in queues if n is not None]
        rows.append(
            ["<td>pool in flight</td>", f'<td class="num">{self.pool.in_flight if self.pool else 0}</td>']
        )
        parts.append("<h2>Queues</h2>" + _table(["queue", "depth"], rows, "queues"))
        counts = await self._query(self.database.exposures.counts_by("observation_type", "ingest.status"))
        rows = [
            [
                f"<td>{e(fmt(r.get('observation_type')))}</td>",
                f"<td>{e(fmt(r.get('ingest_status')))}</td>",
                f'<td class="num">{r["n"]}</td>',
            ]
            for r in counts
        ]
        parts.append("<h2>Exposures</h2>" + _table(["type", "ingest", "files"], rows, "counts"))
        parts.append(await self._recent_frames_html())
        latest = await asyncio.to_thread(self._latest_report)
        parts.append("<h2>Latest night report</h2>")
        if latest is None:
            parts.append("<p>No report written yet (<code>huntsman report</code>).</p>")
        else:
            night, pngs = latest
            parts.append(f'<p><a href="/reports/{night}/index.html">night {night}</a></p>')
            parts.append(
                '<div class="plots grid">'
                + "".join(f'<img src="/reports/{night}/{e(p)}" alt="{e(p)}">' for p in pngs)
                + "</div>"
            )
        parts.append(await self._errors_html())
        return "\n".join(parts) + "</body></html>\n"

    async def _recent_frames_html(self, n: int = 20) -> str:
        e = html.escape
        columns = (
            ("observation_type", 0),
            ("camera", 0),
            ("physical_filter", 0),
            ("date_obs", 0),
            ("ingest.status", 0),
            ("metrics.fwhm_arcsec", 2),
            ("wcs.status", 0),
            ("qc.status", 0),
            ("qc.grade", 0),
            ("qc.fwhm_arcsec", 2),
            ("qc.zeropoint", 3),
            ("qc.sky_mag_arcsec2", 2),
            ("qc.limiting_mag_5sigma", 2),
        )
        cursor = (
            self.database.exposures.collection.find({}, {"_id": 0, "header": 0})
            .sort("date_obs", -1)
            .limit(n)
            .max_time_ms(self._max_time_ms)
        )
        rows = []
        for doc in await self._query(cursor.to_list()):
            cells = [f"<td><code>{e(os.path.basename(str(doc.get('filename'))))}</code></td>"]
            for field, digits in columns:
                value = get_path(doc, field)
                cells.append(f"<td>{e(fmt(value, digits))}</td>")
            rows.append(cells)
        headers = [
            "file",
            "type",
            "camera",
            "filter",
            "UTC",
            "ingest",
            "raw FWHM″",
            "wcs",
            "QC",
            "grade",
            "QC FWHM″",
            "ZP",
            "sky",
            "lim. mag",
        ]
        return f"<h2>Recent {n} frames</h2>" + _table(headers, rows, "recent")

    async def _errors_html(self, n: int = 20) -> str:
        e = html.escape
        query = {
            "$or": [
                {"ingest.status": {"$in": ["failed", "quarantined"]}},
                {"wcs.status": "failed"},
                {"qc.status": "failed"},
            ]
        }
        cursor = (
            self.database.exposures.collection.find(
                query,
                {
                    "_id": 0,
                    "filename": 1,
                    "ingest": 1,
                    "wcs.status": 1,
                    "wcs.error": 1,
                    "qc.status": 1,
                    "qc.error": 1,
                    "date_modified": 1,
                },
            )
            .sort("date_modified", -1)
            .limit(n)
            .max_time_ms(self._max_time_ms)
        )
        rows = []
        for doc in await self._query(cursor.to_list()):
            for stage in ("ingest", "wcs", "qc"):
                if get_path(doc, f"{stage}.status") in ("failed", "quarantined"):
                    rows.append(
                        [
                            f"<td><code>{e(str(doc.get('filename')))}</code></td>",
                            f"<td>{stage}</td>",
                            f"<td>{e(str(get_path(doc, f'{stage}.error') or '—'))}</td>",
                        ]
                    )
        return "<h2>Recent errors</h2>" + (
            _table(["file", "stage", "error"], rows, "errors") if rows else "<p>None.</p>"
        )


def _reusable(task: asyncio.Task[str], age_s: float, cache_s: float) -> bool:
    """A rendering under way, or one that succeeded less than ``cache_s`` ago."""
    if not task.done():
        return True
    return not task.cancelled() and task.exception() is None and age_s < cache_s


def _retrieve(task: asyncio.Task[str]) -> None:
    if not task.cancelled():
        task.exception()


def _queue_depths(state: dict[str, Any]) -> dict[str, int]:
    """Queue depths from the application's state (the same record as the heartbeat)."""
    qc = state.get("qc")
    qc = qc if isinstance(qc, dict) else {}
    depths = {"ingest": state.get("ingest_queue"), "solve": state.get("solve_queue"), "qc": qc.get("queue")}
    return {k: int(v) for k, v in depths.items() if isinstance(v, int)}
