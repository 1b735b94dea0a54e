"""Photometric reference catalogues: loading, quality cuts, field selection and matching.

A :class:`CatalogueSpec` says where the columns of a catalogue file are and which rows make good
photometric references (the original Huntsman pipeline used SkyMapper stars with
``class_star >= 0.9`` and ``flags == 0``).  :func:`load_catalogue` reads and cuts a file once per
(path, modification time, spec) and keeps the result in a small in-process cache, so the frames
of one field share a single parse.  :func:`select_in_field` keeps the stars that project inside a
frame and :func:`match_sources` pairs reference stars with measured positions one to one.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.wcs import WCS
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import cKDTree

from huntsman.models import CatalogueSpec

__all__ = [
    "AstrometricResidual",
    "CatalogueSpec",
    "Match",
    "RefCatalogue",
    "astrometric_residual",
    "clear_catalogue_cache",
    "load_catalogue",
    "match_sources",
    "project",
    "select_in_field",
]


@dataclasses.dataclass(frozen=True, eq=False)
class RefCatalogue:
    """Reference stars: positions (deg) and per-filter magnitudes and errors (mag).

    All arrays have shape ``(n,)`` and are read-only; missing values are NaN.
    """

    ra: NDArray[np.float64]
    dec: NDArray[np.float64]
    mags: Mapping[str, NDArray[np.float64]]
    mag_errs: Mapping[str, NDArray[np.float64]]

    def __len__(self) -> int:
        return int(self.ra.size)

    @property
    def filters(self) -> tuple[str, ...]:
        """Filters with magnitudes."""
        return tuple(sorted(self.mags))

    def mag(self, filter_name: str) -> NDArray[np.float64]:
        """Magnitudes in ``filter_name``; ``KeyError`` naming the available filters."""
        try:
            return self.mags[filter_name]
        except KeyError:
            raise KeyError(
                f"catalogue has no magnitudes for filter {filter_name!r} "
                f"(available: {', '.join(self.filters) or 'none'})"
            ) from None

    def mag_err(self, filter_name: str) -> NDArray[np.float64]:
        """Magnitude errors in ``filter_name`` (NaN where unknown)."""
        err = self.mag_errs.get(filter_name)
        return err if err is not None else _frozen(np.full(len(self), np.nan))

    def take(self, index: NDArray[np.intp] | NDArray[np.bool_]) -> RefCatalogue:
        """A new catalogue with the rows selected by an index or boolean array."""
        return _make_catalogue(
            self.ra[index],
            self.dec[index],
            {f: m[index] for f, m in self.mags.items()},
            {f: e[index] for f, e in self.mag_errs.items()},
        )


def _frozen(a: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
    out = np.array(a, dtype=np.float64, copy=True)
    out.flags.writeable = False
    return out


def _make_catalogue(
    ra: NDArray[np.floating[Any]],
    dec: NDArray[np.floating[Any]],
    mags: Mapping[str, NDArray[np.floating[Any]]],
    errs: Mapping[str, NDArray[np.floating[Any]]],
) -> RefCatalogue:
    return RefCatalogue(
        ra=_frozen(ra),
        dec=_frozen(dec),
        mags={f: _frozen(m) for f, m in mags.items()},
        mag_errs={f: _frozen(e) for f, e in errs.items()},
    )


# ---------------------------------------------------------------------------------------------
# Reading


def _to_float(text: str) -> float:
    text = text.strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def _missing_columns_error(path: Path, missing: list[str], available: Sequence[str]) -> ValueError:
    shown = ", ".join(list(available)[:40])
    return ValueError(
        f"{path}: catalogue is missing column(s) {', '.join(missing)} (available: {shown})"
    )


def _read_csv(path: Path, columns: list[str]) -> dict[str, NDArray[np.float64]]:
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path}: catalogue file is empty") from None
        missing = [c for c in columns if c not in header]
        if missing:
            raise _missing_columns_error(path, missing, header)
        index = [header.index(c) for c in columns]
        values: list[list[float]] = [[] for _ in columns]
        for row in reader:
            if not row:
                continue
            for k, i in enumerate(index):
                values[k].append(_to_float(row[i]) if i < len(row) else math.nan)
    return {c: np.asarray(v, dtype=np.float64) for c, v in zip(columns, values, strict=True)}


def _read_fits(path: Path, columns: list[str]) -> dict[str, NDArray[np.float64]]:
    from astropy.table import Table

    table = Table.read(path, format="fits")
    missing = [c for c in columns if c not in table.colnames]
    if missing:
        raise _missing_columns_error(path, missing, table.colnames)
    out: dict[str, NDArray[np.float64]] = {}
    for c in columns:
        col = table[c]
        data = np.ma.getdata(col).astype(np.float64)
        mask = np.ma.getmaskarray(col)
        out[c] = np.where(mask, np.nan, data)
    return out


def _isolated(
    ra: NDArray[np.float64], dec: NDArray[np.float64], min_sep_arcsec: float
) -> NDArray[np.bool_]:
    """True for rows with no other row within ``min_sep_arcsec``."""
    ok = np.isfinite(ra) & np.isfinite(dec)
    result = np.zeros(ra.size, dtype=bool)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return result
    xyz = _unit_vectors(ra[idx], dec[idx])
    chord = 2.0 * math.sin(math.radians(min_sep_arcsec / 3600.0) / 2.0)
    tree = cKDTree(xyz)
    counts = tree.query_ball_point(xyz, chord, return_length=True)
    result[idx] = np.asarray(counts) <= 1
    return result


def _load_uncached(path: Path, spec: CatalogueSpec) -> RefCatalogue:
    columns = spec.required_columns()
    raw = _read_fits(path, columns) if spec.format == "fits" else _read_csv(path, columns)
    ra, dec = raw[spec.ra_column], raw[spec.dec_column]
    keep = np.isfinite(ra) & np.isfinite(dec)
    if spec.stellarity_column:
        with np.errstate(invalid="ignore"):
            keep &= raw[spec.stellarity_column] >= spec.min_stellarity
    if spec.flags_column:
        keep &= np.isin(raw[spec.flags_column], np.asarray(spec.flags_allowed, dtype=float))
    if spec.min_separation_arcsec:
        keep &= _isolated(ra, dec, spec.min_separation_arcsec)
    mags = {f: raw[c].copy() for f, c in spec.magnitude_map.items()}
    errs = {f: raw[c].copy() for f, c in spec.error_map.items()}
    if spec.mag_range is not None:
        lo, hi = spec.mag_range
        for m in mags.values():
            with np.errstate(invalid="ignore"):
                m[(m < lo) | (m > hi)] = np.nan
    any_mag = np.zeros(ra.size, dtype=bool)
    for m in mags.values():
        any_mag |= np.isfinite(m)
    keep &= any_mag
    return _make_catalogue(
        ra[keep], dec[keep], {f: m[keep] for f, m in mags.items()},
        {f: e[keep] for f, e in errs.items()},
    )


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int, size: int, spec: CatalogueSpec) -> RefCatalogue:
    del mtime_ns, size  # part of the cache key only: a rewritten file is read again
    return _load_uncached(Path(path), spec)


def load_catalogue(path: str | Path, spec: CatalogueSpec = CatalogueSpec()) -> RefCatalogue:
    """Read a reference catalogue file and apply the quality cuts of ``spec``.

    Results are cached in-process, keyed by (resolved path, modification time, size, spec), so
    repeated calls for the frames of one field parse the file once; the returned arrays are
    read-only so that sharing them is safe.

    Parameters
    ----------
    path : str or pathlib.Path
        CSV (``skymapper``/``csv``) or FITS table file.
    spec : CatalogueSpec
        Column names and cuts.

    Returns
    -------
    RefCatalogue
        The rows passing every cut.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        A configured column is missing (the message lists them), or the file is empty.
    """
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"reference catalogue not found: {p}") from None
    return _load_cached(str(p), st.st_mtime_ns, st.st_size, spec)


def clear_catalogue_cache() -> None:
    """Forget every cached catalogue (tests, or after replacing files in place)."""
    _load_cached.cache_clear()


# ---------------------------------------------------------------------------------------------
# Geometry


def _unit_vectors(
    ra_deg: NDArray[np.floating[Any]], dec_deg: NDArray[np.floating[Any]]
) -> NDArray[np.float64]:
    ra, dec = np.deg2rad(ra_deg), np.deg2rad(dec_deg)
    cd = np.cos(dec)
    return np.column_stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)])


def _angular_sep_deg(
    ra1: ArrayLike, dec1: ArrayLike, ra2: ArrayLike, dec2: ArrayLike
) -> NDArray[np.float64]:
    """Great-circle separation (deg), Vincenty formula (stable at all separations)."""
    l1, b1, l2, b2 = (np.deg2rad(np.asarray(v, dtype=float)) for v in (ra1, dec1, ra2, dec2))
    dl = l2 - l1
    num = np.hypot(np.cos(b2) * np.sin(dl), np.cos(b1) * np.sin(b2) - np.sin(b1) * np.cos(b2)
                   * np.cos(dl))
    den = np.sin(b1) * np.sin(b2) + np.cos(b1) * np.cos(b2) * np.cos(dl)
    out: NDArray[np.float64] = np.rad2deg(np.arctan2(num, den))
    return out



def project(cat: RefCatalogue, wcs: WCS) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Pixel positions (0-based, x then y; shape ``(n,)`` each) of catalogue stars.

    Uses the full WCS (including SIP); stars where the inverse transform fails get NaN.
    """
    if len(cat) == 0:
        return np.zeros(0), np.zeros(0)
    x, y = wcs.all_world2pix(cat.ra, cat.dec, 0, quiet=True)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def select_in_field(
    cat: RefCatalogue, wcs: WCS, shape: tuple[int, int], margin_px: float = 0.0
) -> RefCatalogue:
    """The catalogue stars that project inside a frame.

    Parameters
    ----------
    cat : RefCatalogue
        Reference stars.
    wcs : astropy.wcs.WCS
        Celestial WCS of the frame (0-based pixel convention is used internally).
    shape : (ny, nx)
        Frame shape, pixels.
    margin_px : float
        Keep stars at least this far (px) inside the edges; negative values keep stars up to
        that far outside.

    Returns
    -------
    RefCatalogue
        A new catalogue (possibly empty).
    """
    ny, nx = shape
    if len(cat) == 0:
        return cat
    # Cut on angular distance first: a gnomonic inverse of points far from the tangent point
    # (or behind it) can land inside the frame or fail to converge.
    corners_x = np.array([0, nx - 1, 0, nx - 1, (nx - 1) / 2])
    corners_y = np.array([0, 0, ny - 1, ny - 1, (ny - 1) / 2])
    cra, cdec = wcs.all_pix2world(corners_x, corners_y, 0)
    radius = float(np.max(_angular_sep_deg(cra[4], cdec[4], cra[:4], cdec[:4])))
    scale = _pixel_scale_deg(wcs)
    radius += abs(min(margin_px, 0.0)) * scale + 10 * scale
    near = _angular_sep_deg(cra[4], cdec[4], cat.ra, cat.dec) <= radius
    idx = np.flatnonzero(near)
    if idx.size == 0:
        return cat.take(idx)
    x, y = project(cat.take(idx), wcs)
    inside = (
        np.isfinite(x) & np.isfinite(y)
        & (x >= margin_px) & (x <= nx - 1 - margin_px)
        & (y >= margin_px) & (y <= ny - 1 - margin_px)
    )
    return cat.take(idx[inside])


