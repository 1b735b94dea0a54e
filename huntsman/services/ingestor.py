"""FileIngestor: every raw file becomes exactly one exposure document.

Requests arrive on the :class:`~huntsman.services.stage.Stage` keyed by path (the watcher
waits when its queue is full: back-pressure; if the kernel's inotify queue overflows
meanwhile, the watcher rescans, so nothing is lost).  A file completed again while it is being
ingested is looked at once more afterwards.  Each file is processed in its own ``try``: a bad
file is recorded as failed, never stops the loop; a listener's failure never touches the
recorded document.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from pymongo.errors import PyMongoError

from huntsman.config import IngestConfig, WatcherConfig
from huntsman.logs import Logger
from huntsman.models import FileSource, IngestParams, IngestRequest, IngestResult, IngestStatus, utcnow
from huntsman.science.wcs_writer import read_wcs_marker
from huntsman.services.disk import DOCUMENTS, DiskMonitor
from huntsman.services.stage import Stage
from huntsman.store.database import retry_writes
from huntsman.store.exposures import ExposureCollection, FileIdentity, FileState
from huntsman.workers.ingest import ingest_file
from huntsman.workers.pool import ComputePool, JobFailed, JobTimeout, PoolBroken

__all__ = ["FileIngestor", "Ingested"]

# Called with (filename, the document's fields) once a file is ingested successfully.
Listener = Callable[[str, dict[str, Any]], Awaitable[None]]

# Inodes remembered with the names they were ingested under (to catch races between names).
_RECENT_INODES = 4096


class Ingested(NamedTuple):
    """What ingesting one file came to: the stored status, and the fields the listeners hear
    (``None`` when the file failed or was quarantined)."""

    status: IngestStatus
    fields: dict[str, Any] | None


class _Stat(NamedTuple):
    size: int
    mtime_ns: int
    mtime: float
    dev: int
    ino: int

    @property
    def identity(self) -> FileIdentity:
        return FileIdentity(self.dev, self.ino, self.size, self.mtime_ns)


def _identity(path: str) -> _Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Stat(st.st_size, st.st_mtime_ns, st.st_mtime, st.st_dev, st.st_ino)


def _holds(path: str, state: FileState) -> bool:
    """Whether ``path`` is (still) a name of the inode recorded on ``state``."""
    ident = _identity(path)
    return ident is not None and state.same_inode(ident.identity)


class FileIngestor:
    """Consumes ingest requests with a bounded number of concurrent jobs."""

    def __init__(
        self,
        exposures: ExposureCollection,
        pool: ComputePool,
        params: IngestParams,
        config: IngestConfig,
        watcher_config: WatcherConfig,
        log: Logger,
        *,
        concurrency: int,
        write_retry_s: float = 60.0,
    ) -> None:
        self.exposures = exposures
        self.pool = pool
        self.params = params
        self.config = config
        self.settle_s = watcher_config.settle_s
        self.write_retry_s = write_retry_s  # the result waits this long for an absent database
        self._log = log.bind(component="ingestor")
        self._closed: set[str] = set()  # completion event seen while queued from a scan
        self._deferred: set[asyncio.Task[None]] = set()
        self._recent_inodes: dict[tuple[int, int], set[str]] = {}  # bounded, oldest first
        self.counts = {"ok": 0, "failed": 0, "quarantined": 0, "skipped": 0,
                       "moved": 0, "linked": 0, "missing": 0}
        self.latencies: list[float] = []
        self.disk: DiskMonitor | None = None  # set by the application: pauses on a full disk
        self.stage: Stage[str, IngestRequest, Ingested] = Stage(
            "ingest", self._ingest, key=_path, queue_size=config.queue_size, concurrency=concurrency,
            log=self._log, counts=self.counts, key_field="filename",
            # Closed again while in flight: its content may have changed, look once more.
            again_if=_completed, renew=_completed_now,
        )

    # -- intake -------------------------------------------------------------------------
    async def submit(self, request: IngestRequest) -> None:
        """Queue a file unless it is already queued or in hand (waits if the queue is full)."""
        if request.source is FileSource.EVENT and self.stage.is_queued(request.path):
            self._closed.add(request.path)  # closed while queued from a scan: needs no settling
        await self.stage.put(request)

    def add_listener(self, listener: Listener) -> None:
        """``listener(filename, fields)`` after each successful ingestion (isolated)."""

        @functools.wraps(listener)
        async def heard(path: str, outcome: Ingested) -> None:
            if outcome.fields is not None:
                await listener(path, outcome.fields)

        self.stage.add_listener(heard)

    @property
    def queue(self) -> asyncio.Queue[IngestRequest]:
        return self.stage.queue

    def idle(self) -> bool:
        return self.stage.idle() and not self._deferred

    async def join(self, paths: list[str] | None = None, *, timeout_s: float) -> bool:
        """Wait until these files (default: all) are ingested; ``False`` on timeout."""
        return await self.stage.join(paths, timeout_s=timeout_s)

    # -- processing ---------------------------------------------------------------------
    async def run(self) -> None:
        await self.stage.run()

    async def _decide(self, request: IngestRequest, state: FileState | None) -> str | None:
        """Why this file must be (re)ingested, or ``None`` to skip it."""
        if request.force:
            return "forced"
        ident = await asyncio.to_thread(_identity, request.path)
        if state is None:
            if ident is not None and await self._known_content(request.path, ident.identity):
                return None
            return "new"
        if state.missing and ident is not None:
            await self.exposures.unmark_missing(request.path)
            self._log.info("exposure_back", filename=request.path)
        same = ident is not None and (ident[0], ident[1]) == (state.file_size, state.file_mtime_ns)
        if state.status == IngestStatus.OK:
            if same and ident is not None and not state.same_inode(ident.identity):
                # Rewritten under the same size and mtime (a copy tool), or a document from
                # before inodes were recorded: only the identity moves.
                await self.exposures.set_fields(request.path, {"file.dev": ident.dev, "file.ino": ident.ino})
            if same or ident is None:
                return None
            if await self._own_wcs_write(request.path, state, ident):
                return None
            return "changed"
        if state.status == IngestStatus.FAILED:
            if not same:
                return "changed"
            if request.source in (FileSource.RECONCILE, FileSource.CLI, FileSource.EVENT):
                return "retry"
            return None
        # quarantined: only new content brings it back
        return None if same else "changed"

    async def _known_content(self, path: str, ident: FileIdentity) -> bool:
        """Whether a new name holds content that already has a document: a hard link of an
        ingested file (recorded on its document, ``file.links``) or a file renamed while
        nobody watched (its document moves to the new name)."""
        for other in await self.exposures.by_identity(ident, exclude=path):
            if path in other.links:
                return True
            if await asyncio.to_thread(_holds, other.filename, other):
                await self.exposures.add_link(other.filename, path)
                self.counts["linked"] += 1
                self._log.info("hard_link_recognised", filename=path, link_of=other.filename)
                return True
            if await self.exposures.move(other.filename, path):
                self.counts["moved"] += 1
                self._log.info("exposure_moved", filename=path, previous=other.filename, how="identity")
                return True
        return False

    def _seen_elsewhere(self, path: str, ident: _Stat) -> bool:
        """Whether this inode was recently ingested under another name too (a rename or a
        hard link racing its own ingestion): only then is the database asked."""
        key = (ident.dev, ident.ino)
        names = self._recent_inodes.pop(key, set()) | {path}
        self._recent_inodes[key] = names
        while len(self._recent_inodes) > _RECENT_INODES:
            del self._recent_inodes[next(iter(self._recent_inodes))]
        return len(names) > 1

    async def _dedupe(self, path: str, ident: FileIdentity) -> bool:
        """After a new document: merge documents of the same inode written concurrently
        (a rename or hard link racing its own ingestion).  The oldest live document keeps
        the file; ``False`` if that is not ``path``'s (whose document then goes)."""
        states = await self.exposures.by_identity(ident)
        if len(states) < 2:
            return True
        alive = [s for s in states if await asyncio.to_thread(_holds, s.filename, s)]
        keeper = alive[0].filename if alive else path
        for other in states:
            if other.filename not in (keeper, path) and other not in alive:
                await self.exposures.absorb(other.filename, keeper)
                self._log.info("exposure_moved", filename=keeper, previous=other.filename, how="merged")
        if keeper == path:
            return True
        await self.exposures.delete(path)
        await self.exposures.add_link(keeper, path)
        self.counts["linked"] += 1
        self._log.info("hard_link_recognised", filename=path, link_of=keeper)
        return False

    async def _vanished(self, path: str, state: FileState | None, log: Logger) -> None:
        """The file went while it was read: no document for a name that no longer exists (a
        renamed file is ingested under its new name); an existing one is marked missing."""
        self.counts["skipped"] += 1
        log.info("ingest_vanished")
        if state is not None:
            await self.file_gone(path)

    async def _own_wcs_write(
        self, path: str, state: FileState, ident: _Stat
    ) -> bool:
        """Whether a change is the service's own WCS write-back (then only the identity moves).

        The control software never writes the marker keyword, so a file that carries it and
        whose document has no other solution was rewritten by the solver, not replaced.
        """
        try:
            marker = await asyncio.to_thread(read_wcs_marker, path)
        except Exception:  # unreadable now: let the ingestion record why
            return False
        if marker is None or state.wcs_marker not in (None, marker):
            return False
        await self.exposures.set_fields(
            path, {"file.size": ident.size, "file.mtime_ns": ident.mtime_ns,
                   "file.dev": ident.dev, "file.ino": ident.ino},
        )
        self.counts["skipped"] += 1
        return True

    async def process(self, request: IngestRequest) -> IngestStatus | None:
        """Ingest one file now; returns the stored status, or ``None`` if skipped."""
        outcome = await self.stage.process(request)
        return None if outcome is None else outcome.status

    async def _ingest(self, request: IngestRequest) -> Ingested | None:
        try:
            return await self._ingest_file(request)
        finally:
            self._closed.discard(request.path)

    async def _ingest_file(self, request: IngestRequest) -> Ingested | None:
        path = request.path
        log = self._log.bind(filename=path, source=str(request.source))
        state = await self.exposures.state(path)
        reason = await self._decide(request, state)
        if reason is None:
            self.counts["skipped"] += 1
            return None
        settled = request.force or path in self._closed
        if request.source in (FileSource.SCAN, FileSource.RECONCILE) and not settled:
            ident = await asyncio.to_thread(_identity, path)
            if ident is not None and time.time() - ident[2] < self.settle_s:
                self._defer(request)  # possibly still being written; its CLOSE_WRITE may follow
                return None
        if self.disk is not None:
            await self.disk.wait_writable(*DOCUMENTS)
        start = time.perf_counter()
        try:
            result = await self.pool.run(ingest_file, path, self.params)
        except (JobTimeout, PoolBroken, JobFailed) as exc:
            result = await asyncio.to_thread(_failure, path, str(exc), time.perf_counter() - start)
        ident = await asyncio.to_thread(_identity, path)
        if ident is None and not await asyncio.to_thread(os.path.lexists, path):
            await self._vanished(path, state, log)
            return None
        if ident is not None and (ident.size, ident.mtime_ns) == (result.file_size, result.file_mtime_ns):
            result = dataclasses.replace(result, file_dev=ident.dev, file_ino=ident.ino)
        same_content = (
            state is not None
            and ident is not None
            and (ident[0], ident[1]) == (state.file_size, state.file_mtime_ns)
        )
        status = await self._record(
            result, log, seen_at=request.seen_at, previous=state, same_content=same_content
        )
        self.counts[status] = self.counts.get(status, 0) + 1
        if (reason == "new" and ident is not None and self._seen_elsewhere(path, ident)
                and not await self._dedupe(path, ident.identity)):
            return None  # a second name of a file that already has its document
        latency = (utcnow() - request.seen_at).total_seconds()
        self.latencies = [*self.latencies[-999:], latency]
        fields = result.fields
        if not result.ok:
            log.warning("ingest_failed", status=status, error=result.error, reason=reason)
            return Ingested(status, None)
        log.info(
            "exposure_ingested",
            status=status,
            reason=reason,
            observation_type=fields.get("observation_type"),
            camera=fields.get("camera"),
            duration_s=round(result.duration_s, 3),
            latency_s=round(latency, 3),
        )
        if self.params.camera_numbers and not fields.get("camera_known", True):
            log.warning("camera_unknown", camera=fields.get("camera"))
        return Ingested(status, fields)

    async def _record(
        self, result: IngestResult, log: Logger, *, seen_at: dt.datetime, previous: FileState | None,
        same_content: bool,
    ) -> IngestStatus:
        """Write the document; a write the database refuses while the disk is full waits for
        space and is retried (the file is not failed with the database's message)."""
        while True:
            try:
                return IngestStatus(await retry_writes(
                    lambda: self.exposures.record_ingest(
                        result, seen_at=seen_at, previous=previous, max_tries=self.config.max_tries,
                        same_content=same_content,
                    ),
                    deadline_s=self.write_retry_s, log=log, what="ingest_result",
                ))
            except PyMongoError as exc:
                if self.disk is None:
                    raise
                await self.disk.check()
                if not self.disk.low(DOCUMENTS):
                    raise
                log.warning("ingest_write_waiting", error=str(exc)[:300], reason=self.disk.reason())
                await self.disk.wait_writable(*DOCUMENTS)

    def _defer(self, request: IngestRequest) -> None:
        async def later() -> None:
            await asyncio.sleep(self.settle_s)
            await self.submit(IngestRequest(request.path, request.seen_at, FileSource.SCAN))

        task = asyncio.get_running_loop().create_task(later(), name=f"defer:{request.path}")
        self._deferred.add(task)
        task.add_done_callback(self._deferred.discard)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until the queue is empty and nothing is in flight; ``False`` on timeout."""
        return await self.stage.drain(timeout_s)

    # -- files that move or vanish (called by the watcher) --------------------------------
    async def file_moved(self, old: str, new: str) -> bool:
        """A file renamed within the raw tree: its document follows; ``False`` if it had none."""
        await self.exposures.remove_link(new)  # a link name renamed over holds other content
        moved = await self.exposures.move(old, new)
        if not moved:
            owner = await self.exposures.link_owner(old)  # one name of a hard-linked file
            if owner is not None:
                await self.exposures.remove_link(old)
                await self.exposures.add_link(owner.filename, new)
                moved = True
        if moved:
            self.counts["moved"] += 1
            self._log.info("exposure_moved", filename=new, previous=old, how="rename")
        return moved

    async def tree_moved(self, old_dir: str, new_dir: str) -> int:
        """A directory renamed within the raw tree: every document below it follows."""
        n = await self.exposures.move_tree(old_dir, new_dir)
        self.counts["moved"] += n
        self._log.info("directory_moved", directory=new_dir, previous=old_dir, documents=n)
        return n

    async def file_gone(self, path: str) -> None:
        """A file deleted or moved out of the tree: marked missing, unless it lives on under
        another of its hard-linked names (then the document moves there)."""
        await self.exposures.remove_link(path)
        state = await self.exposures.state(path)
        if state is None:
            return
        if await self._to_surviving_link(state):
            return
        if await self.exposures.mark_missing([path]):
            self.counts["missing"] += 1
            self._log.info("exposure_missing", filename=path)

    async def _to_surviving_link(self, state: FileState) -> bool:
        for link in state.links:
            if await asyncio.to_thread(_holds, link, state):
                await self.exposures.move(state.filename, link)
                self.counts["moved"] += 1
                self._log.info("exposure_moved", filename=link, previous=state.filename, how="link")
                return True
        return False

    async def tree_gone(self, directory: str) -> None:
        """A directory moved out of the tree (or deleted): every document below it is missing."""
        n = await self.exposures.mark_missing_under(directory)
        self.counts["missing"] += n
        self._log.info("directory_missing", directory=directory, documents=n)

    async def reconcile(self, top: str, present: set[str]) -> None:
        """After a scan of ``top``: documents below it whose file is gone are marked missing
        (streamed; each candidate is checked on disk once more, since the listing is older)."""
        gone: list[tuple[str, tuple[str, ...]]] = []
        stale_links: set[str] = set()
        async for filename, missing, links in self.exposures.iter_under(top):
            stale_links.update(link for link in links if link not in present)
            if filename not in present and not (missing and not links):
                gone.append((filename, links))
        if not gone and not stale_links:
            return
        names = [name for name, _ in gone]
        exist = await asyncio.to_thread(lambda: {p for p in [*names, *stale_links] if os.path.lexists(p)})
        for link in sorted(stale_links - exist):
            await self.exposures.remove_link(link)
        plain: list[str] = []
        for filename, links in gone:
            if filename in exist:
                continue
            if links:
                state = await self.exposures.state(filename)
                if state is not None and await self._to_surviving_link(state):
                    continue
            plain.append(filename)
        n = 0
        for i in range(0, len(plain), 1000):
            n += await self.exposures.mark_missing(plain[i:i + 1000])
        if n:
            self.counts["missing"] += n
            self._log.info("exposures_missing", top=top, documents=n)

    def abandoned(self) -> list[str]:
        """Paths still queued (for the shutdown log: they are redone at the next start)."""
        return sorted(self.stage.pending())


def _path(request: IngestRequest) -> str:
    return request.path


def _completed(request: IngestRequest) -> bool:
    """Only a completed write (not a scan's sighting) of a file in hand is worth a second look."""
    return request.source is FileSource.EVENT


def _completed_now(request: IngestRequest) -> IngestRequest:
    return IngestRequest(request.path, utcnow(), FileSource.EVENT)


def _failure(path: str, error: str, duration_s: float) -> IngestResult:
    ident = _identity(path)
    return IngestResult(
        filename=path,
        fields={},
        header=None,
        metrics={},
        error=error,
        warnings=(),
        duration_s=duration_s,
        file_size=ident[0] if ident else None,
        file_mtime_ns=ident[1] if ident else None,
    )
