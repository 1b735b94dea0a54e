"""The report page: one self-contained HTML file (inline CSS) next to its PNG plots."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from huntsman import __version__
from huntsman.models import Grade, IngestStatus, QCStatus, WcsStatus
from huntsman.report.data import NightData, grade_of, worst_frames
from huntsman.values import finite_or_none, get_path

__all__ = ["CSS", "GRADE_CSS", "UNKNOWN_CSS", "fmt", "grade_css", "render_html", "table"]

DASH = "—"

# The colour (CSS class) of every grade; a value that is not a grade is "unknown" (grey).
GRADE_CSS: Mapping[Grade, str] = {Grade.GOOD: "good", Grade.FAIR: "warn", Grade.BAD: "bad"}
UNKNOWN_CSS = "unknown"
# Status columns whose failure is shown in the "bad" colour.
_FAILED = {
    "ingest.status": IngestStatus.FAILED,
    "wcs.status": WcsStatus.FAILED,
    "qc.status": QCStatus.FAILED,
}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1300px;
color:#222;padding:0 1em}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.meta{color:#666}.nodata{font-size:1.4em;padding:2em;background:#f6f6f6;border-radius:8px;
text-align:center;color:#555}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f0;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}
.bad{color:#b03a2e;font-weight:600}.warn{color:#b9770e}.good{color:#1e8449}.unknown{color:#888}
.plots img{max-width:100%;border:1px solid #eee;margin:.3em 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:.8em}
code{font-size:.9em}
"""


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded, datetimes as UTC time, anything missing as "—"."""
    if value is None or value == "" or value == []:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%H:%M:%S")
    if isinstance(value, int | float):
        f = finite_or_none(value)
        if f is None:
            return DASH
        return str(int(f)) if isinstance(value, int) else f"{f:.{digits}f}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _cell(value: Any, digits: int = 2, css: str | None = None) -> str:
    text = html.escape(fmt(value, digits))
    classes = [c for c in ("num" if finite_or_none(value) is not None else None, css) if c]
    attr = f' class="{" ".join(classes)}"' if classes else ""
    return f"<td{attr}>{text}</td>"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], css_id: str | None = None) -> str:
    """``rows`` are already rendered ``<td>`` cells."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    ident = f' id="{css_id}"' if css_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def grade_css(value: Any) -> str | None:
    """The CSS class of a ``qc.grade`` cell: :data:`GRADE_CSS`, ``unknown`` for a value that is
    not a grade, none for a missing one (shown as "—")."""
    if value is None:
        return None
    grade = grade_of(value)
    return GRADE_CSS[grade] if grade is not None else UNKNOWN_CSS


SCIENCE_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("date_obs", "UTC", 0),
    ("camera", "camera", 0),
    ("physical_filter", "filter", 0),
    ("exposure_time", "exp (s)", 1),
    ("field", "field", 0),
    ("airmass", "airmass", 2),
    ("ingest.status", "ingest", 0),
    ("wcs.status", "wcs", 0),
    ("qc.status", "QC", 0),
    ("qc.grade", "grade", 0),
    ("qc.fwhm_arcsec", "FWHM″", 2),
    ("qc.ellipticity", "ell.", 2),
    ("qc.zeropoint", "ZP", 3),
    ("qc.sky_mag_arcsec2", "sky mag/″²", 2),
    ("qc.limiting_mag_5sigma", "lim. mag", 2),
    ("qc.n_zeropoint_stars", "ZP stars", 0),
    ("qc.flags", "flags", 0),
)


def _science_row(doc: dict[str, Any]) -> list[str]:
    cells = [f"<td><code>{html.escape(str(doc.get('filename')))}</code></td>"]
    for field, _, digits in SCIENCE_COLUMNS:
        value = get_path(doc, field)
        css = grade_css(value) if field == "qc.grade" else None
        if field in _FAILED and value == _FAILED[field]:
            css = "bad"
        cells.append(_cell(value, digits, css))
    return cells


def _science_headers() -> list[str]:
    return ["file", *(label for _, label, _ in SCIENCE_COLUMNS)]


def _worst_rows(data: NightData) -> list[list[str]]:
    rows = []
    for doc in worst_frames(data.science, data.worst_n):
        reasons = [str(f) for f in (get_path(doc, "qc.flags") or []) if f]
        for error in (get_path(doc, "qc.error"), get_path(doc, "ingest.error"), get_path(doc, "wcs.error")):
            if error:
                reasons.append(str(error))
        rows.append(
            [
                f"<td><code>{html.escape(str(doc.get('filename')))}</code></td>",
                _cell(doc.get("camera")),
                _cell(get_path(doc, "qc.grade"), css=grade_css(get_path(doc, "qc.grade"))),
                _cell(get_path(doc, "qc.status")),
                _cell(get_path(doc, "qc.fwhm_arcsec")),
                _cell(get_path(doc, "qc.ellipticity")),
                f"<td>{html.escape('; '.join(reasons)) or DASH}</td>",
            ]
        )
    return rows


