"""Watching the raw-data tree with inotify, without ever losing a file.

How inotify really behaves, and what this watcher does about it:

* Watches are per directory; every directory of the tree gets one, added by the watcher.
* A file is complete on ``CLOSE_WRITE`` (written in place) or ``MOVED_TO`` (renamed in).
* A new or moved-in directory gets watches on its whole tree **and is scanned**: files
  written right after ``mkdir``, or inside a moved-in tree, produce no events of their own.
* ``Q_OVERFLOW`` means events were dropped: the whole tree is rescanned.
* A start-up scan reconciles the tree with the database, and a periodic safety rescan catches
  anything a kernel or filesystem quirk hid.
* Temporary names (dot-files, ``*.tmp``, ``*.part``, rsync's ``.name.XXXXXX``) are ignored;
  symlinked directories are not followed.

Scanned files may still be being written; the ingestor decides (see ``FileSource.SCAN``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from asyncinotify import Inotify, Mask

from huntsman.config import WatcherConfig
from huntsman.models import FileSource, IngestRequest, utcnow

__all__ = ["DirectoryWatcher", "is_candidate"]

_DIR_MASK = (
    Mask.CLOSE_WRITE
    | Mask.MOVED_TO
    | Mask.CREATE
    | Mask.DELETE_SELF
    | Mask.MOVE_SELF
    | Mask.ONLYDIR
    | Mask.EXCL_UNLINK
)
_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".swp", "~")

Submit = Callable[[IngestRequest], Awaitable[None]]


def is_candidate(name: str, extensions: Iterable[str]) -> bool:
    """Whether a file name is a FITS file worth ingesting (and not a temporary name)."""
    if name.startswith(".") or name.lower().endswith(_TEMP_SUFFIXES):
        return False
    lower = name.lower()
    return any(lower.endswith(ext.lower()) for ext in extensions)


class DirectoryWatcher:
    """Feeds every completed FITS file under ``root`` to ``submit``."""

    def __init__(self, root: Path, submit: Submit, config: WatcherConfig, log: Any) -> None:
        self.root = Path(root).resolve()
        self._submit = submit
        self._config = config
        self._log = log.bind(component="watcher")
        self._inotify: Inotify | None = None
        self.ready = asyncio.Event()
        self.scans = 0
        self.overflows = 0
        self.events = 0

    # -- scanning -----------------------------------------------------------------------
    def _watch_and_list(self, top: Path) -> list[str]:
        """Add watches top-down and list candidate files (runs in a thread).

        Each directory gets its watch before it is listed, so a file created after the
        listing produces an event and a file created before it is in the listing.
        """
        assert self._inotify is not None
        files: list[str] = []
        stack = [top]
        while stack:
            directory = stack.pop()
            try:
                watch = self._inotify.add_watch(directory, _DIR_MASK)
                if watch.path != directory:
                    watch.path = directory  # a watched directory moved within the tree
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                self._log.warning("watch_failed", directory=str(directory), error=str(exc))
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif is_candidate(entry.name, self._config.extensions):
                        files.append(entry.path)
                except OSError:
                    continue
        return files

    async def scan(self, top: Path, source: FileSource = FileSource.SCAN) -> int:
        """Watch and scan a tree; submit every candidate file found."""
        files = await asyncio.to_thread(self._watch_and_list, top)
        seen = utcnow()
        for path in files:
            await self._submit(IngestRequest(path, seen, source))
        self.scans += 1
        self._log.info("tree_scanned", top=str(top), files=len(files), source=str(source))
        return len(files)

    # -- events -------------------------------------------------------------------------
    async def _handle(self, event: Any) -> None:
        mask = event.mask
        if Mask.Q_OVERFLOW in mask:
            self.overflows += 1
            self._log.warning("inotify_overflow", overflows=self.overflows)
            await self.scan(self.root)
            return
        path = event.path
        if path is None or event.name is None:
            return
        if Mask.ISDIR in mask:
            if mask & (Mask.CREATE | Mask.MOVED_TO):
                await self.scan(Path(path))
            return
        name = str(event.name)
        if not is_candidate(name, self._config.extensions):
            return
        if mask & (Mask.CLOSE_WRITE | Mask.MOVED_TO):
            await self._submit(IngestRequest(str(path), utcnow(), FileSource.EVENT))
        elif Mask.CREATE in mask and await asyncio.to_thread(os.path.islink, path):
            # A symlink is complete as soon as it exists: it gets no CLOSE_WRITE.
            await self._submit(IngestRequest(str(path), utcnow(), FileSource.EVENT))

    async def _periodic_rescan(self) -> None:
        while True:
            await asyncio.sleep(self._config.rescan_interval_s)
            await self.scan(self.root)

    async def run(self) -> None:
        """Watch until cancelled; the start-up scan reconciles the tree with the database."""
        self.root.mkdir(parents=True, exist_ok=True)
        with Inotify() as inotify:
            self._inotify = inotify
            await self.scan(self.root, FileSource.RECONCILE)
            self.ready.set()
            self._log.info("watcher_started", root=str(self.root), watches=len(inotify._watches))
            async with asyncio.TaskGroup() as group:
                group.create_task(self._periodic_rescan(), name="watcher-rescan")
                async for event in inotify:
                    self.events += 1
                    await self._handle(event)
