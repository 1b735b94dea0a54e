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

Files that move or vanish (reported to a :class:`FileTracker`, the ingestor):

* ``MOVED_FROM`` and ``MOVED_TO`` with the same cookie are one rename within the tree: the
  document (or, for a directory, every document below it) moves to the new name.  A
  ``MOVED_FROM`` left unpaired for ``_PAIR_S`` was a move out of the tree: treated as deleted.
* ``DELETE`` marks the file's document missing; every scan also compares the tree with the
  database (documents whose file is gone are marked missing).
* The root itself moved, deleted or replaced (``MOVE_SELF``/``DELETE_SELF``/``IGNORED`` on its
  watch, or the configured path no longer naming the watched directory, checked every
  ``_ROOT_CHECK_S``: a renamed parent gives no event): watching stops, the configured path
  is polled every ``_ROOT_POLL_S`` until a directory is there again, and watching restarts
  with a full reconciliation scan.

Scanned files may still be being written; the ingestor decides (see ``FileSource.SCAN``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from asyncinotify import Event, Inotify, Mask

from huntsman.config import WatcherConfig
from huntsman.logs import Logger
from huntsman.models import FileSource, IngestRequest, utcnow

__all__ = ["DirectoryWatcher", "FileTracker", "is_candidate"]

_DIR_MASK = (
    Mask.CLOSE_WRITE
    | Mask.MOVED_TO
    | Mask.MOVED_FROM
    | Mask.CREATE
    | Mask.DELETE
    | Mask.DELETE_SELF
    | Mask.MOVE_SELF
    | Mask.ONLYDIR
    | Mask.EXCL_UNLINK
)
_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".swp", "~")

_ROOT_LOST = Mask.MOVE_SELF | Mask.DELETE_SELF | Mask.IGNORED
# The kernel queues the two halves of a rename next to each other; this is ample.
_PAIR_S = 0.5
# How often a lost raw root is looked for at the configured path.
_ROOT_POLL_S = 0.5
# How often the configured path is checked to still be the watched directory (a parent renamed
# or a mount changed gives the root's own watch no event).
_ROOT_CHECK_S = 2.0

Submit = Callable[[IngestRequest], Awaitable[None]]


class FileTracker(Protocol):
    """What the watcher reports besides new files: renames and disappearances."""

    async def file_moved(self, old: str, new: str) -> bool: ...
    async def tree_moved(self, old_dir: str, new_dir: str) -> int: ...
    async def file_gone(self, path: str) -> None: ...
    async def tree_gone(self, directory: str) -> None: ...
    async def reconcile(self, top: str, present: set[str]) -> None: ...


class _RootLost(Exception):
    """The raw root's own watch reported it moved, deleted or gone."""


def is_candidate(name: str, extensions: Iterable[str]) -> bool:
    """Whether a file name is a FITS file worth ingesting (and not a temporary name)."""
    if name.startswith(".") or name.lower().endswith(_TEMP_SUFFIXES):
        return False
    lower = name.lower()
    return any(lower.endswith(ext.lower()) for ext in extensions)


