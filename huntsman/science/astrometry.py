"""Plate solving with astrometry.net's ``solve-field``, and index building from a local catalogue.

The service gives ``solve-field`` its own source list (an "xylist" FITS table) rather than the
image: sources are already measured for the quality metrics, and reading a 38.5 MiB frame a
second time in ``solve-field`` would cost more than the solve itself.

Attempt strategy
----------------
With a pointing hint (``RA-MNT``/``DEC-MNT``) the first attempt searches only the indexes within
``search_radius_deg`` of the hint, which takes a few seconds.  If it finds no solution and
``params.blind_fallback`` is true, a second, blind attempt (all indexes, same scale range) runs in
the wall time left: a broken mount model must not cost us the astrometry.  Without a hint only
the blind attempt runs.  A timeout is never retried: the wall-time budget covers both attempts.

Every call writes an explicit ``astrometry.cfg`` listing ``params.index_dirs`` (``add_path``),
so extra index directories from the service configuration (e.g. one built by
:func:`build_index` from a reference catalogue for narrow cut-outs) are used, and the system
``/etc/astrometry.cfg`` is ignored.  ``inparallel`` is not set: the solver runs inside one
worker process of a pool sized to the cores.

Nothing here touches the network.  ``solve-field`` is run in its own process group, which is
killed as a whole (``astrometry-engine`` included) when the wall-time limit expires.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from numpy.typing import NDArray

from huntsman.models import WcsStatus

if TYPE_CHECKING:
    from astropy.coordinates import EarthLocation

__all__ = [
    "DEFAULT_INDEX_DIR",
    "PointingMetrics",
    "SolveParams",
    "SolveResult",
    "available",
    "build_index",
    "extract_sources",
    "pointing_metrics",
    "solve_field",
    "wcs_summary",
]

DEFAULT_INDEX_DIR = "/usr/share/astrometry"

#: A source list: 0-based pixel x, y and background-subtracted flux (ADU), each shape (n,).
_XYFlux = tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]


# Keywords that describe a celestial WCS (including SIP) in a solve-field .wcs header.
_WCS_KEY = re.compile(
    r"^(WCSAXES|CTYPE[12]|CUNIT[12]|CRVAL[12]|CRPIX[12]|CD[12]_[12]|PC[12]_[12]|CDELT[12]"
    r"|CROTA[12]|EQUINOX|RADESYS|LONPOLE|LATPOLE|IMAGEW|IMAGEH"
    r"|A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|A_\d+_\d+|B_\d+_\d+|AP_\d+_\d+|BP_\d+_\d+)$"
)


@dataclasses.dataclass(frozen=True)
class SolveParams:
    """Parameters of one plate solve.

    Attributes
    ----------
    pixel_scale_arcsec : float
        Expected pixel scale (arcsec/px): the detector's
        (:class:`~huntsman.models.DetectorConstants`), no default.
    scale_tolerance : float
        Fractional tolerance on the scale: searched range is ``scale * (1 ± tolerance)``.
    cpu_limit_s : float
        CPU-time limit given to the solver per attempt (``--cpulimit``, s); a soft limit.
    timeout_s : float
        Wall-time limit of the whole call, all attempts together (s); the hard limit: the
        solver's process group is killed when it expires.
    index_dirs : tuple of str
        Directories holding astrometry.net index files (each gets an ``add_path`` line).
    downsample : int
        Source positions are divided by this before solving and the WCS scaled back; 1 = off.
        (With an xylist input the solver never sees pixels; >1 only coarsens positions.)
    search_radius_deg : float
        Radius around the pointing hint searched in the first attempt (deg).
    tweak_order : int
        SIP polynomial order fitted by the solver (0 = plain TAN).
    max_sources : int
        Brightest sources fed to the solver.  This, not ``cpu_limit_s``, bounds the time an
        unsolvable frame costs: astrometry.net checks its CPU limit only between search steps
        (a noise frame with 300 sources ran ~20 s under ``--cpulimit 3``).
    blind_fallback : bool
        After a hinted attempt finds no solution, try blind in the remaining wall time.
    """

    pixel_scale_arcsec: float
    scale_tolerance: float = 0.10
    cpu_limit_s: float = 30.0
    timeout_s: float = 60.0
    index_dirs: tuple[str, ...] = (DEFAULT_INDEX_DIR,)
    downsample: int = 1
    search_radius_deg: float = 3.0
    tweak_order: int = 2
    max_sources: int = 60
    blind_fallback: bool = True


@dataclasses.dataclass(frozen=True)
class SolveResult:
    """Outcome of a plate solve; numbers are plain Python floats (``None`` when unknown).

    ``header`` holds the WCS keywords (``astropy.wcs.WCS(fits.Header(header))`` rebuilds the
    solution, SIP included).  Angles in degrees, scale in arcsec/px, residual and offset in
    arcsec, time in seconds.  ``rotation_deg`` is the position angle of the image +y axis,
    North through East, in [0, 360).
    """

    status: WcsStatus  # SOLVED or FAILED
    error: str | None = None
    header: dict[str, str | int | float] = dataclasses.field(default_factory=dict)
    ra_center: float | None = None
    dec_center: float | None = None
    pixel_scale_arcsec: float | None = None
    rotation_deg: float | None = None
    solve_time_s: float = 0.0
    index_used: str | None = None
    n_matched: int | None = None
    residual_arcsec: float | None = None
    pointing_offset_arcsec: float | None = None
    attempts: int = 0
    blind: bool = False


@dataclasses.dataclass(frozen=True)
class PointingMetrics:
    """Where the telescope was pointing: alt/az (deg), Moon distance (deg), mount error (arcsec)."""

    alt_deg: float
    az_deg: float
    moon_separation_deg: float
    pointing_offset_arcsec: float | None


# --------------------------------------------------------------------------------------------
# Availability


def _index_files(index_dirs: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for d in index_dirs:
        p = Path(d)
        if p.is_dir():
            files.extend(sorted(p.glob("*.fits")))
    return files


def available(index_dirs: Sequence[str | Path] = (DEFAULT_INDEX_DIR,)) -> tuple[bool, str]:
    """Whether plate solving can run: ``solve-field`` on PATH and at least one index file.

    Returns
    -------
    (ok, reason) : (bool, str)
        ``reason`` says what is missing (empty when ``ok``).
    """
    if shutil.which("solve-field") is None:
        return False, "solve-field not found on PATH (install the astrometry.net package)"
    if not _index_files(index_dirs):
        dirs = ", ".join(str(d) for d in index_dirs)
        return False, f"no astrometry.net index files (*.fits) in {dirs}"
    return True, ""


# --------------------------------------------------------------------------------------------
# Sources


def extract_sources(
    data: NDArray[np.number[Any]],
    *,
    threshold_sigma: float = 5.0,
    min_area_px: int = 5,
    max_sources: int | None = 2000,
) -> _XYFlux:
    """Detect point sources with ``sep`` after subtracting a smooth background.

    Background and detection are :mod:`huntsman.science.background`'s (the service's one mesh
    policy), deblended finely (``deblend_cont=0.005``) so close pairs give two positions.

    Parameters
    ----------
    data : numpy.ndarray, shape (ny, nx)
        Image (ADU, any numeric dtype); not modified.
    threshold_sigma : float
        Detection threshold in units of the global background RMS.
    min_area_px : int
        Minimum connected pixels above threshold.
    max_sources : int or None
        Keep only this many of the brightest sources.

    Returns
    -------
    x, y, flux : numpy.ndarray
        0-based pixel centroids and background-subtracted fluxes (ADU), brightest first.
    """
    import sep

    from huntsman.science.background import detect, sep_background

    image = np.ascontiguousarray(data, dtype=np.float32)
    bkg = sep_background(image)
    residual = image - bkg.back()
    sep.set_sub_object_limit(4096)
    objects = detect(residual, threshold_sigma, bkg.globalrms, minarea=min_area_px,
                     deblend_cont=0.005)
    good = (objects["flag"] & 0x04) == 0  # drop sources truncated by the pixel stack
    objects = objects[good]
    order = np.argsort(-objects["flux"])
    if max_sources is not None:
        order = order[:max_sources]
    objects = objects[order]
    return (
        np.asarray(objects["x"], dtype=np.float64),
        np.asarray(objects["y"], dtype=np.float64),
        np.asarray(objects["flux"], dtype=np.float64),
    )


# --------------------------------------------------------------------------------------------
# Solving


def _write_xylist(
    path: Path,
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    flux: NDArray[np.float64],
    downsample: int,
    max_sources: int,
) -> int:
    """Write an xylist table (1-based FITS pixel coordinates), brightest first."""
    finite = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)
    x, y, flux = x[finite], y[finite], flux[finite]
    order = np.argsort(-flux, kind="stable")[:max_sources]
    # astrometry.net works in FITS pixel convention: the first pixel's centre is (1, 1).
    cols = [
        fits.Column(name="X", format="D", array=(x[order] + 0.5) / downsample + 0.5),
        fits.Column(name="Y", format="D", array=(y[order] + 0.5) / downsample + 0.5),
        fits.Column(name="FLUX", format="D", array=flux[order]),
    ]
    fits.BinTableHDU.from_columns(cols).writeto(path, overwrite=True)
    return int(order.size)


def _write_config(path: Path, index_dirs: Sequence[str], cpu_limit_s: float) -> None:
    lines = [f"cpulimit {math.ceil(cpu_limit_s)}"]
    lines += [f"add_path {Path(d).resolve()}" for d in index_dirs]
    lines.append("autoindex")
    path.write_text("\n".join(lines) + "\n")


def _run(cmd: list[str], timeout_s: float, cwd: Path) -> tuple[int | None, str]:
    """Run in a new process group; kill the whole group on timeout. (returncode|None, output)."""
    with subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=max(timeout_s, 0.1))
            return proc.returncode, out
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return None, out


def _wcs_header_dict(path: Path, downsample: int) -> dict[str, str | int | float]:
    header = fits.getheader(path)
    out: dict[str, str | int | float] = {}
    for key, value in header.items():
        if _WCS_KEY.match(key):
            out[key] = value.item() if isinstance(value, np.generic) else value
    if downsample != 1:
        out = _upscale_wcs(out, downsample)
    return out


def _upscale_wcs(h: dict[str, str | int | float], f: int) -> dict[str, str | int | float]:
    """Convert a WCS solved on positions divided by ``f`` back to full-resolution pixels."""
    out = dict(h)
    for axis in ("1", "2"):
        out[f"CRPIX{axis}"] = (float(h[f"CRPIX{axis}"]) - 0.5) * f + 0.5
    for key in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        if key in h:
            out[key] = float(h[key]) / f
    for key in ("IMAGEW", "IMAGEH"):
        if key in h:
            out[key] = int(h[key]) * f
    for key, value in h.items():
        m = re.match(r"^(A|B|AP|BP)_(\d+)_(\d+)$", key)
        if m:
            p, q = int(m.group(2)), int(m.group(3))
            # u' = f u  and  A(u) scaled: A'_pq = A_pq * f**(1 - p - q)
            out[key] = float(value) * f ** (1 - p - q)
    return out


def _corr_stats(path: Path) -> tuple[int | None, float | None]:
    """Number of matched stars and RMS field-index separation (arcsec) from a .corr file."""
    if not path.exists():
        return None, None
    with fits.open(path) as hdul:
        data = hdul[1].data
        if data is None or len(data) == 0:
            return 0, None
        ra1, dec1 = np.deg2rad(data["field_ra"]), np.deg2rad(data["field_dec"])
        ra2, dec2 = np.deg2rad(data["index_ra"]), np.deg2rad(data["index_dec"])
    cos_sep = np.sin(dec1) * np.sin(dec2) + np.cos(dec1) * np.cos(dec2) * np.cos(ra1 - ra2)
    sep_arcsec = np.rad2deg(np.arccos(np.clip(cos_sep, -1.0, 1.0))) * 3600.0
    return len(data), float(np.sqrt(np.mean(sep_arcsec**2)))


def wcs_summary(
    header: dict[str, str | int | float], image_shape: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Centre (RA, Dec, deg), pixel scale (arcsec/px) and rotation (deg) of a WCS.

    Parameters
    ----------
    header : dict
        WCS keywords.
    image_shape : (ny, nx)
        Frame shape (px); the centre is at 0-based pixel ``((nx-1)/2, (ny-1)/2)``.

    Returns
    -------
    ra_center, dec_center, pixel_scale_arcsec, rotation_deg : float
        ``rotation_deg`` is the position angle (North through East) of the image +y axis.
    """
    wcs = WCS(fits.Header(header))
    ny, nx = image_shape
    xc, yc = (nx - 1) / 2.0, (ny - 1) / 2.0
    centre = wcs.pixel_to_world(xc, yc)
    up = wcs.pixel_to_world(xc, yc + 10.0)
    scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))) * 3600.0
    rotation = float(centre.position_angle(up).deg) % 360.0
    return float(centre.ra.deg), float(centre.dec.deg), scale, rotation


