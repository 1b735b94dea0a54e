"""Safe write-back of a plate solution into a raw FITS file's header.

Guarantees
----------
* **Pixel data byte-identical.**  Only the header block of the target HDU is re-serialised;
  every byte before it and every byte after it (data, later HDUs) is copied verbatim from the
  original file.  Nothing goes through astropy's BZERO decoding.
* **Atomic.**  The new file is written to a new dot-file in the same directory
  (``.<name>.<random>.wcs-tmp``, created ``O_CREAT | O_EXCL | O_NOFOLLOW``: a planted name or
  link is never followed nor reused; the watcher ignores dot-files), flushed and fsynced, then
  ``os.replace``-d over the original and the directory is fsynced.  A crash at any moment leaves
  either the complete old or the complete new file under the real name; at worst a stale
  ``.*.wcs-tmp`` remains, which the service removes at start-up with :func:`cleanup_temp_files`.
* **Idempotent ("never twice").**  A marker keyword (``HUNTWCS``) holds a hash of the solution;
  a second call with the same solution is a no-op returning ``False``.
* **Only where it may.**  A symbolic link, a file with several hard links, a file outside the
  raw root, or one whose owner could not be kept is refused with :class:`WcsWriteRefused`
  (the reason is recorded on the document as ``wcs.write_error``); owner, group and mode of
  the file are kept.
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

import contextlib
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
from astropy.io import fits

from huntsman.paths import UnsafePathError, create_temp, fsync_dir, inside
from huntsman.science.fitsio import image_hdu_index

__all__ = [
    "MARKER_KEY",
    "TEMP_SUFFIX",
    "WcsWriteRefused",
    "cleanup_temp_files",
    "is_wcs_keyword",
    "read_wcs_marker",
    "solution_hash",
    "strip_wcs",
    "write_wcs_into_raw",
]

MARKER_KEY = "HUNTWCS"


class WcsWriteRefused(ValueError):
    """The raw file must not be rewritten (link, hard links, outside the raw root, owner)."""


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
    """The image HDU (:func:`~huntsman.science.fitsio.find_image_hdu`): 0, or 1 for ``.fits.fz``."""
    with fits.open(path, lazy_load_hdus=True) as hdul:
        return image_hdu_index(hdul)


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


def _refusal(path: Path, info: os.stat_result, root: str | Path | None) -> str | None:
    """Why the write-back must not touch ``path`` (``info``: its ``lstat``), or ``None``."""
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link: the write-back never follows links"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_nlink > 1:
        return f"has {info.st_nlink} hard links: replacing it would split them"
    if root is None:
        return "no raw root given: raw files are only written inside it"
    try:
        inside(path, root)
    except UnsafePathError:
        return f"is outside the raw root {root}"
    euid = os.geteuid()
    if euid != 0 and info.st_uid != euid:
        return f"is owned by uid {info.st_uid}: rewriting it would change its owner"
    return None


def write_wcs_into_raw(
    path: str | Path,
    wcs_header: Mapping[str, str | int | float],
    *,
    root: str | Path | None,
    marker_key: str = MARKER_KEY,
) -> bool:
    """Write a WCS solution into a raw FITS file's header, atomically and at most once.

    Parameters
    ----------
    path : path
        Raw FITS file (``.fits``; for ``.fits.fz`` HDU 1 is updated).  Replaced in place, with
        its owner, group and mode kept.
    wcs_header : mapping
        WCS keywords (e.g. ``SolveResult.header``).
    root : path or None
        The raw root: a file outside it (or ``None``) is never written.
    marker_key : str
        Keyword recording :func:`solution_hash` of ``wcs_header``.

    Returns
    -------
    bool
        ``True`` if the file was rewritten, ``False`` if it already carries this solution.

    Raises
    ------
    WcsWriteRefused
        A symbolic link, a file with several hard links, one outside ``root`` or one whose
        owner cannot be kept; the message says which.  Nothing is written.
    OSError, ValueError
        Unreadable file or header; the original is left untouched.
    """
    p = Path(path)
    reason = _refusal(p, os.lstat(p), root)
    if reason is not None:
        raise WcsWriteRefused(f"{p}: {reason}")
    index = _target_hdu(p)
    digest = solution_hash(wcs_header)
    # Opened without following a link; the checks are repeated on what was opened.
    src_fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(src_fd, "rb") as src:
        info = os.fstat(src.fileno())
        reason = _refusal(p, info, root)
        if reason is not None:
            raise WcsWriteRefused(f"{p}: {reason}")
        header, start, end = _read_raw_header(p, index)
        if str(header.get(marker_key, "")) == digest:
            return False
        block = _new_header_block(header, wcs_header, marker_key, digest)
        fd, tmp = create_temp(p.parent, f".{p.name}.", TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as dst:
                _splice(src, dst, start, end, block)
                _keep_owner_and_mode(p, dst.fileno(), info)
                os.fsync(dst.fileno())
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync_dir(p.parent)
    return True


def _new_header_block(
    header: fits.Header, wcs_header: Mapping[str, str | int | float], marker_key: str,
    digest: str,
) -> bytes:
    """The header block with its old WCS (and marker) replaced by ``wcs_header``, padded."""
    new = header.copy()
    for key in list(dict.fromkeys(new.keys())):
        if key and (is_wcs_keyword(key) or key == marker_key):
            del new[key]
    for key, value in wcs_header.items():
        if str(key).upper() in ("COMMENT", "HISTORY", ""):
            continue
        new[str(key)] = value
    new[marker_key] = (digest, "hash of the WCS written by huntsman")
    block: bytes = new.tostring(padding=True).encode("ascii")
    if len(block) % _BLOCK:
        raise ValueError("header serialisation is not a multiple of 2880 bytes")
    return block


def _splice(src: BinaryIO, dst: BinaryIO, start: int, end: int, block: bytes) -> None:
    """Copy ``src`` into ``dst`` with its bytes ``[start, end)`` replaced by ``block``."""
    src.seek(0)
    dst.write(src.read(start))
    dst.write(block)
    src.seek(end)
    while chunk := src.read(_COPY_CHUNK):
        dst.write(chunk)
    dst.flush()


def _keep_owner_and_mode(p: Path, fd: int, info: os.stat_result) -> None:
    """Give the new file the original's owner, group and mode (refuse if the owner cannot)."""
    made = os.fstat(fd)
    if (info.st_uid, info.st_gid) != (made.st_uid, made.st_gid):
        try:
            os.fchown(fd, info.st_uid, info.st_gid)
        except PermissionError:
            raise WcsWriteRefused(
                f"{p}: its owner {info.st_uid}:{info.st_gid} cannot be kept"
            ) from None
    os.fchmod(fd, stat.S_IMODE(info.st_mode))


def cleanup_temp_files(directory: str | Path, *, recursive: bool = True) -> list[Path]:
    """Remove write-back temp files (``.*.wcs-tmp``) left by a crash; returns what was removed.

    Called by the service at start-up, before it reconciles the raw tree.  Links to
    directories are not descended into; a link with such a name is removed, never its target.
    """
    removed: list[Path] = []
    for top, dirs, files in os.walk(directory, followlinks=False):
        for name in files + dirs:
            if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
                continue
            f = Path(top) / name
            with contextlib.suppress(FileNotFoundError):
                mode = os.lstat(f).st_mode
                if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                    f.unlink()
                    removed.append(f)
        if not recursive:
            break
    return removed
