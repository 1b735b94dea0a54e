"""ReportScheduler: writes each night's report once the night is over.

Night D (UTC day D, one Siding Spring night) is over at D ``report.hour_utc``:00 UTC (22 UTC
= 08:00 AEST / 09:00 AEDT, well after morning twilight in every season).  Which nights were
written is kept in the ``reports`` collection (``_id`` = night), so a restart neither redoes a
night nor skips one: after downtime the missed nights are written, at most
:data:`MAX_CATCH_UP_NIGHTS` back.  Plotting runs in a thread; the loop never blocks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path

from pymongo.errors import PyMongoError

from huntsman.config import ReportConfig
from huntsman.logs import Logger
from huntsman.models import utcnow
from huntsman.paths import path_component
from huntsman.report import ReportResult, last_completed_night, write_report
from huntsman.store.database import Database

__all__ = ["MAX_CATCH_UP_NIGHTS", "ReportScheduler"]

MAX_CATCH_UP_NIGHTS = 7


class ReportScheduler:
    """Writes the report of every completed night exactly once."""

    def __init__(
        self,
        database: Database,
        config: ReportConfig,
        reports_dir: Path,
        log: Logger,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        check_interval_s: float = 600.0,
    ) -> None:
        self.database = database
        self.collection = database.db["reports"]
        self.config = config
        self.reports_dir = reports_dir
        self.clock = clock
        self.check_interval_s = check_interval_s
        self._log = log.bind(component="reporter")
        self.written: list[str] = []

    async def due(self) -> list[str]:
        """Completed nights without a report: since the last one written, at most a week back."""
        latest = dt.date.fromisoformat(last_completed_night(self.clock(), self.config.hour_utc))
        last = await self.collection.find_one({}, {"_id": 1}, sort=[("_id", -1)])
        first = latest - dt.timedelta(days=MAX_CATCH_UP_NIGHTS - 1)
        if last is not None:
            first = max(first, dt.date.fromisoformat(last["_id"]) + dt.timedelta(days=1))
        else:
            first = latest  # first start ever: the last night only, not a week of empty pages
        nights = []
        day = first
        while day <= latest:
            nights.append(day.isoformat())
            day += dt.timedelta(days=1)
        return nights

    async def run_once(self) -> list[ReportResult]:
        results = []
        for night in await self.due():
            result = await write_report(
                self.database, night, self.reports_dir / path_component(night),
                worst_n=self.config.worst_n, root=self.reports_dir,
            )
            await self.collection.update_one(
                {"_id": night},
                {
                    "$set": {
                        "path": str(result.path),
                        "written": utcnow(),
                        "empty": result.empty,
                        "n_exposures": result.n_exposures,
                        "plots": list(result.plots),
                    }
                },
                upsert=True,
            )
            self.written.append(night)
            self._log.info(
                "night_report_written",
                night=night,
                path=str(result.path),
                n_exposures=result.n_exposures,
                empty=result.empty,
            )
            results.append(result)
        return results

    def _seconds_to_next_due(self) -> float:
        now = self.clock()
        due = now.replace(hour=self.config.hour_utc, minute=0, second=5, microsecond=0)
        if due <= now:
            due += dt.timedelta(days=1)
        return min(self.check_interval_s, max(1.0, (due - now).total_seconds()))

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except (PyMongoError, OSError) as exc:  # database away or disk full: try again later
                self._log.warning("night_report_failed", error=str(exc))
            await asyncio.sleep(self._seconds_to_next_due())
