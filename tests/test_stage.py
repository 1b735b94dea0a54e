"""The stage engine alone, on a real event loop: dedupe, again, isolation, bounded queue, sweep,
join and drain deadlines.  No database: the items are plain names."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from huntsman.logs import get_logger
from huntsman.services.stage import Stage, deadline_s

LOG = get_logger(test="stage")


class Work:
    """A ``process`` function that records each call; items named in ``gates`` wait for
    their gate, items named in ``bad`` raise."""

    def __init__(self, bad: tuple[str, ...] = ()) -> None:
        self.calls: list[str] = []
        self.started: dict[str, asyncio.Event] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.bad = bad

    def gate(self, key: str) -> asyncio.Event:
        self.started[key] = asyncio.Event()
        self.gates[key] = asyncio.Event()
        return self.gates[key]

    async def __call__(self, item: str) -> str:
        self.calls.append(item)
        if item in self.started:
            self.started[item].set()
        if item in self.gates:
            await self.gates[item].wait()
        if item in self.bad:
            raise RuntimeError(f"broken {item}")
        return f"done:{item}"


def stage(work: Callable[[str], Awaitable[str | None]], **options: Any) -> Stage[str, str, str]:
    options = {"queue_size": 10, "concurrency": 2, "log": LOG, "key_field": "filename", **options}
    return Stage("thing", work, key=str, **options)


async def settled(s: Stage[Any, Any, Any], timeout_s: float = 5.0) -> None:
    assert await s.join(timeout_s=timeout_s), s.state()


async def test_a_queued_key_is_queued_once() -> None:
    work = Work()
    s = stage(work)
    assert s.offer("a") is True
    assert s.offer("a") is False  # queued already
    assert s.offer("b") is True
    assert s.state()["queue"] == 2 and s.is_queued("a")
    async with s.running():
        await settled(s)
    assert sorted(work.calls) == ["a", "b"]
    assert s.idle() and s.state() == {"queue": 0, "busy": 0, "again": 0, "counts": {}}


async def test_a_key_offered_while_busy_is_processed_once_more_afterwards() -> None:
    work = Work()
    gate = work.gate("a")
    seen: list[tuple[str, str]] = []

    async def listener(key: str, outcome: str) -> None:
        seen.append((key, outcome))

    s = stage(work)
    s.add_listener(listener)
    async with s.running():
        s.offer("a")
        await asyncio.wait_for(work.started["a"].wait(), 5)
        assert s.offer("a") is True and s.offer("a") is True  # remembered once, not queued
        assert s.state()["busy"] == 1 and s.state()["again"] == 1 and s.state()["queue"] == 0
        assert not await s.join(["a"], timeout_s=0.05)  # busy, and due again
        gate.set()
        await settled(s)
    assert work.calls == ["a", "a"]
    assert seen == [("a", "done:a"), ("a", "done:a")]


async def test_again_only_when_the_stage_says_so_and_renewed() -> None:
    """Keyed by the name after the colon, as the ingestor keys requests by path."""
    work = Work()
    gate = work.gate("x")
    s: Stage[str, str, str] = Stage(
        "thing", work, key=lambda item: item.split(":")[-1], queue_size=2, concurrency=1, log=LOG,
        again_if=lambda item: not item.startswith("scan:"), renew=lambda item: f"renewed:{item}",
    )
    async with s.running():
        s.offer("x")
        await asyncio.wait_for(work.started["x"].wait(), 5)
        assert s.offer("scan:x") is False  # not worth a second look
        assert s.offer("event:x") is True
        assert s.offer("scan:x") is False  # and does not replace the one remembered
        gate.set()
        await settled(s)
    assert work.calls == ["x", "renewed:event:x"]


async def test_a_failing_item_is_logged_once_and_the_consumer_goes_on() -> None:
    work = Work(bad=("bad",))
    s = stage(work, concurrency=1)
    with capture_logs() as logs:
        async with s.running():
            for name in ("one", "bad", "two"):
                assert s.offer(name)
            await settled(s)
            assert s.offer("three")  # the consumer is still there
            await settled(s)
    assert work.calls == ["one", "bad", "two", "three"]
    crashed = [e for e in logs if e["event"] == "thing_crashed"]
    assert len(crashed) == 1 and crashed[0]["filename"] == "bad" and crashed[0]["log_level"] == "error"


async def test_a_failing_listener_touches_neither_the_item_nor_the_other_listeners() -> None:
    work = Work()
    heard: list[str] = []

    async def broken(key: str, outcome: str) -> None:
        raise ValueError("listener bug")

    async def fine(key: str, outcome: str) -> None:
        heard.append(outcome)

    s = stage(work)
    s.add_listener(broken)
    s.add_listener(fine)
    with capture_logs() as logs:
        assert await s.process("direct") == "done:direct"  # a direct call is not failed either
        async with s.running():
            s.offer("queued")
            await settled(s)
    assert heard == ["done:direct", "done:queued"]
    failed = [e for e in logs if e["event"] == "thing_listener_failed"]
    assert [e["filename"] for e in failed] == ["direct", "queued"]
    assert all("broken" in e["listener"] for e in failed)
    assert not [e for e in logs if e["event"] == "thing_crashed"]


async def test_no_listener_hears_an_item_that_came_to_nothing() -> None:
    heard: list[str] = []

    async def nothing(item: str) -> str | None:
        return None

    async def listener(key: str, outcome: str) -> None:
        heard.append(key)

    s = stage(nothing)
    s.add_listener(listener)
    assert await s.process("x") is None
    assert heard == []


async def test_a_full_queue_refuses_and_counts_and_put_waits_for_room() -> None:
    counts: Counter[str] = Counter()
    work = Work()
    s = stage(work, queue_size=2, concurrency=1, counts=counts)
    assert s.offer("a") and s.offer("b")
    assert s.offer("c") is False
    assert counts["queue_full"] == 1 and s.state()["counts"] == {"queue_full": 1}
    put = asyncio.create_task(s.put("c"))
    await asyncio.sleep(0)
    assert not put.done() and s.is_queued("c")  # waiting for room, and already deduped
    assert await s.put("c") is False
    async with s.running():
        assert await asyncio.wait_for(put, 5) is True
        await settled(s)
    assert work.calls == ["a", "b", "c"]


async def test_a_cancelled_put_leaves_nothing_behind() -> None:
    s = stage(Work(), queue_size=1)
    s.offer("a")
    put = asyncio.create_task(s.put("b"))
    await asyncio.sleep(0)
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert s.pending() == {"a"}


async def test_sweep_at_start_up_then_periodically_until_the_queue_is_full() -> None:
    calls: list[bool] = []
    swept = asyncio.Event()
    work = Work()

    async def query(startup: bool) -> AsyncIterator[str]:
        """Frames not processed yet (as the documents would say)."""
        calls.append(startup)
        for n in range(5):
            if f"frame{n}" not in work.calls:
                yield f"frame{n}"
        if not startup:
            swept.set()

    full = stage(Work(), queue_size=3, sweep=query)
    assert await full.sweep(startup=True) == 3  # stops when the queue is full
    assert full.state()["counts"] == {"queue_full": 1} and full.state()["queue"] == 3
    calls.clear()

    s = stage(work, queue_size=3, sweep=query, sweep_interval_s=0.05)
    with capture_logs() as logs:
        async with s.running():  # sweeps at start-up by itself
            await asyncio.wait_for(swept.wait(), 5)
            await settled(s)
    assert calls[:2] == [True, False]
    assert work.calls == [f"frame{n}" for n in range(5)]  # each once
    sweeps = [e for e in logs if e["event"] == "thing_sweep"]
    assert sweeps[0]["startup"] is True and sweeps[0]["queued"] == 3


async def test_drain_gives_up_at_its_deadline() -> None:
    work = Work()
    work.gate("stuck")  # never opened
    s = stage(work)
    with capture_logs() as logs:
        async with s.running():
            s.offer("stuck")
            await asyncio.wait_for(work.started["stuck"].wait(), 5)
            start = time.monotonic()
            assert await s.drain(0.2) is False
            assert 0.15 < time.monotonic() - start < 1.0
            assert s.pending() == {"stuck"}
    abandoned = [e for e in logs if e["event"] == "thing_abandoned"]
    assert [e["filename"] for e in abandoned] == ["stuck"]  # cancelled, and said so


async def test_join_waits_for_the_given_keys_only() -> None:
    work = Work()
    gate = work.gate("slow")
    s = stage(work)
    async with s.running():
        s.offer("slow")
        s.offer("fast")
        assert await s.join(["fast"], timeout_s=5)
        assert not await s.join(["slow"], timeout_s=0.05)
        assert not await s.join(timeout_s=0.05)
        assert await s.join(["never-offered"], timeout_s=0.01)
        gate.set()
        assert await s.join(["slow"], timeout_s=5)
    assert s.idle()


async def test_a_direct_call_raises_and_hands_a_meanwhile_offer_to_the_queue() -> None:
    work = Work(bad=("a",))
    gate = work.gate("a")
    s = stage(work)
    call = asyncio.create_task(s.process("a"))
    await asyncio.wait_for(work.started["a"].wait(), 5)
    assert await s.process("a") is None  # busy: remembered, not run twice at once
    gate.set()
    with pytest.raises(RuntimeError, match="broken a"):
        await call
    assert s.is_queued("a")  # the remembered request still gets its look


async def test_cancellation_propagates_out_of_process() -> None:
    work = Work()
    work.gate("stuck")
    s = stage(work, concurrency=1)
    runner = asyncio.create_task(s.run())
    s.offer("stuck")
    await asyncio.wait_for(work.started["stuck"].wait(), 5)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(runner, 5)
    assert runner.cancelled()


def test_a_stage_without_room_or_consumers_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        stage(Work(), queue_size=0)


async def test_feed_puts_more_than_the_queue_holds_and_reports_progress() -> None:
    work = Work()
    s = stage(work, queue_size=2, concurrency=1)
    seen: list[int] = []
    names = [f"f{i}" for i in range(7)]
    async with s.running():
        assert await s.feed(names, timeout_s=5.0, progress=seen.append) is True
    assert sorted(work.calls) == sorted(names)  # each once, though only 2 fit at a time
    assert seen[-1] == 7 and seen == sorted(seen) and all(0 <= n <= 7 for n in seen)


async def test_feed_gives_up_at_its_deadline() -> None:
    work = Work()
    work.gate("stuck")
    s = stage(work, queue_size=1, concurrency=1)
    async with s.running():
        start = time.monotonic()
        assert await s.feed(["stuck", "next", "last"], timeout_s=0.2) is False
        assert time.monotonic() - start < 1.0
        work.gates["stuck"].set()


def test_deadline_counts_rounds_of_concurrent_items() -> None:
    assert deadline_s(5, 2, 10.0, margin_s=1.0) == 31.0  # 3 rounds
    assert deadline_s(4, 2, 10.0, margin_s=1.0) == 21.0
    assert deadline_s(0, 2, 10.0, margin_s=1.0) == 1.0


async def test_a_queued_key_taken_while_a_direct_call_holds_it_waits_its_turn() -> None:
    running: Counter[str] = Counter()
    most: Counter[str] = Counter()
    release = asyncio.Event()
    calls: list[str] = []

    async def work(item: str) -> str:
        calls.append(item)
        running[item] += 1
        most[item] = max(most[item], running[item])
        await release.wait()
        running[item] -= 1
        return item

    s = stage(work, concurrency=2)
    async with s.running():
        assert s.offer("b")
        direct = asyncio.create_task(s.process("b"))
        await asyncio.sleep(0)
        release.set()
        await direct
        await settled(s)
    assert most["b"] == 1, "the same key ran twice at once"
    assert calls.count("b") == 2  # the queued offer still got its own pass


async def test_an_offer_made_meanwhile_survives_a_cancelled_pass() -> None:
    work = Work()
    gate = work.gate("a")
    s = stage(work, concurrency=1)
    consumer = asyncio.create_task(s.run())
    assert s.offer("a")
    await asyncio.wait_for(work.started["a"].wait(), 5)
    assert s.offer("a")  # remembered: processed once more after this pass
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert s.is_queued("a"), s.state()  # back on the queue for whoever runs the stage next
    gate.set()
    async with s.running():
        await settled(s)
    assert work.calls == ["a", "a"]
