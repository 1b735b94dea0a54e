"""The shared harness of the service benchmarks: service in-process, frames, writer, figures.

``bench_ingest.py`` and ``bench_http_load.py`` measure the real service the way the tests run it
(``huntsman.app.run_service`` with an injectable stop event and the ``started`` callback) on
the embedded database, with every directory under a temporary ``HUNTSMAN_VAR_DIR``.  What they
share lives here:

- frames: template files rendered once in a throw-away process (:func:`render_templates`) and
  written into the watched directory the way the control software writes them (open, write,
  close: one ``CLOSE_WRITE`` each) from a thread (:func:`write_file`, :meth:`Bench.phase`);
- the service: :func:`make_config`, :func:`start_service`, :func:`stop_service`, the
  observation hook on ``record_ingest`` (:meth:`Bench.hook`) and :func:`fetch_documents`;
- figures: latency per file (the document's ``timing.ingested`` minus the moment the writer
  closed the file, wall clock UTC: :func:`latencies`), :func:`pstats`, the RSS and CPU sampler
  (:class:`ProcessSampler`), the event-loop lag probe (:class:`LagProbe`), :func:`machine_info`;
- the run: :func:`run_benchmark` (watchdog, temporary tree, the service's output to
  ``<tmp>/service.log``, the report and the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import faulthandler
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL_SHAPE = (3672, 5496)
SMALL_SHAPE = (800, 800)
LAG_INTERVAL_S = 0.010
RSS_INTERVAL_S = 0.2
MIB = 1024 * 1024

_out: TextIO = sys.stderr  # progress and the table; replaced when fds 1/2 go to the log


def say(*parts: Any) -> None:
    print(*parts, file=_out, flush=True)


# -- frames ---------------------------------------------------------------------------------
def render_template(path: str, shape: tuple[int, int], n_stars: int, seed: int) -> int:
    """Render one synthetic science frame to ``path`` (runs in a throw-away process)."""
    from huntsman.testing import synthetic as syn

    rng = np.random.default_rng(seed)
    ny, nx = shape
    stars = syn.StarField(
        rng.uniform(10, nx - 10, n_stars),
        rng.uniform(10, ny - 10, n_stars),
        10 ** rng.uniform(2.5, 5.2, n_stars),
    )
    psf = syn.MoffatPSF(fwhm_px=3.0 / 1.24, beta=3.2, axis_ratio=0.92, theta_deg=35.0)
    img = syn.render_frame(shape, exptime_s=300.0, sky_adu=400.0, stars=stars, psf=psf, seed=seed)
    header = syn.huntsman_header(observation_type="science", camera_id="TESTCAM03")
    syn.write_raw(path, img, header)
    return os.path.getsize(path)


def render_templates(tmp: Path, need_small: bool) -> tuple[bytes, bytes]:
    """Full and small template files, rendered in one spawned process (keeps our RSS clean)."""
    full, small = tmp / "template_full.fits", tmp / "template_small.fits"
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        jobs = [pool.submit(render_template, str(full), FULL_SHAPE, 3000, 1)]
        if need_small:
            jobs.append(pool.submit(render_template, str(small), SMALL_SHAPE, 60, 2))
        for job in jobs:
            job.result()
    full_bytes = full.read_bytes()
    small_bytes = small.read_bytes() if need_small else b""
    full.unlink()
    small.unlink(missing_ok=True)
    return full_bytes, small_bytes


def write_file(path: Path, data: bytes) -> dt.datetime:
    """Write like the control software: open, write, close; returns the close time (UTC)."""
    with open(path, "xb") as f:
        f.write(data)
    return dt.datetime.now(dt.UTC)


# -- statistics -----------------------------------------------------------------------------
def pstats(values: Iterable[float], scale: float = 1.0) -> dict[str, float | int | None]:
    arr = np.asarray([v for v in values if v is not None], dtype=float) * scale
    if arr.size == 0:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    return {
        "n": int(arr.size),
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
        "mean": float(arr.mean()),
    }


def lookup(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# -- process sampling -----------------------------------------------------------------------
@dataclasses.dataclass
class Peaks:
    main_mb: float = 0.0
    worker_max_mb: float = 0.0
    workers_total_mb: float = 0.0
    db_mb: float = 0.0
    other_mb: float = 0.0
    total_mb: float = 0.0
    total_without_db_mb: float = 0.0
    samples: int = 0


def _tree_rss(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / MIB


class ProcessSampler:
    """Samples RSS of the main process, the pool workers and the database server (thread)."""

    def __init__(self, worker_pids: Callable[[], set[int]]) -> None:
        self.main = psutil.Process()
        self.worker_pids = worker_pids
        self.peaks = Peaks()
        self.phase_peaks: dict[str, Peaks] = {}
        self.phase: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def db_process(self) -> psutil.Process | None:
        for child in self.main.children():
            with contextlib.suppress(psutil.Error):
                if any("secantusd" in part for part in child.cmdline()):
                    return child
        return None

    def sample(self) -> None:
        workers = self.worker_pids()
        main_mb = self.main.memory_info().rss / MIB
        worker_mb: list[float] = []
        db_mb = other_mb = 0.0
        for child in self.main.children(recursive=True):
            try:
                if child.pid in workers:
                    worker_mb.append(child.memory_info().rss / MIB)
                elif any("secantusd" in part for part in child.cmdline()):
                    db_mb += _tree_rss(child)
                elif child.ppid() == self.main.pid:
                    other_mb += child.memory_info().rss / MIB  # forkserver, resource tracker
            except psutil.Error:
                continue
        wtotal = sum(worker_mb)
        for peaks in filter(None, (self.peaks, self.phase_peaks.get(self.phase or ""))):
            peaks.samples += 1
            peaks.main_mb = max(peaks.main_mb, main_mb)
            peaks.worker_max_mb = max(peaks.worker_max_mb, max(worker_mb, default=0.0))
            peaks.workers_total_mb = max(peaks.workers_total_mb, wtotal)
            peaks.db_mb = max(peaks.db_mb, db_mb)
            peaks.other_mb = max(peaks.other_mb, other_mb)
            peaks.total_without_db_mb = max(peaks.total_without_db_mb, main_mb + wtotal + other_mb)
            peaks.total_mb = max(peaks.total_mb, main_mb + wtotal + other_mb + db_mb)

    def set_phase(self, phase: str | None) -> None:
        if phase is not None:
            self.phase_peaks[phase] = Peaks()
        self.phase = phase

    def _run(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            with contextlib.suppress(Exception):  # a process may vanish mid-sample
                self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def cpu_seconds(self) -> dict[str, float]:
        """Cumulative user+system CPU seconds of main, workers and the database server."""
        def cpu(p: psutil.Process) -> float:
            t = p.cpu_times()
            return t.user + t.system

        workers = self.worker_pids()
        out = {"main": cpu(self.main), "workers": 0.0, "db": 0.0}
        for child in self.main.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.pid in workers:
                    out["workers"] += cpu(child)
        db = self.db_process()
        if db is not None:
            with contextlib.suppress(psutil.Error):
                out["db"] = cpu(db) + sum(cpu(c) for c in db.children(recursive=True))
        mine = cpu(self.main)
        for child in self.main.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                mine += cpu(child)
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        out["others"] = busy - mine  # every other process on the machine
        return out


# -- the benchmark --------------------------------------------------------------------------
class LagProbe:
    """Records how late a 10 ms sleep wakes up on the service's event loop."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (monotonic time, lag s)

    async def run(self) -> None:
        # time.monotonic, not loop.time(): uvloop's clock has a 1 ms resolution.
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(LAG_INTERVAL_S)
            now = time.monotonic()
            self.samples.append((now, max(0.0, now - t0 - LAG_INTERVAL_S)))

    def between(self, t0: float, t1: float) -> list[float]:
        return [lag for t, lag in self.samples if t0 <= t <= t1]


