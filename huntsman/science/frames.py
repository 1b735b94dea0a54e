"""Reading raw FITS frames defensively: every way a file can be broken becomes a clear reason."""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from numpy.typing import NDArray

from huntsman.science.fitsio import find_image_hdu
from huntsman.values import finite_or_none

__all__ = [
    "FrameError",
    "RawFrame",
    "header_to_dict",
    "n_pixels",
    "read_frame",
    "salvage_header",
]

_BLOCK = 2880


class FrameError(Exception):
    """A file that cannot be read as a raw frame; the message says why, for the operator.

    ``header`` carries what could be read before the failure (possibly ``None``).
    """

    def __init__(self, reason: str, header: fits.Header | None = None) -> None:
        super().__init__(reason)
        self.header = header


@dataclasses.dataclass(frozen=True)
class RawFrame:
    """Pixel data (2-D, as stored) and the header describing it.

    ``corrupt_cards`` maps keywords whose cards do not parse to the reason; those keywords
    are removed from ``header`` so nothing downstream uses a value astropy had to guess.
    """

    header: fits.Header
    data: NDArray[np.number[Any]]

    hdu_index: int
    n_hdus: int
    warnings: tuple[str, ...]
    corrupt_cards: dict[str, str] = dataclasses.field(default_factory=dict)


def _corrupt_cards(header: fits.Header) -> dict[str, str]:
    bad: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for card in header.cards:
            try:
                card.verify("exception")
            except VerifyError as exc:
                text = " ".join(str(exc).split())
                match = re.search(r"\((invalid value string[^)]*)\)", text)
                bad[card.keyword] = match.group(1) if match else text
    return bad


def _plain(value: Any) -> Any:
    """A header value as a BSON-safe Python value."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return finite_or_none(value)
    if isinstance(value, complex):
        return str(value)
    if isinstance(value, str):
        return value
    return None if value is None or isinstance(value, fits.card.Undefined) else str(value)


def header_to_dict(header: fits.Header) -> dict[str, Any]:
    """Every keyword and its value; repeated keywords (COMMENT, HISTORY) become lists.

    Dots in keyword names (possible with HIERARCH) become underscores so they are valid
    MongoDB field names.  Cards that cannot be parsed are kept as their raw text.
    """
    result: dict[str, Any] = {}
    for card in header.cards:
        key = card.keyword.replace(".", "_").replace("$", "_")
        try:
            value = _plain(card.value)
        except (VerifyError, ValueError):
            value = card.image.strip()
        if key in ("COMMENT", "HISTORY", ""):
            key = key or "BLANK"
            result.setdefault(key, []).append(str(value))
        elif key in result:
            previous = result[key]
            result[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            result[key] = value
    return result


def _check_size(path: Path, hdul: fits.HDUList) -> None:
    """Raise if the file is shorter than its headers say (a truncated or half-copied file)."""
    size = path.stat().st_size
    last = hdul[-1]
    info = last.fileinfo()
    if info is None:
        return
    expected = info["datLoc"] + last._data_size
    if size < expected:
        raise FrameError(f"truncated FITS file: {size} bytes on disk, headers describe {expected}")


def _open(path: Path) -> fits.HDUList:
    try:
        hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
    except FileNotFoundError:
        raise FrameError("file vanished before it could be read") from None
    except IsADirectoryError:
        raise FrameError("path is a directory, not a file") from None
    except PermissionError:
        raise FrameError("file is not readable (permission denied)") from None
    except (OSError, VerifyError, ValueError, IndexError) as exc:
        if os.path.exists(path) and os.path.getsize(path) == 0:
            raise FrameError("empty file (0 bytes)") from None
        raise FrameError(_diagnose(path, str(exc))) from None
    return hdul


def _diagnose(path: Path, fallback: str) -> str:
    """Why astropy refused a file, found by reading its first header ourselves."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_BLOCK * 64)
    except OSError as exc:
        return f"cannot read file: {exc.strerror}"
    if not head.startswith(b"SIMPLE  ="):
        return "not a FITS file: it does not start with a SIMPLE card"
    if len(head) < _BLOCK:
        return f"truncated FITS file: {len(head)} bytes, shorter than one header block"
    cards = [head[i : i + 80] for i in range(0, len(head) - 79, 80)]
    for number, raw in enumerate(cards, start=1):
        if raw.rstrip() == b"END":
            break
        if not all(32 <= byte < 127 for byte in raw):
            return f"header has no END card: binary data from card {number} on"
        try:
            card = fits.Card.fromstring(raw.decode("ascii"))
            card.verify("exception")
            _ = card.value
        except (UnicodeDecodeError, VerifyError, ValueError):
            keyword = raw[:8].decode("ascii", "replace").strip()
            text = raw.decode("ascii", "replace").rstrip()
            return f"corrupt header card {number} ({keyword}): cannot parse {text!r}"
    else:
        return "header has no END card"
    return f"not a valid FITS file: {fallback}"


