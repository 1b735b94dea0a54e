"""Ingestion benchmark of the real service: latency, throughput, memory and event-loop lag.

Usage::

    .venv/bin/python benchmarks/bench_ingest.py [--full 200] [--small 2000] [--rate 1.0]
        [--batch 60] [--out FILE.json] [--time-limit 720] [--set SECTION__FIELD=VALUE ...]

The service runs in this process exactly as the tests run it, through the shared harness
(``benchmarks/harness.py``: in-process ``run_service`` on the embedded database in a temporary
tree, real files written into the watched raw directory the way the control software writes
them, the samplers and the latency definition).  This file is the scenario, three phases:

1. ``full_rate``: ``--full`` full-size 5496x3672 synthetic science frames, one every
   ``1/--rate`` s.  Latency per file = the document's ``timing.ingested`` minus the moment the
   writer closed the file (wall clock, UTC).
2. ``full_batch``: ``--batch`` full frames written as fast as possible (at most ``--max-on-disk``
   full frames' worth of files on disk); throughput = files / (last ``timing.ingested`` minus the
   start of writing).
3. ``small_burst``: ``--small`` 800x800 frames written as fast as possible.

Throughout: peak RSS of the main process, of each pool worker and in total (psutil, every
0.2 s), the event loop's lag (a coroutine sleeping 10 ms and recording how late it wakes) and
CPU seconds per frame of each process (main, workers, database server).  Figures are printed
as a table and written as JSON with the targets and pass/fail.  Service log lines (and
anything the workers print) go to ``<tmp>/service.log``; the number of warnings is reported.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h
from harness import fmt, say

TARGETS: list[h.Target] = [
    ("full_rate.latency_s.p95", "<=", 2.0, "s", "issue 2: p95 latency at 1 frame/s"),
    ("full_batch.throughput_fps", ">=", 1.5, "frames/s", "issue 2: full-frame throughput"),
    ("event_loop_lag_ms.all.p99", "<=", 50.0, "ms", "issue 2: event-loop lag p99"),
    ("full_rate.ingest_duration_s.p50", "<=", 1.5, "s", "issue 3: worker time per full frame"),
]


async def run_bench(args: argparse.Namespace, tmp: Path, full: bytes, small: bytes) -> dict[str, Any]:
    config = h.make_config(tmp, args.set, args.all_services)
    bench = h.Bench(args, tmp)
    running = await h.start_service(config, bench)
    app = running.app
    startup_s = time.monotonic() - running.t_start
    say(f"service started in {startup_s:.1f} s (workers {config.pool.max_workers}, "
        f"max_in_flight {config.pool.max_in_flight}, database {config.database.uri})")
    idle, lag_task = await h.start_probes(bench, ("full_rate", "full_batch", "small_burst"))
    try:
        interval = 1.0 / args.rate if args.rate > 0 else 0.0
        await bench.phase("full_rate", args.full, full, interval, args.full * interval + 120)
        await bench.phase("full_batch", args.batch, full, 0.0, 60 + args.batch * 4.0)
        await bench.phase("small_burst", args.small, small, 0.0, 60 + args.small * 0.5)
    finally:
        await h.stop_probes(bench, lag_task)
        docs = await h.fetch_documents(bench)
        counts = dict(app.ingestor.counts)
    result = h.summarise("ingest", TARGETS, bench, docs, config, idle, startup_s, counts)
    shutdown_s = await h.stop_service(running)
    result["figures"]["shutdown_s"] = shutdown_s
    if shutdown_s is None:
        result["notes"].append("the service did not stop within 60 s of its stop event "
                               "(stacks in service.log); its processes were killed")
        running.task.print_stack(file=sys.stdout)
        faulthandler.dump_traceback(all_threads=True)
        h.finish(args.out, result, print_report, hung=True)  # never returns
    return result


def print_report(result: dict[str, Any]) -> None:
    f = result["figures"]
    m = result["machine"]
    say("")
    say(f"ingestion benchmark — {m['cpu_count']} CPUs, Python {m['python']}, "
        f"load at start {m['load_avg_at_start'][0]:.2f}, at end {m['load_avg_at_end'][0]:.2f}, "
        f"pool {result['config']['pool']}")
    head = (f"{'phase':<12}{'files':>6}{'ok':>6}{'lat p50':>9}{'p95':>8}{'max':>8}"
            f"{'fps':>8}{'MiB/s':>8}{'dur p50':>9}{'p95':>7}{'cpu/file w':>11}{'main':>7}{'db':>7}"
            f"{'lag p99':>9}{'others':>8}")
    say(head)
    say("-" * len(head))
    for name in ("full_rate", "full_batch", "small_burst"):
        p = f.get(name)
        if p is None or "files" not in p:
            if p is not None:
                say(f"{name:<12} {p}")
            continue
        lat, dur, cpu = p["latency_s"], p["ingest_duration_s"], p["cpu_s_per_file"]
        say(f"{name:<12}{p['files']:>6}{p['statuses'].get('ok', 0):>6}{fmt(lat['p50']):>9}"
            f"{fmt(lat['p95']):>8}{fmt(lat['max']):>8}{fmt(p['throughput_fps'], '.2f'):>8}"
            f"{fmt(p['throughput_mib_s'], '.1f'):>8}{fmt(dur['p50']):>9}{fmt(dur['p95']):>7}"
            f"{fmt(cpu['workers']):>11}{fmt(cpu['main']):>7}{fmt(cpu['db']):>7}"
            f"{fmt(p['event_loop_lag_ms']['p99'], '.1f'):>9}"
            f"{fmt(p['other_processes_cpu_cores'], '.2f'):>8}")
    for name in ("full_rate", "full_batch", "small_burst"):
        busy = (f.get(name) or {}).get("other_processes_cpu_cores")
        if busy is not None and busy > 0.1:
            say(f"WARNING: other processes used {busy:.2f} CPU cores during {name}: "
                "its figures are disturbed; rerun on an idle machine")
    say("(latency s: timing.ingested - writer's close; dur: ingest.duration_s in the worker; "
        "cpu/file: CPU s per file of the workers, main process, database server; lag in ms;\n"
        " others: CPU cores used by other processes on the machine during the phase)")
    rss = f["peak_rss_mb"]
    say(f"peak RSS MB: main {rss['main_mb']:.0f}, max worker {rss['worker_max_mb']:.0f}, "
        f"workers {rss['workers_total_mb']:.0f}, db server {rss['db_mb']:.0f}, "
        f"total {rss['total_mb']:.0f} (without db {rss['total_without_db_mb']:.0f}); "
        f"idle main {f['idle_rss_mb']['main_mb']:.0f}")
    lag = f["event_loop_lag_ms"]["all"]
    say(f"event-loop lag ms (10 ms sleeps, n={lag['n']}): p50 {fmt(lag['p50'], '.2f')}, "
        f"p99 {fmt(lag['p99'], '.2f')}, max {fmt(lag['max'], '.1f')}")
    say(f"start-up {f['startup_s']:.1f} s, shutdown {fmt(f['shutdown_s'], '.1f')} s, "
        f"log: {f['log']['warnings']} warnings, {f['log']['errors']} errors")
    say("")
    say(f"{'target':<36}{'value':>10}{'':>4}{'target':>8}  result")
    for t in result["targets"]:
        verdict = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        say(f"{t['figure']:<36}{fmt(t['value']):>10}{t['op']:>4}{t['target']:>8g}  {verdict}"
            f"  ({t['source']})")
    for note in result["notes"]:
        say(f"note: {note}")



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", type=int, default=200, help="full frames written at --rate")
    parser.add_argument("--small", type=int, default=2000, help="800x800 frames in one burst")
    parser.add_argument("--rate", type=float, default=1.0, help="full frames per second")
    parser.add_argument("--batch", type=int, default=None,
                        help="full frames written as fast as possible (default min(60, --full))")
    parser.add_argument("--max-on-disk", type=float, default=40,
                        help="disk cap, in full frames' worth of bytes (ingested files are deleted)")
    parser.add_argument("--time-limit", type=float, default=720.0,
                        help="bound on the phases, s (the process is killed 180 s after it)")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where the temporary tree goes")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION__FIELD=VALUE",
                        help="config override, as HUNTSMAN_<SECTION>__<FIELD> (repeatable)")
    parser.add_argument("--all-services", action="store_true",
                        help="keep plate solving and calibration enabled (default: ingestion only)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary tree (service.log)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = min(60, args.full)
    return h.run_benchmark("ingest", args, lambda tmp, full, small: run_bench(args, tmp, full, small),
                           print_report, need_small=args.small > 0)


if __name__ == "__main__":
    raise SystemExit(main())
