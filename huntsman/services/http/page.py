"""The HTML status page ``/``: health, queues, exposure counts, recent frames, latest report, errors.

It renders only: every database read is a view of :mod:`huntsman.store.views` (with its
deadline), every filesystem read runs in a thread.
"""

from __future__ import annotations

import asyncio
import html
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from huntsman import __version__
from huntsman.models import utcnow
from huntsman.report.html import CSS, fmt
from huntsman.report.html import table as _table
from huntsman.services.http.health import Health
from huntsman.services.http.metrics import queue_depths
from huntsman.services.http.reports import latest_report
from huntsman.store import views
from huntsman.store.exposures import ExposureCollection
from huntsman.values import get_path
from huntsman.workers.pool import ComputePool

__all__ = ["StatusPage"]

_RECENT = 20  # rows of the recent-frames and recent-errors tables
# (field, digits) of each recent-frames column after the file name, and its heading
_COLUMNS: tuple[tuple[str, int, str], ...] = (
    ("observation_type", 0, "type"),
    ("camera", 0, "camera"),
    ("physical_filter", 0, "filter"),
    ("date_obs", 0, "UTC"),
    ("ingest.status", 0, "ingest"),
    ("metrics.fwhm_arcsec", 2, "raw FWHM″"),
    ("wcs.status", 0, "wcs"),
    ("qc.status", 0, "QC"),
    ("qc.grade", 0, "grade"),
    ("qc.fwhm_arcsec", 2, "QC FWHM″"),
    ("qc.zeropoint", 3, "ZP"),
    ("qc.sky_mag_arcsec2", 2, "sky"),
    ("qc.limiting_mag_5sigma", 2, "lim. mag"),
)
_e = html.escape


class StatusPage:
    """Renders the page from the health checks, the application's state and the store's views."""

    def __init__(
        self,
        exposures: ExposureCollection,
        pool: ComputePool | None,
        *,
        state: Callable[[], dict[str, Any]],
        health: Callable[[], Awaitable[Health]],
        reports_dir: Path,
        timeout_s: float,
    ) -> None:
        self.exposures = exposures
        self.pool = pool
        self.state = state
        self.health = health
        self.reports_dir = reports_dir
        self.timeout_s = timeout_s

    async def render(self) -> str:
        health = await self.health()
        parts = [_head(health), self._queues_html()]
        counts = await views.exposure_counts(self.exposures, timeout_s=self.timeout_s)
        parts.append(
            "<h2>Exposures</h2>" + _table(["type", "ingest", "files"], _count_rows(counts), "counts")
        )
        frames = await views.recent_exposures(
            self.exposures, [field for field, _, _ in _COLUMNS], _RECENT, timeout_s=self.timeout_s
        )
        parts.append(_recent_frames_html(frames))
        parts.append(_report_html(await asyncio.to_thread(latest_report, self.reports_dir)))
        parts.append(
            _errors_html(await views.recent_errors(self.exposures, _RECENT, timeout_s=self.timeout_s))
        )
        return "\n".join(parts) + "</body></html>\n"

    def _queues_html(self) -> str:
        rows = [
            [f"<td>{_e(q)}</td>", f'<td class="num">{_e(fmt(n))}</td>']
            for q, n in queue_depths(self.state()).items()
        ]
        rows.append(
            ["<td>pool in flight</td>", f'<td class="num">{self.pool.in_flight if self.pool else 0}</td>']
        )
        return "<h2>Queues</h2>" + _table(["queue", "depth"], rows, "queues")


def _head(health: Health) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="30"><title>huntsman status</title>'
        f"<style>{CSS}</style></head><body><h1>huntsman status</h1>"
        f'<p class="meta">{_e(utcnow().strftime("%Y-%m-%d %H:%M:%S UTC"))} — huntsman {_e(__version__)}'
        f' — <a href="/metrics">metrics</a> — <a href="/healthz">healthz</a></p>\n'
        f'<p id="health" class="{"good" if health.ok else "bad"}">'
        f"{'healthy' if health.ok else 'UNHEALTHY'}: "
        + "; ".join(f"{_e(k)} {_e(v)}" for k, v in health.checks.items())
        + "</p>"
    )


def _count_rows(counts: Sequence[views.ExposureCount]) -> list[list[str]]:
    return [
        [
            f"<td>{_e(fmt(c.observation_type))}</td>",
            f"<td>{_e(fmt(c.ingest_status))}</td>",
            f'<td class="num">{c.n}</td>',
        ]
        for c in counts
    ]


def _recent_frames_html(frames: Sequence[dict[str, Any]]) -> str:
    rows = []
    for doc in frames:
        cells = [f"<td><code>{_e(os.path.basename(str(doc.get('filename'))))}</code></td>"]
        cells += [f"<td>{_e(fmt(get_path(doc, field), digits))}</td>" for field, digits, _ in _COLUMNS]
        rows.append(cells)
    headers = ["file", *(heading for _, _, heading in _COLUMNS)]
    return f"<h2>Recent {_RECENT} frames</h2>" + _table(headers, rows, "recent")


def _report_html(latest: tuple[str, list[str]] | None) -> str:
    if latest is None:
        return "<h2>Latest night report</h2>\n<p>No report written yet (<code>huntsman report</code>).</p>"
    night, pngs = latest
    return (
        f'<h2>Latest night report</h2>\n<p><a href="/reports/{night}/index.html">night {night}</a></p>\n'
        '<div class="plots grid">'
        + "".join(f'<img src="/reports/{night}/{_e(p)}" alt="{_e(p)}">' for p in pngs)
        + "</div>"
    )


def _errors_html(errors: Sequence[views.StageError]) -> str:
    rows = [
        [
            f"<td><code>{_e(err.filename)}</code></td>",
            f"<td>{err.stage}</td>",
            f"<td>{_e(err.error or '—')}</td>",
        ]
        for err in errors
    ]
    return "<h2>Recent errors</h2>" + (
        _table(["file", "stage", "error"], rows, "errors") if rows else "<p>None.</p>"
    )
