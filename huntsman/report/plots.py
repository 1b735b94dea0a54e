"""The report's PNG plots: synchronous matplotlib (object API + Agg, no pyplot state).

Called in a thread (``asyncio.to_thread``) from the service or the command; nothing here
touches the event loop or the database.  Missing values are skipped, never plotted as zero.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from huntsman.models import IngestStatus, ObservationType, QCStatus
from huntsman.paths import path_component, write_atomic
from huntsman.report.data import NightData
from huntsman.values import finite_or_none, get_path

__all__ = [
    "CAMERA_PANELS",
    "NOT_RUN",
    "STATUS_COLOURS",
    "camera_plot_name",
    "plot_camera",
    "plot_field_fwhm",
    "plot_frames",
    "render_plots",
]

# (document field, axis label): the QC numbers of the calibrated frame, never the raw metrics.
CAMERA_PANELS: tuple[tuple[str, str], ...] = (
    ("qc.fwhm_arcsec", "FWHM (arcsec)"),
    ("qc.zeropoint", "zeropoint (mag)"),
    ("qc.sky_mag_arcsec2", "sky (mag/arcsec²)"),
    ("qc.limiting_mag_5sigma", "limiting mag (5σ)"),
)
_DPI = 90


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def camera_plot_name(camera: str) -> str:
    """``camera_<CAM-ID>.png``, the camera through :func:`path_component` (no two collide)."""
    return f"camera_{path_component(camera)}.png"


def _save(fig: Any, path: Path) -> None:
    """PNG written atomically (a temporary ``O_EXCL`` file renamed over ``path``)."""
    write_atomic(path, lambda stream: fig.savefig(stream, format="png"))


def _series(frames: Sequence[dict[str, Any]], field: str) -> dict[str, tuple[list[dt.datetime], list[float]]]:
    """Per filter: times and values of ``field`` (frames without either are skipped)."""
    out: dict[str, tuple[list[dt.datetime], list[float]]] = {}
    for doc in frames:
        when, value = doc.get("date_obs"), finite_or_none(get_path(doc, field))
        if not isinstance(when, dt.datetime) or value is None:
            continue
        times, values = out.setdefault(str(doc.get("physical_filter") or "?"), ([], []))
        times.append(when)
        values.append(value)
    return out


def plot_camera(camera: str, frames: Sequence[dict[str, Any]], night: str, path: Path) -> dict[str, int]:
    """FWHM, zeropoint, sky brightness and limiting magnitude against time for one camera.

    Returns the number of points plotted per field (frames without the value are skipped).
    """
    import matplotlib.dates as mdates

    fig = _figure(8.0, 7.5)
    axes = fig.subplots(len(CAMERA_PANELS), 1, sharex=True)
    points: dict[str, int] = {}
    for ax, (field, label) in zip(axes, CAMERA_PANELS, strict=True):
        series = _series(frames, field)
        points[field] = sum(len(values) for _, values in series.values())
        for filt, (times, values) in sorted(series.items()):
            ax.plot(times, values, "o-", ms=4, lw=0.8, label=filt)
        if not series:
            ax.text(
                0.5, 0.5, "no measurements", transform=ax.transAxes, ha="center", va="center", color="0.5"
            )
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        axes[0].legend(handles, labels, title="filter", fontsize="small", loc="best")
    # matplotlib.dates has no type annotations.
    axes[-1].xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))  # type: ignore[no-untyped-call]
    axes[-1].set_xlabel("UTC")
    fig.suptitle(f"{camera} — night {night} ({len(frames)} science frames)")
    _save(fig, path)
    return points


def _median_grid(frames: Sequence[dict[str, Any]]) -> np.ndarray | None:
    grids = []
    for doc in frames:
        grid = get_path(doc, "qc.fwhm_grid_arcsec")
        if not isinstance(grid, list) or not grid:
            continue
        try:
            rows = [[finite_or_none(v) for v in row] for row in grid]
            arr = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
        except (TypeError, ValueError):
            continue
        if arr.ndim == 2 and np.isfinite(arr).any():
            grids.append(arr)
    shapes = {g.shape for g in grids}
    if not grids or len(shapes) != 1:
        return None
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
            median: np.ndarray = np.nanmedian(np.stack(grids), axis=0)
            return median


def plot_field_fwhm(by_camera: dict[str, list[dict[str, Any]]], night: str, path: Path) -> Path | None:
    """Median FWHM over the night in each cell of a 3×3 grid across the field, per camera."""
    grids = {cam: g for cam, frames in sorted(by_camera.items()) if (g := _median_grid(frames)) is not None}
    if not grids:
        return None
    n = len(grids)
    ncols = min(n, 4)
    nrows = (n + ncols - 1) // ncols
    fig = _figure(3.2 * ncols + 0.8, 3.0 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    vmin, vmax = float(finite.min()), float(finite.max())
    image = None
    for ax, (camera, grid) in zip(axes, grids.items(), strict=False):
        image = ax.imshow(grid, origin="lower", cmap="viridis", vmin=vmin, vmax=max(vmax, vmin + 1e-3))
        for (iy, ix), value in np.ndenumerate(grid):
            text = "—" if not np.isfinite(value) else f"{value:.2f}"
            ax.text(ix, iy, text, ha="center", va="center", color="w", fontsize="small")
        ax.set_title(camera)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=list(axes[:n]), label="FWHM (arcsec)", shrink=0.8)
    fig.suptitle(f"FWHM across the field (median over the night {night})")
    _save(fig, path)
    return path


NOT_RUN = "not run"  # a frame the stage has not written yet
# The bar colour of every ingest and QC status (``failed`` is the same string in both).
STATUS_COLOURS: dict[str, str] = {
    IngestStatus.OK: "#4c9a2a",
    IngestStatus.FAILED: "#c0392b",
    IngestStatus.QUARANTINED: "#7b241c",
    QCStatus.DONE: "#4c9a2a",
    QCStatus.FAILED: "#c0392b",
    QCStatus.WAITING_CALIBS: "#e6a23c",
    NOT_RUN: "#999999",
}


def plot_frames(counts: Sequence[dict[str, Any]], night: str, path: Path) -> Path:
    """Frames per observation type by ingest status, and science frames by QC status."""
    fig = _figure(9.0, 3.6)
    left, right = fig.subplots(1, 2)
    types = sorted({str(r["observation_type"]) for r in counts})

    def stacked(ax: Any, rows: Sequence[dict[str, Any]], key: str, categories: list[str]) -> None:
        def label(value: Any) -> str:
            return NOT_RUN if value is None else str(value)

        statuses = sorted({label(r[key]) for r in rows})
        bottom = np.zeros(len(categories))
        for status in statuses:
            heights = np.array(
                [
                    sum(r["n"] for r in rows if str(r["observation_type"]) == c and label(r[key]) == status)
                    for c in categories
                ],
                dtype=float,
            )
            ax.bar(
                categories, heights, bottom=bottom, label=status, color=STATUS_COLOURS.get(status.lower())
            )
            bottom += heights
        if statuses:
            ax.legend(fontsize="small")

    stacked(left, counts, "ingest_status", types)
    left.set_title("frames by type and ingest status")
    left.set_ylabel("frames")
    science = [r for r in counts if r["observation_type"] == ObservationType.SCIENCE]
    stacked(right, science, "qc_status", [ObservationType.SCIENCE.value] if science else [])
    right.set_title("science frames by QC status")
    fig.suptitle(f"night {night}")
    _save(fig, path)
    return path


def render_plots(data: NightData, out_dir: Path) -> dict[str, Any]:
    """Every plot of the report into ``out_dir``; returns ``{"cameras": {cam: name}, ...}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_camera: dict[str, list[dict[str, Any]]] = {}
    for doc in data.science:
        if doc.get("camera"):
            by_camera.setdefault(str(doc["camera"]), []).append(doc)
    cameras, points = {}, {}
    for camera, frames in sorted(by_camera.items()):
        name = camera_plot_name(camera)
        points[camera] = plot_camera(camera, frames, data.night, out_dir / name)
        cameras[camera] = name
    field = plot_field_fwhm(by_camera, data.night, out_dir / "fwhm_field.png")
    counts = plot_frames(data.counts, data.night, out_dir / "frames.png") if data.counts else None
    return {
        "cameras": cameras,
        "points": points,
        "field": field.name if field is not None else None,
        "frames": counts.name if counts is not None else None,
    }
