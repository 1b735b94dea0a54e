"""The night report: ``<reports_dir>/<night>/index.html`` with PNG plots next to it.

Gathering reads the database (async); plotting and writing are synchronous and run in a
thread (``asyncio.to_thread``), so the event loop never blocks on matplotlib.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from huntsman.paths import inside, make_dirs, write_atomic
from huntsman.report.data import NightData, gather_night, last_completed_night
from huntsman.store.database import Database

__all__ = ["ReportResult", "gather_night", "last_completed_night", "render_report", "write_report"]


@dataclasses.dataclass(frozen=True)
class ReportResult:
    night: str
    path: Path
    plots: tuple[str, ...]
    points: dict[str, dict[str, int]]  # camera -> field -> points plotted
    n_exposures: int
    n_science: int
    empty: bool


def render_report(data: NightData, out_dir: Path, *, root: Path | None = None) -> ReportResult:
    """Plots and page into ``out_dir`` (synchronous: call it in a thread).

    With ``root`` (the service's ``paths.reports_dir``) ``out_dir`` must lie inside it and is
    created without following links out of it; every file is written atomically.
    """
    from huntsman.report.html import render_html
    from huntsman.report.plots import render_plots

    if root is not None:
        make_dirs(out_dir, root)
        inside(out_dir, root)
    else:  # a directory the operator named on the command line
        out_dir.mkdir(parents=True, exist_ok=True)
    plots = render_plots(data, out_dir) if not data.empty else {}
    page = render_html(data, plots).encode("utf-8")
    path = out_dir / "index.html"
    write_atomic(path, lambda stream: stream.write(page))  # the status page never sees half a page
    names = [*plots.get("cameras", {}).values(), plots.get("field"), plots.get("frames")]
    return ReportResult(
        night=data.night,
        path=path,
        plots=tuple(n for n in names if n),
        points=dict(plots.get("points", {})),
        n_exposures=data.n_exposures,
        n_science=len(data.science),
        empty=data.empty,
    )


async def write_report(
    database: Database, night: str, out_dir: Path, *, worst_n: int = 10, root: Path | None = None
) -> ReportResult:
    """Gather the night from the database, then plot and write without blocking the loop."""
    data = await gather_night(database, night, worst_n=worst_n)
    return await asyncio.to_thread(render_report, data, out_dir, root=root)