def _pixel_scale_deg(wcs: WCS) -> float:
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.sqrt(np.prod(proj_plane_pixel_scales(wcs.celestial))))


# ---------------------------------------------------------------------------------------------
# Matching


@dataclasses.dataclass(frozen=True, eq=False)
class Match:
    """One-to-one pairs: ``ref_index[k]`` ↔ ``src_index[k]`` at ``sep_arcsec[k]`` (shape (m,))."""

    ref_index: NDArray[np.intp]
    src_index: NDArray[np.intp]
    sep_arcsec: NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.ref_index.size)


@dataclasses.dataclass(frozen=True)
class AstrometricResidual:
    """Separation between matched measured and catalogue positions, arcsec."""

    n: int
    median_arcsec: float | None
    rms_arcsec: float | None


def match_sources(
    ref_ra: NDArray[np.floating[Any]],
    ref_dec: NDArray[np.floating[Any]],
    x: NDArray[np.floating[Any]],
    y: NDArray[np.floating[Any]],
    wcs: WCS,
    max_sep_arcsec: float,
) -> Match:
    """Pair reference stars with measured sources one to one, nearest first.

    Measured pixel positions are converted to sky coordinates through ``wcs`` and compared
    with the reference positions on the sphere (KD-tree on unit vectors).  Candidate pairs
    closer than ``max_sep_arcsec`` are accepted in order of increasing separation, each
    reference star and each source being used at most once.

    Parameters
    ----------
    ref_ra, ref_dec : numpy.ndarray, shape (n,)
        Reference positions, deg.
    x, y : numpy.ndarray, shape (m,)
        Measured positions, 0-based pixels.
    wcs : astropy.wcs.WCS
        Frame WCS.
    max_sep_arcsec : float
        Largest accepted separation, arcsec.

    Returns
    -------
    Match
        Index arrays into the reference and measured lists, and separations (arcsec).
    """
    empty = Match(np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp), np.zeros(0))
    ref_ra, ref_dec = np.asarray(ref_ra, float), np.asarray(ref_dec, float)
    x, y = np.asarray(x, float), np.asarray(y, float)
    if ref_ra.size == 0 or x.size == 0:
        return empty
    sra, sdec = wcs.all_pix2world(x, y, 0)
    ref_ok = np.flatnonzero(np.isfinite(ref_ra) & np.isfinite(ref_dec))
    src_ok = np.flatnonzero(np.isfinite(sra) & np.isfinite(sdec))
    if ref_ok.size == 0 or src_ok.size == 0:
        return empty
    tree = cKDTree(_unit_vectors(ref_ra[ref_ok], ref_dec[ref_ok]))
    chord = 2.0 * math.sin(math.radians(max_sep_arcsec / 3600.0) / 2.0)
    k = min(4, ref_ok.size)
    dist, j = tree.query(_unit_vectors(sra[src_ok], sdec[src_ok]), k=k,
                         distance_upper_bound=chord)
    dist, j = np.reshape(dist, (src_ok.size, k)), np.reshape(j, (src_ok.size, k))
    src_rep = np.repeat(np.arange(src_ok.size), k)
    d, jj = dist.ravel(), j.ravel()
    good = np.isfinite(d)
    order = np.argsort(d[good], kind="stable")
    cand_src, cand_ref, cand_d = src_rep[good][order], jj[good][order], d[good][order]
    used_ref: set[int] = set()
    used_src: set[int] = set()
    pairs: list[tuple[int, int, float]] = []
    for s, r, dd in zip(cand_src.tolist(), cand_ref.tolist(), cand_d.tolist(), strict=True):
        if s in used_src or r in used_ref:
            continue
        used_src.add(s)
        used_ref.add(r)
        pairs.append((int(ref_ok[r]), int(src_ok[s]), dd))
    if not pairs:
        return empty
    ri, si, dd_arr = (np.asarray(v) for v in zip(*pairs, strict=True))
    sep = np.rad2deg(2.0 * np.arcsin(np.clip(dd_arr / 2.0, 0, 1))) * 3600.0
    return Match(ri.astype(np.intp), si.astype(np.intp), sep.astype(float))


def astrometric_residual(match: Match) -> AstrometricResidual:
    """Median and RMS separation (arcsec) of matched pairs; None when nothing matched."""
    if len(match) == 0:
        return AstrometricResidual(0, None, None)
    sep = match.sep_arcsec
    return AstrometricResidual(
        n=len(match),
        median_arcsec=float(np.median(sep)),
        rms_arcsec=float(np.sqrt(np.mean(sep**2))),
    )