@dataclasses.dataclass
class Written:
    path: Path
    phase: str
    nbytes: int
    closed: dt.datetime
    deleted: bool = False


class Bench:
    """The writer of a run: phases of files written into the watched directory, each file's
    close time, and which documents have appeared (through :meth:`hook`).

    ``args`` needs ``time_limit`` (s, bound on all phases) and ``max_on_disk`` (full frames'
    worth of bytes on disk at most: ingested files are deleted, oldest first).
    """

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.deadline = time.monotonic() + args.time_limit
        self.app: Any = None
        self.written: dict[str, Written] = {}
        self.done: dict[str, str] = {}  # filename -> status, set when the document is written
        self.done_event = asyncio.Event()
        self.disk_bytes = 0
        self.max_disk_bytes = int(args.max_on_disk * 40.0 * MIB)
        self.lag = LagProbe()
        self.sampler: ProcessSampler | None = None
        self.phases: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []

    # observation hook: the document exists once record_ingest has returned
    def hook(self, app: Any) -> None:
        exposures = app.database.exposures
        original = exposures.record_ingest

        async def record_ingest(result: Any, **kwargs: Any) -> str:
            status: str = await original(result, **kwargs)
            self.done[result.filename] = status
            self.done_event.set()
            return status

        exposures.record_ingest = record_ingest

    def worker_pids(self) -> set[int]:
        pool = self.app.pool if self.app is not None else None
        executor = getattr(pool, "_executor", None)
        try:
            return set(dict(getattr(executor, "_processes", None) or {}).keys())
        except RuntimeError:  # the dict changed while it was copied
            return set()

    def abort(self) -> None:
        """SIGTERM/SIGINT: end the current phase now, skip the rest, report what was measured."""
        self.notes.append("interrupted by a signal: later phases skipped")
        self.deadline = 0.0

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def _delete_done(self, nbytes: int) -> None:
        """Delete ingested files, oldest first, until ``nbytes`` more fit under the disk cap.

        Lazily: files stay as long as there is room (the solver, when enabled, reads them).
        """
        for name, w in self.written.items():  # insertion order: oldest first
            if self.disk_bytes + nbytes <= self.max_disk_bytes:
                return
            if not w.deleted and name in self.done:
                with contextlib.suppress(FileNotFoundError):
                    w.path.unlink()
                w.deleted = True
                self.disk_bytes -= w.nbytes

    async def _until(self, ready: Callable[[], bool], phase_deadline: float, poll_s: float) -> bool:
        """Wait until ``ready()`` (checked on each new document, at least every ``poll_s``);
        False once the phase's or the run's deadline has passed."""
        while not ready():
            if time.monotonic() > min(phase_deadline, self.deadline):
                return False
            self.done_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done_event.wait(), poll_s)
        return True

    async def _room_for(self, nbytes: int, phase_deadline: float) -> bool:
        """Wait until ``nbytes`` more fit under the disk cap (deleting ingested files)."""
        def room() -> bool:
            self._delete_done(nbytes)
            return self.disk_bytes + nbytes <= self.max_disk_bytes or self.disk_bytes == 0

        return await self._until(room, phase_deadline, 1.0)

    async def _write(self, phase: str, index: int, data: bytes) -> None:
        path = self.app.config.paths.raw_dir / phase / f"{phase}_{index:05d}.fits"
        closed = await asyncio.to_thread(write_file, path, data)
        self.written[str(path)] = Written(path, phase, len(data), closed)
        self.disk_bytes += len(data)

    async def _wait_all(self, names: list[str], phase_deadline: float) -> bool:
        return await self._until(lambda: all(n in self.done for n in names), phase_deadline, 0.5)

    async def phase(self, name: str, n: int, data: bytes, interval_s: float, budget_s: float) -> None:
        if n <= 0:
            return
        budget_s = min(budget_s, self.time_left())
        if budget_s < 10:
            self.phases[name] = {"skipped": "time limit reached before this phase"}
            self.notes.append(f"{name} skipped: time limit")
            return
        assert self.sampler is not None
        (self.app.config.paths.raw_dir / name).mkdir(parents=True, exist_ok=True)
        say(f"[{name}] {n} files of {len(data) / MIB:.1f} MiB, "
            f"{f'every {interval_s:.3g} s' if interval_s else 'as fast as possible'}")
        self.sampler.set_phase(name)
        cpu0 = self.sampler.cpu_seconds()
        m0 = time.monotonic()
        start = dt.datetime.now(dt.UTC)
        phase_deadline = min(m0 + budget_s, self.deadline)
        names: list[str] = []
        write_complete = True
        for i in range(n):
            if time.monotonic() > min(phase_deadline, self.deadline):
                write_complete = False
                break
            if interval_s:
                delay = m0 + i * interval_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if not await self._room_for(len(data), phase_deadline):
                write_complete = False
                break
            await self._write(name, i, data)
            names.append(str(self.app.config.paths.raw_dir / name / f"{name}_{i:05d}.fits"))
            if (i + 1) % max(1, n // 10) == 0:
                say(f"[{name}] written {i + 1}/{n}, documents {sum(x in self.done for x in names)}")
        m_written = time.monotonic()
        complete = await self._wait_all(names, phase_deadline) and write_complete
        m1 = time.monotonic()
        cpu1 = self.sampler.cpu_seconds()
        self.sampler.set_phase(None)
        self.phases[name] = {
            "n_planned": n,
            "n_written": len(names),
            "complete": complete,
            "start": start,
            "names": names,
            "wall_s": m1 - m0,
            "write_s": m_written - m0,
            "monotonic": (m0, m1),
            "cpu_s": {k: cpu1[k] - cpu0[k] for k in cpu0},
            "file_mib": len(data) / MIB,
        }
        say(f"[{name}] {'done' if complete else 'INCOMPLETE'}: "
            f"{sum(x in self.done for x in names)}/{n} documents in {m1 - m0:.1f} s")
        if not complete:
            self.notes.append(f"{name}: not every document appeared within its budget")


# -- the service ---------------------------------------------------------------------------
def make_config(tmp: Path, overrides: list[str], all_services: bool) -> Any:
    from huntsman.config import Config, load_config

    # Section overrides from the environment (HUNTSMAN_POOL__MAX_IN_FLIGHT=8 ...) apply; the
    # database URI and the paths do not: the figures are for the embedded default in a temp tree.
    env = {k: v for k, v in os.environ.items() if k.startswith("HUNTSMAN_") and "__" in k}
    env.update({
        "HUNTSMAN_VAR_DIR": str(tmp / "var"),
        "HUNTSMAN_DATABASE__EMBEDDED__PORT": "0",
        "HUNTSMAN_LOGGING__FORMAT": "json",
    })
    if not all_services:
        # Ingestion only: the synthetic frames' stars are at random positions, so plate solving
        # would fail after a blind search; solving and calibration are benchmarked elsewhere.
        for section in ("astrometry", "calib", "quality"):
            if section in Config.model_fields and "enabled" in getattr(
                Config.model_fields[section].annotation, "model_fields", {}
            ):
                env[f"HUNTSMAN_{section.upper()}__ENABLED"] = "false"
    for item in overrides:
        key, _, value = item.partition("=")
        env["HUNTSMAN_" + key.upper()] = value
    return load_config(ROOT / "etc" / "huntsman.yaml", environ=env, root=tmp)



@dataclasses.dataclass
class Running:
    """The service running in this event loop, stopped through its injectable event."""

    task: asyncio.Task[Any]
    stop: asyncio.Event
    app: Any
    t_start: float  # monotonic, before run_service was called


async def start_service(config: Any, bench: Bench) -> Running:
    """Start the service, observe its documents (``bench``), wait for its watcher.

    SIGTERM/SIGINT then end the benchmark's phases (:meth:`Bench.abort`) instead of the
    service: the benchmark stops it and reports what was measured.
    """
    from huntsman.app import run_service

    stop = asyncio.Event()
    started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    t_start = time.monotonic()
    service = asyncio.create_task(run_service(config, stop, started=started.set_result), name="service")
    done, _ = await asyncio.wait([service, started], timeout=120, return_when="FIRST_COMPLETED")
    if service in done:
        service.result()
        raise RuntimeError("service stopped during start-up")
    if started not in done:
        raise RuntimeError("service did not start within 120 s")
    app = bench.app = started.result()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # replaces the service's handlers: we stop it
        loop.add_signal_handler(sig, bench.abort)
    bench.hook(app)
    ready = asyncio.create_task(app.watcher.ready.wait(), name="watcher-ready")
    done, _ = await asyncio.wait([service, ready], timeout=60, return_when="FIRST_COMPLETED")
    if ready not in done:
        ready.cancel()
        if service in done:
            service.result()
            raise RuntimeError("service stopped before its watcher was ready (a signal?)")
        stop.set()
        raise RuntimeError("the watcher was not ready within 60 s")
    return Running(service, stop, app, t_start)


async def stop_service(running: Running, timeout_s: float = 60.0) -> float | None:
    """Set the stop event and wait; the shutdown time in s, or None if it did not stop."""
    running.stop.set()
    t_stop = time.monotonic()
    done, _ = await asyncio.wait([running.task], timeout=timeout_s)
    if running.task not in done:
        return None
    running.task.result()
    return time.monotonic() - t_stop


async def start_probes(bench: Bench, phases: Iterable[str]) -> tuple[dict[str, Any], asyncio.Task[None]]:
    """Create the phase directories, sample the idle service, start the RSS sampler and the lag
    probe; returns the idle sample and the probe's task (for :func:`stop_probes`).

    The directories exist before the figures start: the scan of a new directory is not what a
    per-file latency should measure.
    """
    for phase in phases:
        (bench.app.config.paths.raw_dir / phase).mkdir(parents=True, exist_ok=True)
    sampler = bench.sampler = ProcessSampler(bench.worker_pids)
    sampler.sample()
    idle = dataclasses.asdict(sampler.peaks)
    sampler.peaks = Peaks()
    sampler.start()
    lag_task = asyncio.create_task(bench.lag.run(), name="lag-probe")
    await asyncio.sleep(2.0)  # idle baseline for the lag; the new directories are scanned
    return idle, lag_task


async def stop_probes(bench: Bench, lag_task: asyncio.Task[None]) -> None:
    lag_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await lag_task
    if bench.sampler is not None:
        bench.sampler.stop()


async def fetch_documents(bench: Bench) -> dict[str, dict[str, Any]]:
    """The documents of every file written, by filename (ingest and timing only)."""
    docs: dict[str, dict[str, Any]] = {}
    names = [n for p in bench.phases.values() for n in p.get("names", [])]
    projection = {"_id": 0, "filename": 1, "ingest": 1, "timing": 1}
    for i in range(0, len(names), 500):
        async for doc in bench.app.database.exposures.find(
            {"filename": {"$in": names[i : i + 500]}}, projection=projection
        ):
            docs[doc["filename"]] = doc
    return docs


@dataclasses.dataclass
class Latencies:
    """Per-file figures of some written files, from their documents."""

    latencies: list[float] = dataclasses.field(default_factory=list)  # s, ingested - closed
    durations: list[float | None] = dataclasses.field(default_factory=list)  # ingest.duration_s
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)  # ingest.status (or missing)
    last_ingested: dt.datetime | None = None


