"""Synthetic star fields at real sky positions, from the Tycho-2 astrometry.net index files.

Used by tests and benchmarks of plate solving: a frame rendered from catalogue stars through a
known TAN-SIP WCS has a known true astrometric solution.

How the index files are read
----------------------------
An astrometry.net index (``index-tycho2-NN.littleendian.fits``, Debian packages
``astrometry-data-tycho2-*``) stores its stars as a k-d tree in binary-table extensions whose
single column is raw bytes:

* ``kdtree_range_stars`` — 7 native-endian float64: lower bound (3), upper bound (3) and the
  scale (tree units per data unit);
* ``kdtree_data_stars`` — one row per star, 3 native-endian uint32: the star's unit vector
  (x, y, z) on the celestial sphere, quantised as ``value = low + u32 / scale``;
* ``MAG_VT`` — a tag-along table (proper FITS float32 column) in the same star order.

The ``A`` (character) columns would be mangled by a string decoder (trailing NUL bytes are
stripped), so the raw bytes are read straight from the file at the extension's data offset.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from huntsman.testing.synthetic import CameraModel, MoffatPSF, StarField, render_frame

__all__ = [
    "DEFAULT_TYCHO_INDEX",
    "CatalogueStars",
    "make_tan_sip_wcs",
    "render_sky_frame",
    "tycho_stars",
]

# The densest Debian Tycho-2 index (quads of 22-30 arcmin, ~1.87 million stars).
DEFAULT_TYCHO_INDEX = Path("/usr/share/astrometry/index-tycho2-07.littleendian.fits")
# Typical g-band zeropoint of a Huntsman lens (m = -2.5 log10(ADU/s) + ZP).
DEFAULT_ZEROPOINT_MAG = 19.5


@dataclasses.dataclass(frozen=True)
class CatalogueStars:
    """Reference stars: ICRS positions (deg) and magnitudes (Tycho VT, mag)."""

    ra_deg: np.ndarray
    dec_deg: np.ndarray
    mag: np.ndarray


def _column_bytes(path: Path, hdul: fits.HDUList, name: str) -> tuple[np.ndarray, int]:
    """Raw data bytes of the single-column binary table called ``name``, and its row count."""
    for i, hdu in enumerate(hdul):
        if hdu.header.get("TTYPE1", "").strip() == name:
            nrows = int(hdu.header["NAXIS2"])
            nbytes = int(hdu.header["NAXIS1"]) * nrows
            offset = int(hdul.fileinfo(i)["datLoc"])
            raw = np.fromfile(path, dtype=np.uint8, count=nbytes, offset=offset)
            return raw, nrows
    raise ValueError(f"{path}: no table {name!r}; not an astrometry.net index file?")


@functools.lru_cache(maxsize=4)
def _read_index_stars(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (N, 3) and magnitudes (N,) of every star in an index file (cached)."""
    with fits.open(path, lazy_load_hdus=False) as hdul:
        endian = str(hdul[0].header.get("ENDIAN", "04:03:02:01"))
        order = "<" if endian == "04:03:02:01" else ">"
        range_raw, _ = _column_bytes(path, hdul, "kdtree_range_stars")
        data_raw, nstars = _column_bytes(path, hdul, "kdtree_data_stars")
        bounds = range_raw.view(f"{order}f8")
        low, scale = bounds[0:3], bounds[6]
        data_type = str(hdul[7].header.get("KDT_DATA", "u32")).strip()
        if data_type not in ("u32", ""):
            raise ValueError(f"{path}: unsupported k-d tree data type {data_type!r}")
        quantised = data_raw.view(f"{order}u4").reshape(nstars, 3)
        xyz = low[None, :] + quantised.astype(np.float64) / scale
        mag = np.full(nstars, np.nan)
        for hdu in hdul:
            if isinstance(hdu, fits.BinTableHDU) and "MAG_VT" in (hdu.columns.names or []):
                mag = np.asarray(hdu.data["MAG_VT"], dtype=np.float64)
                break
    xyz /= np.linalg.norm(xyz, axis=1)[:, None]
    return xyz, mag


def tycho_stars(
    ra_deg: float,
    dec_deg: float,
    radius_deg: float,
    index_file: str | Path = DEFAULT_TYCHO_INDEX,
) -> CatalogueStars:
    """Stars of an astrometry.net index file within a cone.

    Parameters
    ----------
    ra_deg, dec_deg : float
        Cone centre (ICRS, deg).
    radius_deg : float
        Cone radius (deg).
    index_file : path
        An astrometry.net index FITS file (default: the densest Debian Tycho-2 index).

    Returns
    -------
    CatalogueStars
        Positions (deg) and VT magnitudes (NaN when the index carries none), brightest first.
    """
    xyz, mag = _read_index_stars(Path(index_file))
    ra0, dec0 = np.deg2rad(ra_deg), np.deg2rad(dec_deg)
    centre = np.array([np.cos(dec0) * np.cos(ra0), np.cos(dec0) * np.sin(ra0), np.sin(dec0)])
    inside = xyz @ centre >= np.cos(np.deg2rad(radius_deg))
    sel = xyz[inside]
    ra = np.rad2deg(np.arctan2(sel[:, 1], sel[:, 0])) % 360.0
    dec = np.rad2deg(np.arcsin(np.clip(sel[:, 2], -1.0, 1.0)))
    m = mag[inside]
    order = np.argsort(np.where(np.isfinite(m), m, np.inf), kind="stable")
    return CatalogueStars(ra_deg=ra[order], dec_deg=dec[order], mag=m[order])