def _separation_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    c = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(r1 - r2)
    return math.degrees(math.acos(max(-1.0, min(1.0, c)))) * 3600.0


def solve_field(
    image_shape: tuple[int, int],
    sources: _XYFlux,

    *,
    hint_ra_deg: float | None = None,
    hint_dec_deg: float | None = None,
    params: SolveParams,
    workdir: str | Path,
) -> SolveResult:
    """Plate-solve a frame from its source list with astrometry.net's ``solve-field``.

    Parameters
    ----------
    image_shape : (ny, nx)
        Frame shape (px).
    sources : (x, y, flux)
        0-based pixel centroids and fluxes (any unit; only the ordering matters).
    hint_ra_deg, hint_dec_deg : float, optional
        Pointing hint (deg), e.g. the mount position.  Both or neither.
    params : SolveParams
        Scale, limits, index directories, SIP order.
    workdir : path
        Existing scratch directory for solver files; the caller owns (and removes) it.

    Returns
    -------
    SolveResult
        ``status='failed'`` with ``error`` set (solver missing, no sources, timeout, no
        solution) — this function does not raise for solver failures.
    """
    start = time.monotonic()
    ny, nx = image_shape
    ok, reason = available(params.index_dirs)
    if not ok:
        return SolveResult(status=WcsStatus.FAILED, error=reason)
    x, y, flux = (np.asarray(a, dtype=np.float64) for a in sources)
    if x.size < 4:
        return SolveResult(status=WcsStatus.FAILED, error=f"too few sources to solve ({x.size} < 4)")
    hinted = hint_ra_deg is not None and hint_dec_deg is not None
    work = Path(workdir)
    ds = max(1, int(params.downsample))
    xyls = work / "sources.xyls"
    n_fed = _write_xylist(xyls, x, y, flux, ds, params.max_sources)
    cfg = work / "astrometry.cfg"
    _write_config(cfg, params.index_dirs, params.cpu_limit_s)

    attempts: list[bool] = [True, False] if hinted else [False]
    if hinted and not params.blind_fallback:
        attempts = [True]
    error = "no solution"
    for n, use_hint in enumerate(attempts, start=1):
        remaining = params.timeout_s - (time.monotonic() - start)
        if remaining <= 0.5:
            break
        base = f"attempt{n}"
        cmd = [
            "solve-field", str(xyls), "--config", str(cfg), "--dir", str(work),
            "--out", base, "--overwrite", "--no-plots", "--new-fits", "none",
            "--index-xyls", "none", "--rdls", "none", "--match", "none",
            "--corr", f"{base}.corr", "--wcs", f"{base}.wcs", "--solved", f"{base}.solved",
            "--temp-dir", str(work),
            "--width", str(math.ceil(nx / ds)), "--height", str(math.ceil(ny / ds)),
            "--x-column", "X", "--y-column", "Y", "--sort-column", "FLUX",
            "--scale-units", "arcsecperpix",
            "--scale-low", f"{params.pixel_scale_arcsec * ds * (1 - params.scale_tolerance):.6f}",
            "--scale-high", f"{params.pixel_scale_arcsec * ds * (1 + params.scale_tolerance):.6f}",
            "--cpulimit", str(math.ceil(params.cpu_limit_s)), "--crpix-center",
        ]
        if params.tweak_order > 0:
            cmd += ["--tweak-order", str(params.tweak_order)]
        else:
            cmd += ["--no-tweak"]
        if use_hint:
            cmd += [
                "--ra", f"{hint_ra_deg:.8f}", "--dec", f"{hint_dec_deg:.8f}",
                "--radius", f"{params.search_radius_deg:.4f}",
            ]
        try:
            rc, output = _run(cmd, remaining, work)
        except FileNotFoundError:
            return SolveResult(status=WcsStatus.FAILED, error="solve-field not found on PATH")
        if rc is None:
            error = f"timeout: no solution within the wall-time limit of {params.timeout_s:g} s"
            return SolveResult(
                status=WcsStatus.FAILED, error=error, solve_time_s=time.monotonic() - start,
                attempts=n, blind=not use_hint,
            )
        wcs_path = work / f"{base}.wcs"
        if rc != 0:
            tail = " ".join(output.strip().splitlines()[-3:])
            error = f"solve-field exited with status {rc}: {tail}"
            continue
        if not (work / f"{base}.solved").exists() or not wcs_path.exists():
            error = (
                f"no solution found ({n_fed} sources, scale "
                f"{params.pixel_scale_arcsec:g}±{params.scale_tolerance:.0%} arcsec/px, "
                + (f"within {params.search_radius_deg:g} deg of the hint" if use_hint else "blind")
                + f", cpu limit {params.cpu_limit_s:g} s)"
            )
            continue
        header = _wcs_header_dict(wcs_path, ds)
        header["IMAGEW"], header["IMAGEH"] = nx, ny
        ra_c, dec_c, scale, rotation = wcs_summary(header, image_shape)
        n_matched, residual = _corr_stats(work / f"{base}.corr")
        m = re.search(r"solved with index (\S+?)\.?\s*$", output, re.MULTILINE)
        offset = (
            _separation_arcsec(float(hint_ra_deg), float(hint_dec_deg), ra_c, dec_c)
            if hinted and hint_ra_deg is not None and hint_dec_deg is not None
            else None
        )
        return SolveResult(
            status=WcsStatus.SOLVED, header=header, ra_center=ra_c, dec_center=dec_c,
            pixel_scale_arcsec=scale, rotation_deg=rotation,
            solve_time_s=time.monotonic() - start,
            index_used=Path(m.group(1)).name if m else None,
            n_matched=n_matched, residual_arcsec=residual, pointing_offset_arcsec=offset,
            attempts=n, blind=not use_hint,
        )
    return SolveResult(
        status=WcsStatus.FAILED, error=error, solve_time_s=time.monotonic() - start,
        attempts=len(attempts), blind=not attempts[-1],
    )