def latencies(bench: Bench, docs: dict[str, dict[str, Any]], names: Iterable[str]) -> Latencies:
    """Latency per file: the document's ``timing.ingested`` minus the writer's close."""
    out = Latencies()
    for fname in names:
        doc = docs.get(fname)
        if doc is None:
            out.statuses["missing"] = out.statuses.get("missing", 0) + 1
            continue
        status = (doc.get("ingest") or {}).get("status")
        out.statuses[status] = out.statuses.get(status, 0) + 1
        ingested = (doc.get("timing") or {}).get("ingested")
        if ingested is not None:
            out.latencies.append((ingested - bench.written[fname].closed).total_seconds())
            out.last_ingested = max(out.last_ingested or ingested, ingested)
        out.durations.append((doc.get("ingest") or {}).get("duration_s"))
    return out


Target = tuple[str, str, float, str, str]  # (figure key, comparison, threshold, unit, source)


def summarise(
    benchmark: str,
    targets_of: list[Target],
    bench: Bench,
    docs: dict[str, Any],
    config: Any,
    idle: dict[str, Any],
    startup_s: float,
    counts: dict[str, int],
) -> dict[str, Any]:
    """The figures of every phase of ``bench`` and of the whole run, checked against the targets."""
    assert bench.sampler is not None
    figures: dict[str, Any] = {}
    all_lags: list[float] = []
    for name, phase in bench.phases.items():
        if "names" not in phase:
            figures[name] = phase
            continue
        per = latencies(bench, docs, phase["names"])
        n = len(phase["names"])
        span = (per.last_ingested - phase["start"]).total_seconds() if per.last_ingested else None
        lags = bench.lag.between(*phase["monotonic"])
        all_lags += lags
        peaks = bench.sampler.phase_peaks.get(name)
        per_file = {
            "latency_s": [round(v, 3) for v in per.latencies],
            "duration_s": [round(v, 3) if v is not None else None for v in per.durations],
        }
        figures[name] = {
            "files": n,
            "complete": phase["complete"],
            "statuses": per.statuses,
            "file_mib": phase["file_mib"],
            "latency_s": pstats(per.latencies),
            "ingest_duration_s": pstats(per.durations),
            "throughput_fps": n / span if span and phase["complete"] else None,
            "throughput_mib_s": n * phase["file_mib"] / span if span and phase["complete"] else None,
            "span_s": span,
            "write_s": phase["write_s"],
            "cpu_s_per_file": {k: v / n for k, v in phase["cpu_s"].items() if k != "others"},
            "other_processes_cpu_cores": phase["cpu_s"]["others"] / phase["wall_s"],
            "event_loop_lag_ms": pstats(lags, 1000.0),
            "peak_rss_mb": dataclasses.asdict(peaks) if peaks else None,
            "per_file": per_file,
        }
    figures["event_loop_lag_ms"] = {"all": pstats(all_lags, 1000.0),
                                    "idle": pstats(bench.lag.between(0, min(
                                        (p["monotonic"][0] for p in bench.phases.values()
                                         if "monotonic" in p), default=float("inf"))), 1000.0)}
    figures["peak_rss_mb"] = dataclasses.asdict(bench.sampler.peaks)
    figures["idle_rss_mb"] = idle
    figures["startup_s"] = startup_s
    figures["ingestor_counts"] = counts
    log = bench.tmp / "service.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    figures["log"] = {
        "lines": text.count("\n"),
        "warnings": text.count('"level": "warning"'),
        "errors": text.count('"level": "error"'),
        "tracebacks": text.count("Traceback"),
    }
    targets = []
    for key, op, threshold, unit, source in targets_of:
        value = lookup(figures, key)
        ok = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
        targets.append({"figure": key, "value": value, "op": op, "target": threshold,
                        "unit": unit, "pass": ok, "source": source})
    return {
        "benchmark": benchmark,
        "args": {k: v for k, v in vars(bench.args).items()},
        "machine": machine_info(),
        "config": {"pool": config.pool.model_dump(), "ingest": config.ingest.model_dump(),
                   "database_uri": config.database.uri},
        "figures": figures,
        "targets": targets,
        "notes": bench.notes,
    }



