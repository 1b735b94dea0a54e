"""Stage: the one engine that runs a service's items through a keyed, bounded work queue.

Ingestion, plate solving and QC each give it a ``process`` function (and optionally a ``before``
hook and a sweep query); the machine around them lives here once:

- a bounded queue (``asyncio.Queue(maxsize)``) keyed by ``key(item)``: a key that is queued is
  not queued twice; a key offered while it is being processed is remembered (*again*) and
  processed once more as soon as the current pass ends, by the same consumer (so a consumer
  never waits on its own full queue);
- queue-full policy: :meth:`Stage.offer` returns ``False`` and counts ``queue_full`` (the
  stage's sweep finds the item later: its state is on its document); :meth:`Stage.put` waits
  for room instead (back-pressure on a caller that has no sweep behind it, the watcher);
- ``concurrency`` consumers; an optional ``before`` hook per queued item (the disk wait);
- an optional sweep (an async iterable of items to offer) at start-up and every
  ``sweep_interval_s``;
- per-item isolation: an exception is logged once (``<name>_crashed``) and the consumer goes
  on; ``CancelledError`` propagates (logged ``<name>_abandoned``).  The outcome line of an item
  is the stage function's own (``exposure_ingested``, ``frame_solved``, ``qc_done`` ...);
- listeners, awaited with ``(key, outcome)`` for every outcome that is not ``None``, each in its
  own ``try``: a failing listener is logged (``<name>_listener_failed``) and neither the item
  nor the other listeners are affected;
- :meth:`Stage.join` (given keys, or everything) and :meth:`Stage.drain`, each with a deadline;
  :meth:`Stage.idle`, :meth:`Stage.state`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

from huntsman.logs import Logger
from huntsman.services.tasks import cancel_and_wait, raise_if_cancelling

__all__ = ["Listener", "Stage", "deadline_s"]

KeyT = TypeVar("KeyT", bound=Hashable)  # what dedupes: a file name
ItemT = TypeVar("ItemT")  # what is queued: the key and the per-offer options (force, source ...)
OutcomeT = TypeVar("OutcomeT")  # what processing one item returns (``None``: nothing to tell)

# Awaited with (key, outcome) after an item's outcome (not ``None``) is known.
Listener = Callable[[KeyT, OutcomeT], Awaitable[None]]
Sweep = Callable[[bool], AsyncIterable[ItemT]]  # called with ``startup``: items worth offering

_STOP_S = 5.0  # how long :meth:`Stage.running` waits for its consumers to stop


def _always(item: object) -> bool:
    return True


def deadline_s(n_items: int, concurrency: int, item_s: float, margin_s: float = 60.0) -> float:
    """A deadline for ``n_items`` run ``concurrency`` at a time, each bounded by ``item_s``
    (its job's timeout and its document write's retry deadline), plus ``margin_s``."""
    return -(-n_items // max(1, concurrency)) * item_s + margin_s


class Stage(Generic[KeyT, ItemT, OutcomeT]):
    """A keyed, bounded work queue with ``concurrency`` consumers around one ``process``."""

    def __init__(
        self,
        name: str,
        process: Callable[[ItemT], Awaitable[OutcomeT | None]],
        *,
        key: Callable[[ItemT], KeyT],
        queue_size: int,
        concurrency: int,
        log: Logger,
        before: Callable[[ItemT], Awaitable[None]] | None = None,
        sweep: Sweep[ItemT] | None = None,
        sweep_interval_s: float | None = None,
        again_if: Callable[[ItemT], bool] = _always,
        renew: Callable[[ItemT], ItemT] | None = None,
        counts: dict[str, int] | None = None,
        key_field: str = "key",
    ) -> None:
        """
        ``again_if`` says whether an item offered while its key is being processed is worth
        processing once more (the ingestor: only a completed write); ``renew`` makes the item
        processed once more from the one remembered (default: that item).  ``counts`` is the
        service's own counter record, which gets ``queue_full``; ``key_field`` names the key in
        the log lines (``filename``).
        """
        if queue_size < 1 or concurrency < 1:
            raise ValueError(f"stage {name}: queue_size and concurrency must be at least 1")
        self.name = name
        self._process = process
        self._key = key
        self.queue: asyncio.Queue[ItemT] = asyncio.Queue(maxsize=queue_size)
        self.concurrency = concurrency
        self._log = log
        self._before = before
        self._sweep = sweep
        self.sweep_interval_s = sweep_interval_s
        self._again_if = again_if
        self._renew = renew
        self.counts: dict[str, int] = counts if counts is not None else {}
        self._key_field = key_field
        self.listeners: list[Listener[KeyT, OutcomeT]] = []
        self._queued: set[KeyT] = set()  # on the queue, or waiting in :meth:`put` for room
        self._busy: set[KeyT] = set()
        self._again: dict[KeyT, ItemT] = {}  # offered while busy: processed once more afterwards
        self._changed = asyncio.Event()  # replaced at every change: what :meth:`join` waits on

    # -- intake -------------------------------------------------------------------------
    def offer(self, item: ItemT) -> bool:
        """Queue ``item`` without waiting; ``True`` if it will be processed (queued now, or
        remembered to be processed again); ``False`` if its key is queued already, or the
        queue is full (counted as ``queue_full``: the sweep finds it later)."""
        key = self._key(item)
        if key in self._queued:
            return False
        if key in self._busy:
            return self._remember(key, item)
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.counts["queue_full"] = self.counts.get("queue_full", 0) + 1
            return False
        self._queued.add(key)
        self._wake()
        return True

    async def put(self, item: ItemT) -> bool:
        """Queue ``item``, waiting while the queue is full (back-pressure); same answer as
        :meth:`offer`.  The wait ends when a consumer takes an item (or the caller is
        cancelled), so its deadline is the caller's."""
        key = self._key(item)
        if key in self._queued:
            return False
        if key in self._busy:
            return self._remember(key, item)
        self._queued.add(key)
        try:
            await self.queue.put(item)
        except BaseException:
            self._queued.discard(key)
            self._wake()
            raise
        self._wake()
        return True

    def _remember(self, key: KeyT, item: ItemT) -> bool:
        if not self._again_if(item):
            return False
        self._again[key] = item
        return True

    async def offer_all(self, items: AsyncIterable[ItemT]) -> int:
        """Offer items until the queue is full; how many will be processed."""
        n = 0
        try:
            async for item in items:
                if self.queue.full():
                    self.counts["queue_full"] = self.counts.get("queue_full", 0) + 1
                    break
                n += self.offer(item)
        finally:
            close = getattr(items, "aclose", None)  # a generator left early closes its cursor now
            if close is not None:
                await close()
        return n

    async def sweep(self, *, startup: bool = False) -> int:
        """Offer what the sweep query finds (until the queue is full); how many were queued."""
        if self._sweep is None:
            return 0
        n = await self.offer_all(self._sweep(startup))
        if n:
            self._log.info(f"{self.name}_sweep", queued=n, startup=startup)
        return n

    # -- processing ---------------------------------------------------------------------
    async def run(self) -> None:
        """The start-up sweep, then the consumers (and the periodic sweep) until cancelled."""
        await self.sweep(startup=True)
        async with asyncio.TaskGroup() as group:
            if self._sweep is not None and self.sweep_interval_s is not None:
                group.create_task(self._sweeping(self.sweep_interval_s), name=f"{self.name}-sweep")
            for n in range(self.concurrency):
                group.create_task(self._consume(), name=f"{self.name}-{n}")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Stage[KeyT, ItemT, OutcomeT]]:
        """Run the stage for the body of an ``async with`` (a command's private service)."""
        task = asyncio.get_running_loop().create_task(self.run(), name=self.name)
        try:
            yield self
        finally:
            await cancel_and_wait([task], _STOP_S, self._log)
        failure = task.exception() if task.done() and not task.cancelled() else None
        if failure is not None:
            raise failure  # a bug in the loop itself

    async def _sweeping(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.sweep(startup=False)

    async def _consume(self) -> None:
        while True:
            raise_if_cancelling()
            item = await self.queue.get()
            try:
                key = self._key(item)
                self._queued.discard(key)
                if key in self._busy:  # in hand already (a direct call): once more afterwards
                    self._again[key] = item
                    continue
                await self._hold(key, item, queued=True)
            finally:
                self.queue.task_done()

    async def process(self, item: ItemT) -> OutcomeT | None:
        """Process one item now (not through the queue), exceptions propagating to the caller.

        If its key is being processed already, the item is remembered and processed once
        more afterwards; this call then returns ``None`` at once.
        """
        key = self._key(item)
        if key in self._busy:
            self._again[key] = item
            return None
        return await self._hold(key, item, queued=False)

    async def _hold(self, key: KeyT, item: ItemT, *, queued: bool) -> OutcomeT | None:
        """Process ``item`` with its key busy, then once more for an offer made meanwhile.

        If processing ends by an exception (a direct call) or a cancellation, an offer made
        meanwhile is not lost: it goes back on the queue."""
        self._busy.add(key)
        self._wake()
        outcome: OutcomeT | None = None
        try:
            while True:
                outcome = await (self._isolated(key, item) if queued else self._once(item, key))
                remembered = self._again.pop(key, None)
                if remembered is None:
                    return outcome
                item = self._renewed(remembered)
                raise_if_cancelling()
        finally:
            self._busy.discard(key)
            leftover = self._again.pop(key, None)  # only after an exception or a cancellation
            if leftover is not None:
                self.offer(self._renewed(leftover))
            self._wake()

    def _renewed(self, item: ItemT) -> ItemT:
        return self._renew(item) if self._renew is not None else item

    async def _isolated(self, key: KeyT, item: ItemT) -> OutcomeT | None:
        try:
            if self._before is not None:
                await self._before(item)
            return await self._once(item, key)
        except asyncio.CancelledError:
            self._log.warning(f"{self.name}_abandoned", **{self._key_field: key})
            raise
        except Exception:  # one bad item never stops the consumer
            self._log.exception(f"{self.name}_crashed", **{self._key_field: key})
            return None

    async def _once(self, item: ItemT, key: KeyT) -> OutcomeT | None:
        outcome = await self._process(item)
        if outcome is not None:
            await self.notify(key, outcome)
        return outcome

    # -- listeners ------------------------------------------------------------------------
    def add_listener(self, listener: Listener[KeyT, OutcomeT]) -> None:
        self.listeners.append(listener)

    async def notify(self, key: KeyT, outcome: OutcomeT) -> None:
        """Await every listener with ``(key, outcome)``, each isolated from the others."""
        for listener in list(self.listeners):
            try:
                await listener(key, outcome)
            except asyncio.CancelledError:
                raise
            except Exception:  # a listener's bug never undoes the recorded outcome
                name = getattr(listener, "__qualname__", repr(listener))
                self._log.exception(f"{self.name}_listener_failed", listener=name,
                                    **{self._key_field: key})

    # -- waiting and state ----------------------------------------------------------------
    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def pending(self) -> set[KeyT]:
        """Keys queued or being processed."""
        return self._queued | self._busy

    def is_queued(self, key: KeyT) -> bool:
        return key in self._queued

    def idle(self) -> bool:
        return not self._queued and not self._busy

    async def join(self, keys: Iterable[KeyT] | None = None, *, timeout_s: float) -> bool:
        """Wait until ``keys`` (default: every key) are neither queued, busy nor remembered to
        be processed again; ``False`` if that did not happen within ``timeout_s``."""
        wanted = None if keys is None else set(keys)

        def done() -> bool:
            pending = self.pending()  # a key remembered to go again is busy until it has
            return not pending if wanted is None else pending.isdisjoint(wanted)

        try:
            async with asyncio.timeout(timeout_s):
                while not done():
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def feed(
        self,
        items: Iterable[ItemT],
        *,
        timeout_s: float,
        progress: Callable[[int], None] | None = None,
    ) -> bool:
        """Put every item on the (running) stage, waiting for room, then wait for those keys:
        ``False`` if that did not happen within ``timeout_s``.  ``progress(done)`` is told how
        many of them are done, as they finish (about every 0.5 s) and at the end."""
        fed: set[KeyT] = set()

        def show() -> None:
            if progress is not None:
                progress(len(fed - self.pending()))

        try:
            async with asyncio.timeout(timeout_s):
                for item in items:
                    await self.put(item)
                    fed.add(self._key(item))
                    show()
                step_s = 0.5 if progress is not None else timeout_s
                while not await self.join(fed, timeout_s=step_s):
                    show()
        except TimeoutError:
            return False
        show()
        return True

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or in hand; ``False`` on timeout."""
        return await self.join(timeout_s=timeout_s)

    def state(self) -> dict[str, Any]:
        return {
            "queue": self.queue.qsize(),
            "busy": len(self._busy),
            "again": len(self._again),
            "counts": dict(self.counts),
        }
