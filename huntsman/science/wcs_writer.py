"""Safe write-back of a plate solution into a raw FITS file's header.

Guarantees
----------
* **Pixel data byte-identical.**  Only the header block of the target HDU is re-serialised;
  every byte before it and every byte after it (data, later HDUs) is copied verbatim from the
  original file.  Nothing goes through astropy's BZERO decoding.
* **Atomic.**  The new file is written to a dot-file in the same directory
  (``.<name>.wcs-tmp``: the watcher ignores dot-files), flushed and fsynced, then
  ``os.replace``-d over the original and the directory is fsynced.  A crash at any moment leaves
  either the complete old or the complete new file under the real name; at worst a stale
  ``.*.wcs-tmp`` remains, which the service removes at start-up with :func:`cleanup_temp_files`.
* **Idempotent ("never twice").**  A marker keyword (``HUNTWCS``) holds a hash of the solution;
  a second call with the same solution is a no-op returning ``False``.
* **All original keywords kept**, except earlier WCS keywords that would conflict with the new
  solution (e.g. stale SIP ``A_*``/``B_*`` terms), which are removed first.

Re-ingestion loop
-----------------
``os.replace`` produces an inotify ``MOVED_TO`` event on the final name.  The service reads
:func:`read_wcs_marker` for such a file: if its exposure document already exists and the
document's stored WCS hash (:func:`solution_hash` of ``wcs.header``) equals the marker, the
event is the service's own write-back and is ignored.

Compressed files
----------------
For ``.fits.fz`` the header that describes the image is the one of HDU 1 (the tile-compressed
binary table); the WCS keywords are written there, and the compressed data are copied verbatim.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from astropy.io import fits

__all__ = [
    "MARKER_KEY",
    "TEMP_SUFFIX",
    "cleanup_temp_files",
    "is_wcs_keyword",
    "read_wcs_marker",
    "solution_hash",
    "strip_wcs",
    "write_wcs_into_raw",
]

MARKER_KEY = "HUNTWCS"
TEMP_SUFFIX = ".wcs-tmp"
_BLOCK = 2880
_COPY_CHUNK = 4 * 1024 * 1024

# Primary celestial WCS keywords (and SIP / astrometry.net extras) replaced by a new solution.
_WCS_KEY = re.compile(
    r"^(WCSAXES|WCSNAME|CTYPE\d|CUNIT\d|CRVAL\d|CRPIX\d|CRDER\d|CSYER\d|CD\d_\d|PC\d_\d|CDELT\d"
    r"|CROTA\d|PV\d_\d+|PS\d_\d+|EQUINOX|RADESYS|RADECSYS|LONPOLE|LATPOLE"
    r"|IMAGEW|IMAGEH|A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|A_DMAX|B_DMAX"
    r"|A_\d+_\d+|B_\d+_\d+|AP_\d+_\d+|BP_\d+_\d+)$"
)


def is_wcs_keyword(key: str) -> bool:
    """Whether ``key`` belongs to the primary celestial WCS (incl. SIP terms)."""
    return bool(_WCS_KEY.match(key.upper()))


def solution_hash(wcs_header: Mapping[str, object]) -> str:
    """A short stable hash (16 hex digits) of a WCS keyword dict, the marker's value."""
    # numpy scalars and Python numbers of equal value hash alike (the dict may have gone
    # through BSON or JSON on its way from the solver).
    items = sorted(
        (str(k).upper(), repr(v.item() if isinstance(v, np.generic) else v))
        for k, v in wcs_header.items()
    )
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def strip_wcs(header: fits.Header) -> fits.Header:
    """A copy of ``header`` without WCS keywords (nor the write-back marker)."""
    out = header.copy()
    for key in list(dict.fromkeys(out.keys())):
        if key and (is_wcs_keyword(key) or key == MARKER_KEY):
            del out[key]
    return out


def _target_hdu(path: Path) -> int:
    return 1 if path.name.lower().endswith(".fz") else 0


def _header_span(path: Path, index: int) -> tuple[int, int]:
    """Byte offsets (start, end) of the header block of HDU ``index``."""
    with fits.open(path, lazy_load_hdus=True) as hdul:
        info = hdul.fileinfo(index)
        if info is None:
            raise ValueError(f"{path}: no HDU {index}")
        return int(info["hdrLoc"]), int(info["datLoc"])


def _read_raw_header(path: Path, index: int) -> tuple[fits.Header, int, int]:
    start, end = _header_span(path, index)
    with open(path, "rb") as fh:
        fh.seek(start)
        raw = fh.read(end - start)
    return fits.Header.fromstring(raw.decode("ascii", errors="replace")), start, end


def read_wcs_marker(path: str | Path, marker_key: str = MARKER_KEY) -> str | None:
    """The write-back marker (solution hash) in a raw file's header, or ``None``."""
    p = Path(path)
    header, _, _ = _read_raw_header(p, _target_hdu(p))
    value = header.get(marker_key)
    return None if value in (None, "") else str(value)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_wcs_into_raw(
    path: str | Path,
    wcs_header: Mapping[str, str | int | float],
    *,
    marker_key: str = MARKER_KEY,
) -> bool:
    """Write a WCS solution into a raw FITS file's header, atomically and at most once.

    Parameters
    ----------
    path : path
        Raw FITS file (``.fits``; for ``.fits.fz`` HDU 1 is updated).  Replaced in place.
    wcs_header : mapping
        WCS keywords (e.g. ``SolveResult.header``).
    marker_key : str
        Keyword recording :func:`solution_hash` of ``wcs_header``.

    Returns
    -------
    bool
        ``True`` if the file was rewritten, ``False`` if it already carries this solution.

    Raises
    ------
    OSError, ValueError
        Unreadable file or header; the original is left untouched.
    """
    p = Path(path)
    index = _target_hdu(p)
    digest = solution_hash(wcs_header)
    header, start, end = _read_raw_header(p, index)
    if str(header.get(marker_key, "")) == digest:
        return False
    new = header.copy()
    for key in list(dict.fromkeys(new.keys())):
        if key and (is_wcs_keyword(key) or key == marker_key):
            del new[key]
    for key, value in wcs_header.items():
        if str(key).upper() in ("COMMENT", "HISTORY", ""):
            continue
        new[str(key)] = value
    new[marker_key] = (digest, "hash of the WCS written by huntsman")
    block = new.tostring(padding=True).encode("ascii")
    if len(block) % _BLOCK:
        raise ValueError("header serialisation is not a multiple of 2880 bytes")

    tmp = p.with_name(f".{p.name}{TEMP_SUFFIX}")
    mode = os.stat(p).st_mode & 0o7777
    try:
        with open(p, "rb") as src, open(tmp, "wb") as dst:
            dst.write(src.read(start))
            dst.write(block)
            src.seek(end)
            while chunk := src.read(_COPY_CHUNK):
                dst.write(chunk)
            dst.flush()
            os.fchmod(dst.fileno(), mode)
            os.fsync(dst.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(p.parent)
    return True


def cleanup_temp_files(directory: str | Path, *, recursive: bool = True) -> list[Path]:
    """Remove write-back temp files (``.*.wcs-tmp``) left by a crash; returns what was removed.

    Called by the service at start-up, before it reconciles the raw tree.
    """
    root = Path(directory)
    pattern = f".*{TEMP_SUFFIX}"
    found = root.rglob(pattern) if recursive else root.glob(pattern)
    removed: list[Path] = []
    for f in found:
        if f.is_file():
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed
