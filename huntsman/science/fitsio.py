"""FITS input/output helpers shared by the science layer.

Raw Huntsman frames are BITPIX 16 with ``BZERO = 32768`` (unsigned 16-bit).  astropy refuses
``memmap=True`` for such scaled data, so nothing here passes it; reads use astropy's default.
Compressed ``.fits.fz`` files keep header and data in HDU 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from numpy.typing import NDArray

from huntsman.paths import write_atomic

__all__ = ["find_image_hdu", "image_hdu_index", "read_raw", "write_fits_atomic"]


def find_image_hdu(hdul: fits.HDUList) -> int | None:
    """Index of the HDU holding the image, or None: the one image-HDU rule of the service.

    The first image HDU (primary, image extension or tile-compressed) with at least two axes:
    0 for plain files, 1 for ``.fits.fz`` and for masters with an empty primary (LSST
    ``ExposureF``).  Tables never count, whatever their ``NAXIS``.
    """
    for index, hdu in enumerate(hdul):
        if isinstance(hdu, fits.CompImageHDU):
            return index
        if isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU) and hdu.header.get("NAXIS", 0) >= 2:
            return index
    return None


def image_hdu_index(hdul: fits.HDUList) -> int:
    """:func:`find_image_hdu`, raising :class:`ValueError` when the file holds no image."""
    index = find_image_hdu(hdul)
    if index is None:
        raise ValueError(f"{hdul.filename()}: no 2-D image HDU")
    return index


def read_raw(path: str | Path) -> tuple[NDArray[np.float32], fits.Header]:

    """Read a raw frame as float32 ADU together with its header.

    Parameters
    ----------
    path : str or Path
        Plain FITS (image in the primary HDU) or tile-compressed ``.fits.fz`` (image in HDU 1).

    Returns
    -------
    data : numpy.ndarray, float32, shape (ny, nx)
        Pixel values in ADU with ``BZERO``/``BSCALE`` applied (uint16 0–65535 is exact).
    header : astropy.io.fits.Header
        A copy of the image HDU's header.
    """
    with fits.open(path) as hdul:
        hdu = hdul[image_hdu_index(hdul)]
        data = np.asarray(hdu.data, dtype=np.float32)
        header = hdu.header.copy()
    if data.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D image, got shape {data.shape}")
    return data, header


def write_fits_atomic(path: str | Path, hdulist: fits.HDUList, *, root: str | Path | None = None) -> Path:
    """Write ``hdulist`` to ``path`` so readers see either the old file or the complete new one.

    The file is written to a new temporary dot-file ending in ``.tmp`` in the same directory
    (created ``O_EXCL | O_NOFOLLOW``; directory watchers ignore it), fsynced, made 0644 and moved
    over ``path`` with :func:`os.replace`; the directory is fsynced so the rename survives a
    crash.  With ``root``, ``path`` must lie inside it (:func:`~huntsman.paths.inside`)
    and missing directories are created without following links out of it.
    """
    return write_atomic(path, hdulist.writeto, root=root, mode=0o644)
