"""Where the service may write: header values as path components, containment, atomic files.

Header values are data, never paths.  Every value that becomes part of a file or directory name
(camera, filter, field, date, a raw file's stem) goes through :func:`path_component`, and every
output path is checked with :func:`inside` (or created with :func:`make_dirs`) before it is
opened.  Temporary files are created by :func:`create_temp` with
``O_CREAT | O_EXCL | O_NOFOLLOW``: an existing name, a planted symbolic link included, is never
followed nor reused.

:func:`path_component` is injective: a clean value (letters, digits, ``.``, ``_``, ``-``; not
starting with a dot or a dash; at most :data:`MAX_COMPONENT` characters) is kept as it is;
any other value becomes a slug followed by ``-h`` and 8 hex digits of the SHA-256 of the
original.  A clean value never ends in that pattern (one that does is treated as unclean), so
``A_B`` and ``A/B`` (→ ``A_B-h…``) can never name the same file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "MAX_COMPONENT",
    "UnsafePathError",
    "create_temp",
    "inside",
    "make_dirs",
    "path_component",
    "private_dir",
    "write_atomic",
]

MAX_COMPONENT = 64
_CLEAN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HASHED = re.compile(r"-h[0-9a-f]{8}$")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")
_TEMP_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)


class UnsafePathError(ValueError):
    """An output path that would leave its directory or pass through a symbolic link."""


def path_component(value: object, *, empty: str = "unknown") -> str:
    """One safe, collision-free path component for a header value.

    ``None`` and ``''`` (absent, as the control software writes it) become ``empty`` plus the
    hash; ``.``, ``..``, values with ``/``, spaces, other characters, a leading dot or dash, or
    more than :data:`MAX_COMPONENT` characters become a slug plus the hash of the original.
    """
    text = "" if value is None else str(value)
    if len(text) <= MAX_COMPONENT and _CLEAN.fullmatch(text) and not _HASHED.search(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    slug = _UNSAFE_RUN.sub("_", text).strip("._-")[:MAX_COMPONENT].rstrip("._-") or empty
    return f"{slug}-h{digest}"


def _real(path: str | os.PathLike[str], resolve: bool = True) -> str:
    absolute = os.path.abspath(path)
    return os.path.realpath(absolute) if resolve else os.path.normpath(absolute)


def inside(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    *,
    allow_root: bool = False,
    resolve: bool = True,
) -> Path:
    """``path`` if it lies strictly below ``root`` (or is ``root``, with ``allow_root``) once
    ``..`` and (with ``resolve``, which reads the filesystem) symbolic links are resolved;
    :class:`UnsafePathError` otherwise.  ``resolve=False`` is a pure check for the event loop;
    the worker that opens the file checks again with ``resolve``."""
    real, top = _real(path, resolve), _real(root, resolve)
    if not (real.startswith(top.rstrip(os.sep) + os.sep) or (allow_root and real == top)):
        raise UnsafePathError(f"{os.fspath(path)} is outside {os.fspath(root)}")
    return Path(path)


def is_inside(
    path: str | os.PathLike[str], root: str | os.PathLike[str], *, allow_root: bool = False
) -> bool:
    """Whether :func:`inside` accepts ``path`` (links resolved: reads the filesystem)."""
    try:
        inside(path, root, allow_root=allow_root)
    except UnsafePathError:
        return False
    return True


def make_dirs(directory: str | os.PathLike[str], root: str | os.PathLike[str], mode: int = 0o755) -> Path:
    """Create ``directory`` (and its missing parents) below ``root``, never through a symbolic
    link pointing elsewhere; ``root`` itself is created if missing."""
    top = Path(_real(root))
    top.mkdir(parents=True, exist_ok=True)
    target = Path(directory)
    real = Path(_real(inside(target, root, allow_root=True)))
    current = top
    for part in real.relative_to(top).parts:
        current = current / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(current, mode)
        info = os.lstat(current)
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafePathError(f"{current} is not a directory")
    inside(target, root, allow_root=True)  # nothing was swapped for a link while creating
    return target


def create_temp(
    directory: str | os.PathLike[str], prefix: str, suffix: str, mode: int = 0o600
) -> tuple[int, Path]:
    """A new file ``<directory>/<prefix><random><suffix>`` opened for writing.

    ``O_CREAT | O_EXCL | O_NOFOLLOW``: never an existing file, never through a link.  The
    prefix is shortened so the name stays well below the 255-byte limit.
    """
    prefix = prefix[:120]
    for _ in range(100):
        path = Path(directory) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, _TEMP_FLAGS, mode), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], object],
    *,
    root: str | os.PathLike[str] | None = None,
    mode: int = 0o644,
) -> Path:
    """Write a file so readers see either the old one or the complete new one.

    ``write`` is called with a binary stream on a temporary file of the same directory
    (:func:`create_temp`, a dot-name ending in ``.tmp`` that directory watchers ignore); the
    file is fsynced, given ``mode`` and renamed over ``path`` (a link at ``path`` is replaced,
    never followed), then the directory is fsynced.  With ``root`` the directory is created by
    :func:`make_dirs` and ``path`` must lie inside ``root`` (its directory resolved).  On error
    the temporary file is removed.
    """
    path = Path(path)
    if root is not None:
        make_dirs(path.parent, root)
        # The directory resolved, the name not: a link at ``path`` is replaced, not followed.
        inside(Path(_real(path.parent)) / path.name, root, resolve=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            os.fchmod(stream.fileno(), mode)
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` owner-only (0700), or make an existing one of ours owner-only."""
    directory = Path(path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_mode & 0o077 and info.st_uid == os.geteuid():
        os.chmod(directory, stat.S_IMODE(info.st_mode) & 0o700)
    return directory
