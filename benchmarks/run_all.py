"""Run every benchmark, each in its own process, and summarise the headline figures.

Usage::

    .venv/bin/python benchmarks/run_all.py [--out benchmarks/results] [--only NAME ...] [--quick]
        [--timeout S] [--strict] [--list]

Each benchmark runs as ``python benchmarks/bench_<name>.py --out <out>/<name>.json`` with its
output shown and kept in ``<out>/<name>.log``.  A benchmark that crashes, times out or writes
no JSON is reported as failed; the others still run.  The headline figures are printed against
their targets and written to ``<out>/summary.json``.  Exit status: 1 if a benchmark failed to
run (or, with ``--strict``, if a target was missed), else 0.  ``--quick`` runs small versions
(for checking the harness, not for figures).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

Headline = dict[str, Any]


def figure(
    name: str, value: Any, unit: str = "", op: str | None = None, target: float | None = None,
    source: str = "",
) -> Headline:
    """One headline figure; ``pass`` is None when it has no target or no value."""
    ok: bool | None = None
    if op is not None and target is not None and isinstance(value, int | float):
        ok = value <= target if op == "<=" else value >= target
    return {"figure": name, "value": value, "unit": unit, "op": op, "target": target,
            "pass": ok, "source": source}


def get(data: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data


# -- headline figures of each benchmark's JSON ----------------------------------------------
def ingest_headlines(r: dict[str, Any]) -> list[Headline]:
    rows = [figure(t["figure"], t["value"], t["unit"], t["op"], t["target"], t["source"])
            for t in r.get("targets", [])]
    f = r.get("figures", {})
    rows += [
        figure("full_rate.latency_s.max", get(f, "full_rate.latency_s.max"), "s"),
        figure("small_burst.throughput_fps", get(f, "small_burst.throughput_fps"), "frames/s"),
        figure("small_burst.latency_s.p95", get(f, "small_burst.latency_s.p95"), "s"),
        figure("event_loop_lag_ms.all.max", get(f, "event_loop_lag_ms.all.max"), "ms"),
        figure("peak_rss_mb.main_mb", get(f, "peak_rss_mb.main_mb"), "MB"),
        figure("peak_rss_mb.worker_max_mb", get(f, "peak_rss_mb.worker_max_mb"), "MB"),
        figure("peak_rss_mb.total_mb", get(f, "peak_rss_mb.total_mb"), "MB"),
    ]
    return rows


def metrics_headlines(r: dict[str, Any]) -> list[Headline]:
    ours = get(r, "rows.0") or {}
    return [
        figure("compute_metrics cpu_s (full frame)", ours.get("cpu_s"), "s", "<=", 1.5,
               "issue 3: all metrics per full frame"),
        figure("compute_metrics wall_s (full frame)", ours.get("wall_s"), "s"),
        figure("fwhm_err_pct vs true", ours.get("fwhm_err_pct"), "%"),
    ]


def stacking_headlines(r: dict[str, Any]) -> list[Headline]:
    ours = get(r, "methods.huntsman") or {}
    return [
        figure("huntsman wall_s", ours.get("wall_s"), "s"),
        figure("huntsman peak_rss_mb", ours.get("peak_rss_mb"), "MB", "<=",
               r.get("memory_limit_mb"), "DESIGN 8: streamed stack under the memory limit"),
        figure("speedup_vs_ccdproc", r.get("speedup_vs_ccdproc"), "x"),
        figure("speedup_vs_astropy", r.get("speedup_vs_astropy"), "x"),
        figure("max_ulps vs astropy", get(r, "ours_vs_astropy.max_ulps"), "ulp"),
    ]


def solve_headlines(r: dict[str, Any]) -> list[Headline]:
    s = r.get("summary", {})
    return [
        figure("solve_s_p95", s.get("solve_s_p95"), "s", "<=", s.get("target_p95_s", 10.0),
               "solve time per full frame"),
        figure("solve_rate", s.get("solve_rate"), ""),
        figure("rms_arcsec_max", s.get("rms_arcsec_max"), "arcsec"),
    ]


def qc_headlines(r: dict[str, Any]) -> list[Headline]:
    return [
        figure("qc_s_per_full_frame.median", get(r, "single_frame.qc_s.median"), "s", "<=", 3.0,
               "QC time per full frame, one core"),
        figure("qc_night_latency_s", get(r, "night.latency_s"), "s", None, None,
               "last calibration frame -> all QC documents"),
    ]


def photometry_headlines(r: dict[str, Any]) -> list[Headline]:
    m = r.get("methods", {})
    return [
        figure("annulus backgrounds wall_s (huntsman)", get(m, "huntsman.wall_s"), "s"),
        figure("speedup_vs_photutils.LocalBackground", r.get("speedup_vs_local_background"), "x",
               ">=", 2.0, "issue 10: ours kept only if it wins clearly"),
        figure("speedup_vs_photutils.ApertureStats", r.get("speedup_vs_aperture_stats"), "x",
               ">=", 2.0, "issue 10: ours kept only if it wins clearly"),
    ]


def http_load_headlines(r: dict[str, Any]) -> list[Headline]:
    rows = [figure(t["figure"], t["value"], t["unit"], t["op"], t["target"], t["source"])
            for t in r.get("targets", [])]
    f = r.get("figures", {})
    c = r.get("clients", {})
    rows += [
        figure("quiet.latency_s.p95", get(f, "quiet.latency_s.p95"), "s"),
        figure("loaded.latency_s.p95", get(f, "loaded.latency_s.p95"), "s"),
        figure("status page requests/s (200 clients)", c.get("requests_per_s"), "req/s"),
        figure("status page answers 503", get(c, "statuses.503"), ""),
        figure("status page answers 200", get(c, "statuses.200"), ""),
    ]
    return rows


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    args: tuple[str, ...]
    quick_args: tuple[str, ...]
    timeout_s: float
    headlines: Callable[[dict[str, Any]], list[Headline]]


BENCHMARKS = (
    Benchmark("ingest", "bench_ingest.py", (), ("--full", "20", "--small", "200"), 1200,
              ingest_headlines),
    Benchmark("http_load", "bench_http_load.py", (), ("--frames", "6", "--blocks", "2", "--warmup", "1"),
              900, http_load_headlines),
    Benchmark("metrics", "bench_metrics.py", (), ("--repeats", "1"), 900, metrics_headlines),
    Benchmark("stacking", "bench_stacking.py", (), ("--n", "5", "--ccdproc-timeout", "120"), 3600,
              stacking_headlines),
    Benchmark("solve", "bench_solve.py", (), ("--frames", "3"), 1800, solve_headlines),
    Benchmark("photometry", "bench_photometry.py", (), ("--quick",), 900, photometry_headlines),
    Benchmark("qc", "bench_qc.py", (), ("--quick", "--frames", "1", "--night-frames", "2"), 1800,
              qc_headlines),
)


# -- running ----------------------------------------------------------------------------------
def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the benchmark (it may stop its own children and report), wait up to 30 s, then
    SIGKILL whatever is left of it and of everything it started."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        family = []
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs(family, timeout=0.5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=10)


def run_one(bench: Benchmark, out_dir: Path, quick: bool, timeout_s: float | None) -> dict[str, Any]:
    json_path = out_dir / f"{bench.name}.json"
    log_path = out_dir / f"{bench.name}.log"
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / bench.script), *bench.args,
           *(bench.quick_args if quick else ()), "--out", str(json_path)]
    limit = timeout_s or bench.timeout_s
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                     os.environ.get("PYTHONPATH")]))}
    print(f"\n=== {bench.name}: {' '.join(cmd[1:])} (timeout {limit:g} s)", flush=True)
    record: dict[str, Any] = {"command": cmd[1:], "log": str(log_path), "json": str(json_path)}
    t0 = time.monotonic()
    tail: list[str] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                tail.append(line.rstrip())
                del tail[:-20]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            returncode: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            returncode = None
        except KeyboardInterrupt:
            _kill_tree(proc)
            raise
        reader.join(10)
    record["wall_s"] = round(time.monotonic() - t0, 1)
    record["returncode"] = returncode
    if returncode is None:
        record.update(status="failed", error=f"timed out after {limit:g} s")
    elif returncode != 0:
        record.update(status="failed", error=f"exit code {returncode}: {' | '.join(tail[-3:])}")
    else:
        try:
            result = json.loads(json_path.read_text())
            record["headlines"] = bench.headlines(result)
            record["status"] = "ok"
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
            record.update(status="failed", error=f"no usable JSON at {json_path}: {exc}")
    return record


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_at_start": os.getloadavg(),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def print_summary(results: dict[str, dict[str, Any]]) -> None:
    print("\n" + "=" * 96)
    print(f"{'benchmark':<10}{'figure':<40}{'value':>10} {'unit':<9}{'target':>10}  result")
    print("-" * 96)
    for name, rec in results.items():
        if rec["status"] != "ok":
            print(f"{name:<10}{rec['status'].upper()}: {rec.get('error', '')}"[:200])
            continue
        for h in rec["headlines"]:
            target = f"{h['op']} {_fmt(h['target'])}" if h["op"] and h["target"] is not None else ""
            verdict = "" if h["pass"] is None else ("PASS" if h["pass"] else "FAIL")
            if h["op"] and h["pass"] is None:
                verdict = "n/a"
            print(f"{name:<10}{h['figure']:<40}{_fmt(h['value']):>10} {h['unit']:<9}{target:>10}  "
                  f"{verdict}")
    print("=" * 96)


def main(argv: list[str] | None = None) -> int:
    names = [b.name for b in BENCHMARKS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"run only these (repeatable or comma-separated): {', '.join(names)}")
    parser.add_argument("--quick", action="store_true", help="small runs, to check the harness")
    parser.add_argument("--timeout", type=float, default=None, help="per-benchmark timeout, s")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for b in BENCHMARKS:
            print(f"{b.name:<10} benchmarks/{b.script} (timeout {b.timeout_s:g} s)")
        return 0
    only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = sorted(set(only) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    selected = [b for b in BENCHMARKS if not only or b.name in only]
    args.out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    results: dict[str, dict[str, Any]] = {}
    for bench in selected:
        try:
            results[bench.name] = run_one(bench, args.out, args.quick, args.timeout)
        except KeyboardInterrupt:
            results[bench.name] = {"status": "failed", "error": "interrupted"}
            break
        except Exception as exc:  # a harness problem with one benchmark must not stop the others
            results[bench.name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    print_summary(results)
    targets = [h for r in results.values() for h in r.get("headlines", []) if h["op"]]
    summary = {
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine_info(),
        "benchmarks": results,
        "all_ran": all(r["status"] == "ok" for r in results.values()),
        "all_targets_pass": all(h["pass"] is True for h in targets),
        "missed_targets": [f"{name}: {h['figure']}" for name, r in results.items()
                           for h in r.get("headlines", []) if h["op"] and h["pass"] is not True],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out / 'summary.json'}")
    if not summary["all_ran"]:
        return 1
    return 1 if args.strict and not summary["all_targets_pass"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