# --------------------------------------------------------------------------------------------
# Index building


def build_index(
    refcat_csv: str | Path,
    out_dir: str | Path,
    *,
    ra_col: str = "raj2000",
    dec_col: str = "dej2000",
    mag_col: str = "g_psf",
    min_class_star: float | None = 0.9,
    class_col: str = "class_star",
    flags_col: str | None = "flags",
    mag_range: tuple[float, float] = (-5.0, 21.0),
    scale_numbers: Sequence[int] = (0, 1, 2, 3, 4),
    stars_per_cell: int = 10,
    dimquads: int = 3,
    index_id_base: int = 9100,
    timeout_s: float = 300.0,
) -> list[Path]:
    """Build astrometry.net index files from a reference catalogue (CSV).

    The catalogue is cut (finite magnitude within ``mag_range``; ``class_col >= min_class_star``;
    ``flags_col == 0``), written as a FITS table (RA, DEC, MAG) and passed to
    ``build-astrometry-index`` once per scale number.  Scale number ``P`` builds quads of about
    ``2 * sqrt(2)**P`` arcmin (``P=0``: 2-2.8′, ``P=2``: 4-5.6′, ``P=4``: 8-11′): the default
    0-4 suits fields 6-30′ wide, such as the 16.5′ sample cut-outs.  Triangles (``dimquads=3``)
    help sparse catalogues; ``stars_per_cell`` is the number of uniformisation sweeps.

    Parameters
    ----------
    refcat_csv : path
        CSV with a header row.
    out_dir : path
        Directory for the index files (created).  Add it to ``SolveParams.index_dirs``.
    ra_col, dec_col, mag_col : str
        Column names: ICRS position (deg) and the magnitude used to rank stars (mag).
    min_class_star, class_col, flags_col
        Quality cuts; ``None`` disables a cut.
    mag_range : (float, float)
        Magnitudes kept (mag).
    scale_numbers : sequence of int
        ``-P`` presets, one index file each.
    stars_per_cell, dimquads : int
        ``-n`` and ``-d`` options of ``build-astrometry-index``.
    index_id_base : int
        Index IDs are ``index_id_base + P``.
    timeout_s : float
        Wall-time limit per index file (s).

    Returns
    -------
    list of pathlib.Path
        The index files written, one per scale number.

    Raises
    ------
    RuntimeError
        ``build-astrometry-index`` missing, failing, or too few stars survive the cuts.
    """
    from astropy.table import Table

    exe = shutil.which("build-astrometry-index") or shutil.which("build-index")
    if exe is None:
        raise RuntimeError("build-astrometry-index not found on PATH (astrometry.net package)")
    table = Table.read(str(refcat_csv), format="ascii.csv")
    ra = np.asarray(table[ra_col], dtype=np.float64)
    dec = np.asarray(table[dec_col], dtype=np.float64)
    mag = np.asarray(np.ma.filled(table[mag_col], np.nan), dtype=np.float64)
    keep = np.isfinite(ra) & np.isfinite(dec) & np.isfinite(mag)
    keep &= (mag >= mag_range[0]) & (mag <= mag_range[1])
    if min_class_star is not None and class_col in table.colnames:
        cls = np.asarray(np.ma.filled(table[class_col], np.nan), dtype=np.float64)
        keep &= cls >= min_class_star
    if flags_col is not None and flags_col in table.colnames:
        flags = np.asarray(np.ma.filled(table[flags_col], 1), dtype=np.int64)
        keep &= flags == 0
    if keep.sum() < 10:
        raise RuntimeError(f"only {int(keep.sum())} stars left after the quality cuts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    catalogue = out / f".{Path(refcat_csv).stem}-catalogue.fits"
    cols = [
        fits.Column(name="RA", format="D", array=ra[keep]),
        fits.Column(name="DEC", format="D", array=dec[keep]),
        fits.Column(name="MAG", format="E", array=mag[keep]),
    ]
    fits.BinTableHDU.from_columns(cols).writeto(catalogue, overwrite=True)
    written: list[Path] = []
    try:
        for p in scale_numbers:
            target = out / f"index-{Path(refcat_csv).stem}-{p:02d}.fits"
            cmd = [
                exe, "-i", str(catalogue), "-e", "1", "-o", str(target), "-P", str(p),
                "-S", "MAG", "-A", "RA", "-D", "DEC", "-n", str(stars_per_cell),
                "-d", str(dimquads), "-I", str(index_id_base + p), "-E", "-M",
                "-t", str(out),
            ]
            rc, output = _run(cmd, timeout_s, out)
            if rc != 0 or not target.exists():
                tail = " ".join(output.strip().splitlines()[-3:])
                raise RuntimeError(f"build-astrometry-index -P {p} failed ({rc}): {tail}")
            written.append(target)
    finally:
        catalogue.unlink(missing_ok=True)
    return written


# --------------------------------------------------------------------------------------------
# Derived pointing quantities


def pointing_metrics(
    solved_header: dict[str, str | int | float],
    image_shape: tuple[int, int],
    date_obs: dt.datetime,
    *,
    site: EarthLocation | None = None,
    mount_ra_deg: float | None = None,
    mount_dec_deg: float | None = None,
) -> PointingMetrics:
    """Alt/az of the solved frame centre, Moon distance and mount pointing error.

    Offline-safe: IERS auto-download is switched off here (as the service does at start-up),
    so dates past the bundled IERS table use predictive values instead of the network; the
    Moon comes from astropy's built-in ephemeris.

    Parameters
    ----------
    solved_header : dict
        WCS keywords of the solution.
    image_shape : (ny, nx)
        Frame shape (px).
    date_obs : datetime.datetime
        Exposure time (timezone-aware UTC; naive is taken as UTC).
    site : astropy.coordinates.EarthLocation
        Observatory position; None: :data:`huntsman.science.site.SITE` (Siding Spring).
    mount_ra_deg, mount_dec_deg : float, optional
        Mount pointing (deg); ``None`` gives ``pointing_offset_arcsec=None``.

    Returns
    -------
    PointingMetrics
    """
    import astropy.units as u
    from astropy.coordinates import AltAz, SkyCoord, get_body
    from astropy.time import Time
    from astropy.utils import iers

    iers.conf.auto_download = False
    iers.conf.auto_max_age = None
    if site is None:
        from huntsman.science.site import SITE

        site = SITE
    ra_c, dec_c, _, _ = wcs_summary(solved_header, image_shape)
    when = date_obs if date_obs.tzinfo else date_obs.replace(tzinfo=dt.UTC)
    t = Time(when.astimezone(dt.UTC).replace(tzinfo=None), scale="utc")
    target = SkyCoord(ra=ra_c * u.deg, dec=dec_c * u.deg, frame="icrs")
    altaz = target.transform_to(AltAz(obstime=t, location=site))
    moon = get_body("moon", t, location=site)
    moon_sep = float(moon.separation(target.transform_to(moon.frame)).deg)
    offset = None
    if mount_ra_deg is not None and mount_dec_deg is not None:
        offset = _separation_arcsec(mount_ra_deg, mount_dec_deg, ra_c, dec_c)
    return PointingMetrics(
        alt_deg=float(altaz.alt.deg), az_deg=float(altaz.az.deg),
        moon_separation_deg=moon_sep, pointing_offset_arcsec=offset,
    )