# -- the run --------------------------------------------------------------------------------
LOAD_AT_START: tuple[float, float, float] | None = None


def machine_info() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import astropy

    return {
        "cpu_count": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "affinity": len(os.sched_getaffinity(0)),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "load_avg_at_start": LOAD_AT_START,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "astropy": astropy.__version__,
        "git_commit": commit,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)



def json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


class Output:
    """fds 1 and 2 go to the service log while the service runs; restored for the report."""

    def __init__(self) -> None:
        self.tmp: Path | None = None
        self.keep = False
        self._saved: tuple[int, int] | None = None
        self._log_fd: int | None = None

    def redirect(self, log: Path) -> None:
        global _out
        self._log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._saved = (os.dup(1), os.dup(2))
        _out = os.fdopen(os.dup(2), "w", buffering=1)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._log_fd, 1)
        os.dup2(self._log_fd, 2)
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)

    def restore(self) -> None:
        if self._saved is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        assert self._log_fd is not None
        os.close(self._log_fd)
        self._saved = None

    def cleanup(self) -> None:
        if self.tmp is None:
            return
        if self.keep:
            say(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


OUTPUT = Output()
T0 = time.monotonic()


Report = Callable[[dict[str, Any]], None]


def finish(out: Path | None, result: dict[str, Any], report: Report, *, hung: bool = False) -> None:
    """Print the report and write the JSON; after a hung shutdown, kill our children and exit."""
    if hung:
        kill_children()
    OUTPUT.restore()
    result["figures"]["total_wall_s"] = time.monotonic() - T0
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    report(result)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=json_default) + "\n")
        say(f"wrote {out}")
    if hung:
        OUTPUT.cleanup()
        os._exit(1)