def _masters_section(data: NightData) -> str:
    parts = ["<h2>Master calibrations</h2>"]
    if data.masters:
        rows = [
            [
                _cell(m.get("calib_type")),
                _cell(m.get("camera")),
                _cell(m.get("physical_filter")),
                _cell(m.get("version")),
                _cell(m.get("n_frames")),
                _cell(
                    "superseded" if m.get("superseded") else "current",
                    css="warn" if m.get("superseded") else "good",
                ),
                f"<td><code>{html.escape(str(m.get('filename')))}</code></td>",
            ]
            for m in data.masters
        ]
        parts.append(
            "<h3>Built</h3>"
            + table(["type", "camera", "filter", "version", "frames", "state", "file"], rows, "masters-built")
        )
    else:
        parts.append("<p>No master was built for this date.</p>")
    missing = [s for s in data.calib_status if s.get("state") != "built"]
    if missing:
        rows = [
            [
                _cell(s.get("calib_type")),
                _cell(s.get("camera")),
                _cell(s.get("physical_filter")),
                _cell(s.get("state"), css="bad" if s.get("state") == "failed" else "warn"),
                _cell(s.get("n_candidates")),
                f"<td>{html.escape(str(s.get('reason') or DASH))}</td>",
            ]
            for s in missing
        ]
        parts.append(
            "<h3>Missing</h3>"
            + table(["type", "camera", "filter", "state", "candidates", "reason"], rows, "masters-missing")
        )
    elif data.calib_status:
        parts.append("<p>Every calibration group of this date has its master.</p>")
    return "\n".join(parts)


def _counts_table(data: NightData) -> str:
    rows = [
        [_cell(r["observation_type"]), _cell(r["ingest_status"]), _cell(r["qc_status"]), _cell(r["n"])]
        for r in data.counts
    ]
    return table(["type", "ingest", "QC", "frames"], rows, "frame-counts")


def render_html(data: NightData, plots: dict[str, Any]) -> str:
    """The whole page; ``plots`` names the PNG files next to it (see ``render_plots``)."""
    title = f"Huntsman night report {data.night}"
    generated = data.generated.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    head = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}</style></head><body><h1>{title}</h1>"
        f'<p class="meta">Night = UTC day {data.night} (one Siding Spring night). '
        f"Generated {generated} by huntsman {html.escape(__version__)}.</p>"
    )
    if data.empty:
        body = (
            f'<div class="nodata" id="no-data">No data for the night {data.night}: no exposure '
            "and no master calibration is recorded for this date.</div>"
        )
        return head + body + "</body></html>\n"
    n_science = len(data.science)
    summary = (
        f'<p id="summary">{data.n_exposures} exposures ({n_science} science) from '
        f"{len(data.cameras)} camera(s); {len(data.masters)} master(s) built; "
        f"{len(data.failures)} ingest failure(s).</p>"
    )
    sections = [summary]
    sections.append("<h2>Image quality per camera</h2>")
    if plots.get("cameras"):
        imgs = "".join(
            f'<div><img src="{html.escape(name)}" alt="{html.escape(cam)}"></div>'
            for cam, name in plots["cameras"].items()
        )
        sections.append(f'<div class="plots grid">{imgs}</div>')
    else:
        sections.append("<p>No science frames this night.</p>")
    sections.append("<h2>FWHM across the field</h2>")
    if plots.get("field"):
        sections.append(f'<div class="plots"><img src="{plots["field"]}" alt="FWHM across the field"></div>')
    else:
        sections.append("<p>No FWHM grid measured (<code>qc.fwhm_grid_arcsec</code>) this night.</p>")
    sections.append("<h2>Frames and their states</h2>")
    if plots.get("frames"):
        sections.append(f'<div class="plots"><img src="{plots["frames"]}" alt="frames per type"></div>')
    sections.append(_counts_table(data))
    if data.failures:
        rows = [
            [
                f"<td><code>{html.escape(str(d.get('filename')))}</code></td>",
                _cell(d.get("observation_type")),
                _cell(get_path(d, "ingest.status"), css="bad"),
                f"<td>{html.escape(str(get_path(d, 'ingest.error') or DASH))}</td>",
            ]
            for d in data.failures
        ]
        sections.append(
            "<h3>Ingest failures</h3>" + table(["file", "type", "status", "error"], rows, "ingest-failures")
        )
    sections.append(_masters_section(data))
    sections.append(f"<h2>Worst {data.worst_n} science frames</h2>")
    worst = _worst_rows(data)
    if worst:
        sections.append(
            table(["file", "camera", "grade", "QC", "FWHM″", "ell.", "flags / errors"], worst, "worst-frames")
        )
    else:
        sections.append("<p>No science frames.</p>")
    sections.append(f"<h2>Every science frame ({n_science})</h2>")
    sections.append(table(_science_headers(), (_science_row(d) for d in data.science), "science-frames"))
    return head + "\n".join(sections) + "</body></html>\n"