def make_tan_sip_wcs(
    ra_deg: float,
    dec_deg: float,
    shape: tuple[int, int],
    pixel_scale_arcsec: float = 1.24,
    rotation_deg: float = 0.0,
    sip_coeffs: dict[str, float] | None = None,
) -> WCS:
    """A TAN (optionally TAN-SIP) WCS centred on the frame.

    Parameters
    ----------
    ra_deg, dec_deg : float
        Sky position of the frame centre (deg).
    shape : (ny, nx)
        Frame shape (px).
    pixel_scale_arcsec : float
        Pixel scale (arcsec/px).
    rotation_deg : float
        Rotation of the image axes on the sky (deg, North through East); RA increases to
        the left (standard sky parity).
    sip_coeffs : dict, optional
        Forward SIP terms, e.g. ``{"A_2_0": 1e-8, "B_0_2": -2e-8}`` (order deduced).  No
        inverse polynomials: astropy's ``all_world2pix`` inverts the forward model exactly.

    Returns
    -------
    astropy.wcs.WCS
    """
    ny, nx = shape
    scale = pixel_scale_arcsec / 3600.0
    t = np.deg2rad(rotation_deg)
    header = fits.Header()
    header["NAXIS"] = 2
    header["NAXIS1"] = nx
    header["NAXIS2"] = ny
    header["CTYPE1"] = "RA---TAN-SIP" if sip_coeffs else "RA---TAN"
    header["CTYPE2"] = "DEC--TAN-SIP" if sip_coeffs else "DEC--TAN"
    header["CRVAL1"] = float(ra_deg)
    header["CRVAL2"] = float(dec_deg)
    header["CRPIX1"] = (nx + 1) / 2.0
    header["CRPIX2"] = (ny + 1) / 2.0
    header["CD1_1"] = -scale * np.cos(t)
    header["CD1_2"] = scale * np.sin(t)
    header["CD2_1"] = scale * np.sin(t)
    header["CD2_2"] = scale * np.cos(t)
    header["CUNIT1"] = "deg"
    header["CUNIT2"] = "deg"
    header["RADESYS"] = "ICRS"
    if sip_coeffs:
        order = max(int(k.split("_")[1]) + int(k.split("_")[2]) for k in sip_coeffs)
        order = max(order, 2)
        header["A_ORDER"] = order
        header["B_ORDER"] = order
        for key, value in sip_coeffs.items():
            header[key] = float(value)
    return WCS(header)


def render_sky_frame(
    shape: tuple[int, int],
    wcs: WCS,
    psf: MoffatPSF,
    *,
    sky_adu: float,
    exptime_s: float,
    seed: int = 0,
    index_file: str | Path = DEFAULT_TYCHO_INDEX,
    zeropoint_mag: float = DEFAULT_ZEROPOINT_MAG,
    n_extra_stars: int = 0,
    camera: CameraModel | None = None,
) -> tuple[np.ndarray, StarField]:
    """Render a raw frame of the real sky seen through ``wcs``.

    Parameters
    ----------
    shape : (ny, nx)
        Frame shape (px).
    wcs : astropy.wcs.WCS
        True astrometric solution (TAN or TAN-SIP), 0-based pixel convention as astropy's.
    psf : MoffatPSF
        Stellar profile (FWHM in px).
    sky_adu : float
        Sky level per pixel over the exposure (ADU).
    exptime_s : float
        Exposure time (s); star fluxes are ``10**(-0.4 (mag - zeropoint_mag)) * exptime_s``.
    seed : int
        Seed of the noise and of the extra stars.
    index_file : path
        astrometry.net index file supplying the catalogue stars.
    zeropoint_mag : float
        Magnitude giving 1 ADU/s.
    n_extra_stars : int
        Faint stars at random positions, absent from the catalogue (realistic confusion).
    camera : CameraModel, optional
        Detector model passed to :func:`huntsman.testing.synthetic.render_frame`.

    Returns
    -------
    data : numpy.ndarray, uint16, shape ``shape``
        Raw frame (ADU).
    truth : StarField
        Catalogue stars that fall on the frame (0-based pixel positions, flux in ADU),
        brightest first; the extra stars are not included.
    """
    ny, nx = shape
    centre = wcs.pixel_to_world((nx - 1) / 2.0, (ny - 1) / 2.0)
    corner = wcs.pixel_to_world(0.0, 0.0)
    radius = float(centre.separation(corner).deg) * 1.05 + 0.05
    cat = tycho_stars(float(centre.ra.deg), float(centre.dec.deg), radius, index_file)
    x, y = wcs.all_world2pix(cat.ra_deg, cat.dec_deg, 0)
    on = (x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (y < ny - 0.5)
    mag = np.where(np.isfinite(cat.mag), cat.mag, 12.0)[on]
    flux = 10.0 ** (-0.4 * (mag - zeropoint_mag)) * exptime_s
    truth = StarField(x=np.asarray(x[on]), y=np.asarray(y[on]), flux_adu=flux)
    rng = np.random.default_rng(seed + 1_000_003)
    ex_mag = rng.uniform(12.5, 16.0, n_extra_stars)
    all_stars = StarField(
        x=np.concatenate([truth.x, rng.uniform(0, nx - 1, n_extra_stars)]),
        y=np.concatenate([truth.y, rng.uniform(0, ny - 1, n_extra_stars)]),
        flux_adu=np.concatenate([flux, 10.0 ** (-0.4 * (ex_mag - zeropoint_mag)) * exptime_s]),
    )
    data = render_frame(
        shape, exptime_s=exptime_s, camera=camera or CameraModel(), sky_adu=sky_adu,
        stars=all_stars, psf=psf, seed=seed,
    )
    return data, truth
