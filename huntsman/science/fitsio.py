"""FITS input/output helpers shared by the science layer.

Raw Huntsman frames are BITPIX 16 with ``BZERO = 32768`` (unsigned 16-bit).  astropy refuses
``memmap=True`` for such scaled data, so nothing here passes it; reads use astropy's default.
Compressed ``.fits.fz`` files keep header and data in HDU 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from huntsman.science.paths import write_atomic

__all__ = ["image_hdu_index", "read_raw", "write_fits_atomic"]


def image_hdu_index(hdul: fits.HDUList) -> int:
    """Index of the first HDU holding a 2-D image (0 for plain files, 1 for ``.fits.fz``)."""
    for index, hdu in enumerate(hdul):
        if hdu.header.get("NAXIS", 0) == 2 or isinstance(hdu, fits.CompImageHDU):
            return index
    raise ValueError(f"{hdul.filename()}: no 2-D image HDU")


def read_raw(path: str | Path) -> tuple[np.ndarray, fits.Header]:
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
    crash.  With ``root``, ``path`` must lie inside it (:func:`~huntsman.science.paths.inside`)
    and missing directories are created without following links out of it.
    """
    return write_atomic(path, hdulist.writeto, root=root, mode=0o644)