def kill_children() -> None:
    """Kill every process this benchmark started (the service's workers and database server)."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=10)


def watchdog(limit_s: float) -> None:
    """Hard stop: the benchmark ends by itself even if the service never stops."""
    def run() -> None:
        time.sleep(limit_s)
        say(f"watchdog: {limit_s:.0f} s elapsed, killing the benchmark")
        faulthandler.dump_traceback(all_threads=True)
        kill_children()
        OUTPUT.restore()
        OUTPUT.cleanup()
        os._exit(3)

    threading.Thread(target=run, name="watchdog", daemon=True).start()



Scenario = Callable[[Path, bytes, bytes], Coroutine[Any, Any, dict[str, Any]]]


def run_benchmark(name: str, args: argparse.Namespace, scenario: Scenario, report: Report,
                  *, need_small: bool) -> int:
    """Run ``scenario(tmp, full_template, small_template)`` on uvloop in a temporary tree.

    ``args`` needs ``time_limit`` (the process is killed 180 s after it), ``tmp_dir``, ``keep``
    and ``out``.  The service's JSON log lines, and anything the workers print, go to
    ``<tmp>/service.log``; progress and the report go to the terminal.
    """
    import uvloop

    from huntsman.logs import configure_logging

    global LOAD_AT_START
    LOAD_AT_START = os.getloadavg()
    watchdog(args.time_limit + 180)
    tmp = OUTPUT.tmp = Path(tempfile.mkdtemp(prefix=f"bench_{name}_", dir=args.tmp_dir))
    OUTPUT.keep = args.keep
    say(f"rendering templates in {tmp} ...")
    full, small = render_templates(tmp, need_small)
    say(f"templates: full {len(full) / MIB:.1f} MiB"
        + (f", small {len(small) / MIB:.2f} MiB" if need_small else "")
        + f" ({time.monotonic() - T0:.1f} s)")
    OUTPUT.redirect(tmp / "service.log")
    try:
        configure_logging("INFO", "json")
        result = uvloop.run(scenario(tmp, full, small))
        finish(args.out, result, report)
    finally:
        OUTPUT.restore()
        OUTPUT.cleanup()
    return 0
