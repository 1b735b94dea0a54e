"""Which night-report files the status server exposes: ``<reports_dir>/<night>/<file>.{png,html}``.

Both functions touch the filesystem: callers run them in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["latest_report", "report_file"]

_NIGHT = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.(png|html)$")
CONTENT_TYPES = {"png": "image/png", "html": "text/html; charset=utf-8"}


def report_file(reports_dir: Path, target: str) -> tuple[str, bytes] | None:
    """Content type and bytes of ``/reports/<night>/<file>``, ``None`` for anything else."""
    pieces = target.split("/")
    if len(pieces) != 4 or not _NIGHT.match(pieces[2]) or not _FILE.match(pieces[3]):
        return None  # only <reports_dir>/<night>/<file>.{png,html}: no traversal possible
    path = reports_dir / pieces[2] / pieces[3]
    if not path.is_file():
        return None
    return CONTENT_TYPES[pieces[3].rsplit(".", 1)[1]], path.read_bytes()


def latest_report(reports_dir: Path) -> tuple[str, list[str]] | None:
    """The newest night with an ``index.html`` and its plots, ``None`` when there is none."""
    if not reports_dir.is_dir():
        return None
    nights = sorted(
        (p.name for p in reports_dir.iterdir() if _NIGHT.match(p.name) and (p / "index.html").is_file()),
        reverse=True,
    )
    if not nights:
        return None
    pngs = sorted(p.name for p in (reports_dir / nights[0]).glob("*.png") if _FILE.match(p.name))
    return nights[0], pngs