def salvage_header(path: str | Path, max_blocks: int = 64) -> fits.Header | None:
    """The parseable cards of a damaged primary header (bad cards skipped), or ``None``."""
    with open(path, "rb") as fh:
        head = fh.read(_BLOCK * max_blocks)
    if not head.startswith(b"SIMPLE  ="):
        return None
    header = fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _append_good_cards(header, head)
    return header if len(header) else None


def _append_good_cards(header: fits.Header, head: bytes) -> None:
    for i in range(0, len(head) - 79, 80):
        raw = head[i : i + 80]
        if raw.rstrip() == b"END":
            break
        try:
            card = fits.Card.fromstring(raw.decode("ascii"))
            card.verify("exception")
            header.append((card.keyword, card.value, card.comment))
        except (UnicodeDecodeError, VerifyError, ValueError):
            continue


def n_pixels(header: fits.Header) -> int:
    """Pixels of the image a header describes: the product of ``NAXISn`` (``ZNAXISn`` when
    the header still has them, as a tile-compressed table's does)."""
    prefix = "ZNAXIS" if "ZNAXIS" in header else "NAXIS"
    naxis = header.get(prefix, 0)
    if not isinstance(naxis, int) or naxis <= 0:
        return 0
    total = 1
    for axis in range(1, naxis + 1):
        length = header.get(f"{prefix}{axis}", 0)
        if not isinstance(length, int) or length < 0:
            raise FrameError(f"invalid {prefix}{axis} = {length!r} in the image header", header)
        total *= length
    return total


def _check_pixels(header: fits.Header, max_pixels: int | None) -> None:
    if not max_pixels:
        return
    total = n_pixels(header)
    if total > max_pixels:
        axes = "×".join(str(header.get(f"NAXIS{i}")) for i in range(1, int(header["NAXIS"]) + 1))
        raise FrameError(
            f"frame too large: {axes} = {total / 1e6:.1f} Mpx is above the limit of "
            f"{max_pixels / 1e6:.1f} Mpx (ingest.max_pixels); pixel data not read",
            header,
        )


def read_frame(
    path: str | Path, *, with_data: bool = True, max_pixels: int | None = None
) -> RawFrame:
    """Read a raw frame; :class:`FrameError` with a clear reason for every kind of bad file.

    The primary HDU is used when it holds an image; otherwise the first image extension
    (always HDU 1 for ``.fits.fz``), with the primary header's keywords merged underneath.
    An image of more than ``max_pixels`` pixels (``None`` or 0: no limit) is refused from its
    header alone, before any pixel is read.
    """
    path = Path(path)
    if path.is_dir():
        raise FrameError("path is a directory, not a file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hdul = _open(path)
        with hdul:
            if len(hdul) == 0:
                raise FrameError("not a valid FITS file: no HDUs")
            primary_header = hdul[0].header
            found = find_image_hdu(hdul)
            index = 0 if found is None else found
            hdu = hdul[index]
            header = hdu.header.copy() if index == 0 else _merged(primary_header, hdu.header)
            if found is not None:
                _check_pixels(header, max_pixels)  # before anything reads or sizes the data
            try:
                _check_size(path, hdul)
            except FrameError as exc:
                exc.header = primary_header
                raise
            if found is None:
                raise FrameError("FITS file holds no 2-D image", primary_header)
            corrupt = _corrupt_cards(header)
            for keyword in corrupt:
                header.remove(keyword, ignore_missing=True, remove_all=True)
            notes = [f"corrupt header card {k} ignored: {v}" for k, v in corrupt.items()]
            notes += [str(w.message) for w in caught if "Verif" not in type(w.message).__name__]
            if len(hdul) > 1 and not isinstance(hdu, fits.CompImageHDU):
                notes.append(f"multi-extension file: image taken from HDU {index} of {len(hdul)}")
            data = np.empty((0, 0), dtype=np.uint16)
            if with_data:
                try:
                    data = np.asarray(hdu.data)
                except (ValueError, TypeError, OSError) as exc:
                    raise FrameError(f"cannot read pixel data: {exc}", header) from None
                except Exception as exc:  # a corrupt tile (CfitsioException), MemoryError...
                    raise FrameError(
                        f"cannot read pixel data: {type(exc).__name__}: {_one_line(exc)}", header
                    ) from None
                if data.ndim != 2:
                    raise FrameError(f"image has {data.ndim} dimensions, expected 2", header)
            return RawFrame(header, data, index, len(hdul), tuple(dict.fromkeys(notes)), corrupt)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _merged(primary: fits.Header, extension: fits.Header) -> fits.Header:
    merged = fits.Header()
    structural = {"SIMPLE", "EXTEND", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "PCOUNT", "GCOUNT"}
    for card in primary.cards:
        if card.keyword not in structural and card.keyword not in ("COMMENT", "HISTORY", ""):
            merged[card.keyword] = (card.value, card.comment)
    for card in extension.cards:
        if card.keyword in ("COMMENT", "HISTORY", ""):
            continue
        merged[card.keyword] = (card.value, card.comment)
    return merged
