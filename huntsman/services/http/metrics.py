"""The ``/metrics`` exposition: a prometheus_client collector over the service's state and views.

The text is written by ``prometheus_client.generate_latest`` (format 0.0.4) from this module's
own :class:`~prometheus_client.CollectorRegistry`, never the library's global one, and served
by the status server (not the library's HTTP server, which has none of its limits).  The
collector builds every family at scrape time: this process's figures from the application's
``state()``, the pool, the disk watch and the HTTP counters; the database's from the store's
views, fetched (with their deadline) just before the registry is collected.

Summaries carry nearest-rank quantiles computed here (:func:`quantiles`): prometheus_client's
``Summary`` keeps no quantiles, and these come from stored documents, not from observations
made in this process.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from huntsman import __version__
from huntsman.services.disk import DiskMonitor
from huntsman.services.http.health import HealthChecks
from huntsman.store import views
from huntsman.store.exposures import ExposureCollection
from huntsman.workers.pool import ComputePool

__all__ = ["CONTENT_TYPE", "RECENT_DOCS", "MetricsExporter", "ServiceCollector", "quantiles", "queue_depths"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RECENT_DOCS = 500  # exposures the duration and latency summaries are computed over
_QUANTILES = (0.5, 0.9, 0.99)


def quantiles(values: Sequence[float], qs: Sequence[float] = _QUANTILES) -> dict[float, float]:
    """Nearest-rank quantiles (no interpolation: each is a value that was observed)."""
    ordered = sorted(values)
    if not ordered:
        return {q: math.nan for q in qs}
    return {q: ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] for q in qs}


def queue_depths(state: Mapping[str, Any]) -> dict[str, int]:
    """Queue depths from the application's state (the same record as the heartbeat)."""
    qc = state.get("qc")
    qc = qc if isinstance(qc, dict) else {}
    depths = {"ingest": state.get("ingest_queue"), "solve": state.get("solve_queue"), "qc": qc.get("queue")}
    return {k: int(v) for k, v in depths.items() if isinstance(v, int)}


@dataclasses.dataclass(frozen=True)
class DatabaseFigures:
    """What one scrape read from the database."""

    counts: list[views.ExposureCount]
    times: views.StageTimes


class ServiceCollector(Collector):
    """Yields every ``huntsman_*`` family, built when the registry is collected."""

    def __init__(
        self,
        state: Callable[[], dict[str, Any]],
        pool: ComputePool | None,
        disk: DiskMonitor | None,
        health: HealthChecks,
        refused: Callable[[], int],
    ) -> None:
        self.state = state
        self.pool = pool
        self.disk = disk
        self.health = health
        self.refused = refused
        # Set by MetricsExporter.render right before it collects (no await in between).
        self.database: DatabaseFigures | None = None

    def collect(self) -> Iterator[Metric]:
        state = self.state()
        info = GaugeMetricFamily("huntsman_info", "Service version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield from self._database_counts()
        yield _stage_outcomes(state)
        depths = GaugeMetricFamily(
            "huntsman_queue_depth", "Items waiting in each bounded queue.", labels=["queue"]
        )
        for queue, depth in queue_depths(state).items():
            depths.add_metric([queue], depth)
        yield depths
        yield from self._process()
        yield from self._database_times()

    def _database_counts(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "huntsman_files_ingested_total",
            "Exposure documents by observation type and ingest status (from the database).",
            labels=["observation_type", "status"],
        )
        for row in self.database.counts if self.database else []:
            family.add_metric([row.observation_type or "unknown", row.ingest_status or "unknown"], row.n)
        yield family

    def _process(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "huntsman_pool_in_flight",
            "Jobs running in the compute pool.",
            self.pool.in_flight if self.pool else 0,
        )
        yield CounterMetricFamily(
            "huntsman_pool_rebuilds_total",
            "Compute pool rebuilds (hung or dead workers).",
            self.pool.rebuilds if self.pool else 0,
        )
        yield GaugeMetricFamily(
            "huntsman_event_loop_lag_seconds", "Latest measured event-loop lag.", self.health.loop_lag_s
        )
        if self.disk is not None:
            yield from _disk(self.disk)
        yield CounterMetricFamily(
            "huntsman_http_refused_total", "Requests answered 503 at once (too many).", self.refused()
        )

    def _database_times(self) -> Iterator[Metric]:
        times = self.database.times if self.database else views.StageTimes({}, {})
        yield _summary(
            "huntsman_stage_duration_seconds",
            f"Work time per stage over the {RECENT_DOCS} most recent exposures.",
            times.durations,
        )
        yield _summary(
            "huntsman_latency_seconds",
            f"From shutter close (else file seen) to each stage, {RECENT_DOCS} most recent exposures.",
            times.latencies,
        )


def _stage_outcomes(state: Mapping[str, Any]) -> Metric:
    family = CounterMetricFamily(
        "huntsman_stage_outcomes_total",
        "Outcomes of this process's stages since start.",
        labels=["stage", "outcome"],
    )
    for stage, key in (("ingest", "counts"), ("solve", "solve_counts")):
        for outcome, n in sorted((state.get(key) or {}).items()):
            family.add_metric([stage, outcome], n)
    return family


def _disk(disk: DiskMonitor) -> Iterator[Metric]:
    free = GaugeMetricFamily(
        "huntsman_disk_free_bytes", "Free space of each watched directory.", labels=["directory"]
    )
    for name, space in sorted(disk.spaces.items()):
        free.add_metric([name], space.free_mb * 1024 * 1024)
    yield free
    low = GaugeMetricFamily(
        "huntsman_disk_low", "1 while a directory's free space is below the threshold.", labels=["directory"]
    )
    below = set(disk.low())
    for name in sorted(disk.spaces):
        low.add_metric([name], int(name in below))
    yield low


def _summary(name: str, documentation: str, samples: Mapping[str, Sequence[float]]) -> Metric:
    """A summary labelled by ``stage``: nearest-rank quantiles, count and sum of each."""
    family = SummaryMetricFamily(name, documentation, labels=["stage"])
    for stage, values in samples.items():
        for q, v in quantiles(values).items():
            family.add_sample(name, {"stage": stage, "quantile": str(q)}, v)
        family.add_metric([stage], len(values), sum(values))
    return family


class MetricsExporter:
    """Renders ``/metrics``: the views' queries, then ``generate_latest`` on its own registry."""

    def __init__(self, exposures: ExposureCollection, collector: ServiceCollector, timeout_s: float) -> None:
        self.exposures = exposures
        self.collector = collector
        self.timeout_s = timeout_s
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)

    async def render(self) -> str:
        counts = await views.exposure_counts(self.exposures, timeout_s=self.timeout_s)
        times = await views.recent_stage_times(self.exposures, RECENT_DOCS, timeout_s=self.timeout_s)
        self.collector.database = DatabaseFigures(counts, times)
        return generate_latest(self.registry).decode("utf-8")