def _complete_on_create(path: str) -> bool:
    """A symlink or a new hard link is complete as soon as it exists: it gets no CLOSE_WRITE."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISLNK(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink > 1)


class DirectoryWatcher:
    """Feeds every completed FITS file under ``root`` to ``submit``."""

    def __init__(
        self,
        root: Path,
        submit: Submit,
        config: WatcherConfig,
        log: Logger,
        tracker: FileTracker | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self._submit = submit
        self._config = config
        self._log = log.bind(component="watcher")
        self._tracker = tracker
        self._inotify: Inotify | None = None
        self._root_wd: int | None = None
        # MOVED_FROM halves waiting for their MOVED_TO: cookie -> (path, is_dir, time)
        self._moves: dict[int, tuple[Path, bool, float]] = {}
        self._moves_waiting = asyncio.Event()
        self._busy = False  # handling an event (possibly waiting on a full ingest queue)
        self._idle_since = 0.0
        self.ready = asyncio.Event()
        self.scans = 0
        self.overflows = 0
        self.events = 0
        self.root_restarts = 0

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
        await self._track("reconcile", str(top), set(files))
        for path in files:
            await self._submit(IngestRequest(path, seen, source))
        self.scans += 1
        self._log.info("tree_scanned", top=str(top), files=len(files), source=str(source))
        return len(files)

    # -- events -------------------------------------------------------------------------
    async def _track(self, what: str, *args: Any) -> None:
        """Report to the tracker; a failure (the database away) is logged, never fatal: the
        next scan compares the tree with the database again."""
        if self._tracker is None:
            return
        try:
            await getattr(self._tracker, what)(*args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._log.warning("file_tracking_failed", action=what, args=[str(a) for a in args[:2]],
                              error=f"{type(exc).__name__}: {exc}")

    async def _handle(self, event: Event) -> None:
        mask = event.mask
        if Mask.Q_OVERFLOW in mask:
            self.overflows += 1
            self._log.warning("inotify_overflow", overflows=self.overflows)
            await self.scan(self.root)
            return
        watch = event.watch
        if watch is not None and watch.wd == self._root_wd and mask & _ROOT_LOST:
            raise _RootLost("moved" if Mask.MOVE_SELF in mask else
                            "deleted" if Mask.DELETE_SELF in mask else "unwatched")
        path = event.path
        if path is None or event.name is None:
            return
        is_dir = Mask.ISDIR in mask
        if Mask.MOVED_FROM in mask:
            self._moved_from(event.cookie, Path(path), is_dir)
        elif Mask.MOVED_TO in mask:
            await self._moved_to(event.cookie, Path(path), is_dir)
        elif is_dir:
            await self._dir_changed(mask, Path(path))
        elif is_candidate(str(event.name), self._config.extensions):
            await self._file_changed(mask, str(path))

    async def _dir_changed(self, mask: Mask, path: Path) -> None:
        """A directory created (watched and scanned) or deleted (its documents go missing)."""
        if Mask.CREATE in mask:
            await self.scan(path)
        elif Mask.DELETE in mask:
            await self._track("tree_gone", str(path))

    async def _file_changed(self, mask: Mask, path: str) -> None:
        """A candidate file written, linked in, or deleted."""
        if Mask.CLOSE_WRITE in mask:
            await self._submit(IngestRequest(path, utcnow(), FileSource.EVENT))
        elif Mask.DELETE in mask:
            await self._track("file_gone", path)
        elif Mask.CREATE in mask and await asyncio.to_thread(_complete_on_create, path):
            await self._submit(IngestRequest(path, utcnow(), FileSource.EVENT))

    def _moved_from(self, cookie: int, path: Path, is_dir: bool) -> None:
        """The first half of a rename: kept until its ``MOVED_TO`` or for ``_PAIR_S``."""
        if is_dir or is_candidate(path.name, self._config.extensions):
            self._moves[cookie] = (path, is_dir, asyncio.get_running_loop().time())
            self._moves_waiting.set()

    async def _moved_to(self, cookie: int, path: Path, is_dir: bool) -> None:
        origin = self._moves.pop(cookie, None)
        if is_dir:
            if origin is not None and origin[1]:
                await self._track("tree_moved", str(origin[0]), str(path))
            await self.scan(path)  # also corrects the watch paths below the moved directory
            return
        if origin is not None:
            if is_candidate(path.name, self._config.extensions):
                await self._track("file_moved", str(origin[0]), str(path))
            else:  # renamed to a name that is not ingested: gone as far as the tree goes
                await self._track("file_gone", str(origin[0]))
        if is_candidate(path.name, self._config.extensions):
            await self._submit(IngestRequest(str(path), utcnow(), FileSource.EVENT))

    async def _expire_moves(self) -> None:
        """A ``MOVED_FROM`` without its ``MOVED_TO``: moved out of the tree, so gone.

        The time only runs while the watcher is free to read events: one held up by a full
        ingest queue has not yet read the ``MOVED_TO`` that may be waiting for it."""
        loop = asyncio.get_running_loop()
        while True:
            await self._moves_waiting.wait()
            await asyncio.sleep(_PAIR_S)
            now = loop.time()
            for cookie, (path, is_dir, when) in list(self._moves.items()):
                if self._busy or now - max(when, self._idle_since) < _PAIR_S:
                    continue
                if self._moves.pop(cookie, None) is None:
                    continue
                if is_dir:
                    self._forget_watches(path)
                    await self._track("tree_gone", str(path))
                else:
                    await self._track("file_gone", str(path))
            if not self._moves:
                self._moves_waiting.clear()

    def _forget_watches(self, directory: Path) -> None:
        """Drop the watches of a tree that left the raw root (its events are not ours)."""
        assert self._inotify is not None
        for watch in self._inotify.watches:
            if watch.path == directory or watch.path.is_relative_to(directory):
                with contextlib.suppress(OSError):
                    self._inotify.rm_watch(watch)

    async def _periodic_rescan(self) -> None:
        while True:
            await asyncio.sleep(self._config.rescan_interval_s)
            await self.scan(self.root)

    async def run(self) -> None:
        """Watch until cancelled; the start-up scan reconciles the tree with the database.

        If the root goes (moved, deleted, replaced), watching restarts on the configured path
        as soon as a directory is there again."""
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            reason = await self._watch()
            self.root_restarts += 1
            self._log.warning("raw_root_lost", root=str(self.root), reason=reason)
            await self._wait_for_root()
            self._log.info("raw_root_back", root=str(self.root), restarts=self.root_restarts)

    async def _wait_for_root(self) -> None:
        polls = 0
        while not await asyncio.to_thread(self.root.is_dir):
            polls += 1
            if polls % int(60 / _ROOT_POLL_S) == 0:
                self._log.warning("raw_root_absent", root=str(self.root), waited_s=polls * _ROOT_POLL_S)
            await asyncio.sleep(_ROOT_POLL_S)

    async def _watch(self) -> str:
        """Watch the tree until its root is lost; returns why."""
        with Inotify() as inotify:
            self._inotify = inotify
            self._moves.clear()
            try:
                root_watch = await asyncio.to_thread(inotify.add_watch, self.root, _DIR_MASK)
                st = await asyncio.to_thread(os.stat, self.root)
            except OSError as exc:
                return f"cannot watch: {exc.strerror}"
            self._root_wd = root_watch.wd
            await self.scan(self.root, FileSource.RECONCILE)
            self.ready.set()
            self._log.info("watcher_started", root=str(self.root), watches=len(inotify.watches))
            async with asyncio.TaskGroup() as group:
                reader = group.create_task(self._read_events(inotify), name="watcher-events")
                guard = group.create_task(self._guard_root((st.st_dev, st.st_ino)), name="watcher-root")
                others = [
                    group.create_task(self._periodic_rescan(), name="watcher-rescan"),
                    group.create_task(self._expire_moves(), name="watcher-moves"),
                ]
                try:
                    done, _ = await asyncio.wait({reader, guard}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (reader, guard, *others):
                        task.cancel()
                return done.pop().result()

    async def _read_events(self, inotify: Inotify) -> str:
        """Handle events until the root's own watch reports it lost; returns why."""
        loop = asyncio.get_running_loop()
        async for event in inotify:
            self.events += 1
            self._busy = True
            try:
                await self._handle(event)
            except _RootLost as lost:
                return str(lost)
            finally:
                self._busy, self._idle_since = False, loop.time()
        raise AssertionError("inotify stopped yielding events")  # pragma: no cover

    async def _guard_root(self, watched: tuple[int, int]) -> str:
        """Returns once the configured path no longer names the watched directory."""
        while True:
            await asyncio.sleep(_ROOT_CHECK_S)
            try:
                st = await asyncio.to_thread(os.stat, self.root)
            except FileNotFoundError:
                return "gone"
            except OSError as exc:
                self._log.warning("raw_root_unreadable", root=str(self.root), error=exc.strerror)
                continue
            if (st.st_dev, st.st_ino) != watched:
                return "replaced"
