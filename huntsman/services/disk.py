"""DiskMonitor: free space of the directories the service writes, and a gate for the writers.

``shutil.disk_usage`` runs in a thread every ``disk.interval_s``.  A filesystem below the
threshold is *low*: ``disk_low`` is logged once per episode (``disk_ok`` when it recovers),
``/healthz`` reports the reason, and every stage that writes files or documents waits in
:meth:`DiskMonitor.wait_writable` before it starts an item instead of failing it.  When space
returns the waiters resume by themselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huntsman.config import Config, DiskConfig
from huntsman.logs import Logger

__all__ = ["DiskMonitor", "DiskSpace", "is_disk_full", "watched_paths"]

_MB = 1024 * 1024
_RESUME_FACTOR = 1.1

# Names of the watched directories, as used in reasons and in ``wait_writable(...)``.
VAR, DATABASE, CALIB, CALIBRATED, RAW = "var_dir", "database", "calib_dir", "calibrated_dir", "raw_dir"
# What each writer needs: every stage writes documents; the solver writes the WCS into the raw
# file, master builds write under calib_dir, QC the calibrated frame.
DOCUMENTS = (VAR, DATABASE)
SOLVER = (*DOCUMENTS, RAW)
MASTERS = (*DOCUMENTS, CALIB)
QC = (*DOCUMENTS, CALIBRATED)


def watched_paths(config: Config) -> dict[str, Path]:
    """The directories whose filesystems are watched (the database only when embedded)."""
    paths = {VAR: config.paths.var_dir}
    if config.database.uri == "embedded":
        paths[DATABASE] = config.database.embedded.storage_dir
    paths[CALIB] = config.paths.calib_dir
    paths[CALIBRATED] = config.paths.calibrated_dir
    paths[RAW] = config.paths.raw_dir
    return paths


def is_disk_full(exc: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is ENOSPC or EDQUOT."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        current = current.__cause__ or current.__context__
    return False


@dataclasses.dataclass(frozen=True)
class DiskSpace:
    name: str
    path: str
    free_mb: float
    total_mb: float
    low: bool

    def reason(self) -> str:
        return f"{self.name} {self.path}: {self.free_mb:.0f} MB free of {self.total_mb:.0f} MB"


def _existing(path: Path) -> Path:
    """The path itself, or its nearest existing parent (a directory not created yet)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


class DiskMonitor:
    """Measures free space periodically; :meth:`wait_writable` holds writers while it is low."""

    def __init__(self, config: DiskConfig, paths: Mapping[str, Path], log: Logger) -> None:
        self.config = config
        self.paths = dict(paths)
        self._log = log.bind(component="disk")
        self.spaces: dict[str, DiskSpace] = {}
        self._low: set[str] = set()
        self._changed = asyncio.Event()  # set (and replaced) whenever a check completes
        self.checks = 0
        self.episodes = 0

    # -- measuring -------------------------------------------------------------------------
    def _measure(self) -> dict[str, DiskSpace]:
        spaces = {}
        for name, path in self.paths.items():
            try:
                usage = shutil.disk_usage(_existing(path))
            except OSError as exc:
                self._log.warning("disk_usage_failed", directory=name, path=str(path), error=str(exc))
                continue
            free_mb, total_mb = usage.free / _MB, usage.total / _MB
            # Hysteresis: a low directory recovers only 10 % above the threshold, so free space
            # hovering at the threshold does not make an episode of every measurement.
            factor = _RESUME_FACTOR if name in self._low else 1.0
            low = free_mb < factor * self.config.min_free_mb or (
                total_mb > 0 and usage.free / usage.total < factor * self.config.min_free_fraction
            )
            spaces[name] = DiskSpace(name, str(path), free_mb, total_mb, low)
        return spaces

    async def check(self) -> dict[str, DiskSpace]:
        """Measure now (in a thread), log a change of episode and wake the waiters."""
        spaces = await asyncio.to_thread(self._measure)
        self.spaces = spaces
        self.checks += 1
        low = {name for name, space in spaces.items() if space.low}
        if low - self._low:  # one line per episode (and when another directory joins it)
            if not self._low:
                self.episodes += 1
            self._log.warning(
                "disk_low",
                directories=sorted(low),
                free_mb={n: round(spaces[n].free_mb, 1) for n in sorted(low)},
                min_free_mb=self.config.min_free_mb,
                min_free_fraction=self.config.min_free_fraction,
                reason=self._reason(low, spaces),
            )
        if self._low - low:
            self._log.info(
                "disk_ok",
                directories=sorted(self._low - low),
                free_mb={n: round(spaces[n].free_mb, 1) for n in sorted(self._low - low) if n in spaces},
                still_low=sorted(low),
            )
        self._low = low
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return spaces

    async def run(self) -> None:
        """Measure every ``interval_s`` until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(self.config.interval_s)

    # -- state -----------------------------------------------------------------------------
    def low(self, names: Iterable[str] = ()) -> list[str]:
        """Watched directories that are low (of ``names``, or of all when empty)."""
        wanted = set(names) or set(self.paths)
        return sorted(self._low & wanted)

    def reason(self, names: Iterable[str] = ()) -> str | None:
        """One line naming every low directory with its free space, or ``None`` when fine."""
        low = self.low(names)
        return self._reason(set(low), self.spaces) if low else None

    def _reason(self, low: set[str], spaces: Mapping[str, DiskSpace]) -> str:
        threshold = f"{self.config.min_free_mb:g} MB"
        if self.config.min_free_fraction:
            threshold += f" or {self.config.min_free_fraction:.1%}"
        where = "; ".join(spaces[n].reason() for n in sorted(low) if n in spaces)
        return f"disk space low (below {threshold}): {where}"

    def state(self) -> dict[str, Any]:
        return {
            "low": self.low(),
            "free_mb": {n: round(s.free_mb, 1) for n, s in self.spaces.items()},
        }

    # -- the gate --------------------------------------------------------------------------
    async def wait_writable(self, *names: str) -> None:
        """Return at once when the directories (all when none given) have space, else wait.

        Waits for the monitor's next measurements (each wake-up is bounded by ``interval_s``
        plus the measurement; re-measures itself if the monitor task is not running), and is
        cancellable: a shutdown never waits on a full disk.
        """
        if not self.low(names):
            return
        self._log.info("disk_wait", directories=self.low(names))
        while self.low(names):
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), 2 * self.config.interval_s + 5.0)
            except TimeoutError:
                await self.check()  # nobody measured for a while (monitor not running)
