"""Benchmark the streamed sigma-clipped combine against ccdproc and astropy.

Usage: python benchmarks/bench_stacking.py [--n 20] [--out FILE.json] [--ccdproc-timeout 600]

Writes ``n`` full-size (5496x3672) synthetic uint16 raw frames to a temporary directory, then
runs each method in its own subprocess so the peak RSS (``ru_maxrss`` of that child) belongs
to one method only:

- ``huntsman``: :func:`huntsman.science.stacking.sigma_clipped_combine` with a 1 GB ceiling;
- ``ccdproc``: ``ccdproc.combine(method='average', sigma_clip=True, 3/3 sigma, np.ma.median,
  np.ma.std, mem_limit=1 GB)``; if it exceeds the timeout it is re-run on fewer frames and its
  time extrapolated linearly in the number of frames (stated in the output);
- ``astropy``: all frames loaded as float32, ``sigma_clip(axis=0, sigma=3, maxiters=3,
  cenfunc='median', stdfunc='std')`` and the masked mean.

Each child saves its image as .npy; the parent compares ours with astropy (float32 ulps and
relative difference) and with ccdproc.  Requires ``pip install ccdproc`` for the ccdproc row.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FULL_SHAPE = (3672, 5496)
MEMORY_LIMIT_MB = 1024

CHILD = r"""
import json, resource, sys, time, warnings
import numpy as np
method, out_npy, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
t0 = time.perf_counter()
if method == "huntsman":
    from huntsman.science.stacking import sigma_clipped_combine
    image = sigma_clipped_combine(paths, sigma=3.0, maxiters=3,
                                  memory_limit_mb=__MEM__).data
elif method == "ccdproc":
    import ccdproc
    warnings.simplefilter("ignore")
    ccd = ccdproc.combine(paths, method="average", sigma_clip=True,
                          sigma_clip_low_thresh=3, sigma_clip_high_thresh=3,
                          sigma_clip_func=np.ma.median, sigma_clip_dev_func=np.ma.std,
                          mem_limit=__MEM__ * 2**20, unit="adu", dtype=np.float32)
    image = np.asarray(ccd.data, dtype=np.float32)
elif method == "astropy":
    from astropy.io import fits
    from astropy.stats import sigma_clip
    stack = np.empty((len(paths),) + __SHAPE__, dtype=np.float32)
    for i, p in enumerate(paths):
        with fits.open(p) as hdul:
            stack[i] = hdul[0].data
    clipped = sigma_clip(stack, sigma=3.0, maxiters=3, axis=0, cenfunc="median",
                         stdfunc="std", masked=True, copy=False)
    image = clipped.mean(axis=0).filled(np.nan).astype(np.float32)
wall = time.perf_counter() - t0
np.save(out_npy, image)
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "peak_rss_mb": rss_mb}))
""".replace("__MEM__", str(MEMORY_LIMIT_MB)).replace("__SHAPE__", repr(FULL_SHAPE))


def write_frames(directory: Path, n: int) -> list[Path]:
    """Flat-like raws: vignetted sky, hot pixels, cosmic-ray-like outliers, uint16 BZERO."""
    from huntsman.testing.synthetic import CameraModel, huntsman_header, write_raw

    rng = np.random.default_rng(42)
    ny, nx = FULL_SHAPE
    y = (np.arange(ny) - ny / 2)[:, None] / (ny / 2)
    x = (np.arange(nx) - nx / 2)[None, :] / (ny / 2)
    level = (1500.0 * (1.0 - 0.1 * (x * x + y * y))).astype(np.float32)
    camera = CameraModel()
    sigma_adu = camera.read_noise_e / camera.gain_e_per_adu
    paths = []
    for i in range(n):
        scale = 1.0 + 0.05 * i / max(n - 1, 1)
        signal = level * np.float32(scale)
        frame = rng.poisson(signal * camera.gain_e_per_adu).astype(np.float32)
        frame /= np.float32(camera.gain_e_per_adu)
        frame += rng.normal(camera.bias_adu, sigma_adu, FULL_SHAPE).astype(np.float32)
        hits = rng.integers(0, ny * nx, 20_000)
        frame.reshape(-1)[hits] += rng.uniform(50, 2000, hits.size).astype(np.float32)
        raw = np.clip(np.rint(frame), 0, camera.saturation_adu).astype(np.uint16)
        header = huntsman_header(observation_type="flat", exptime_s=10.0)
        paths.append(write_raw(directory / f"flat_{i:03d}.fits", raw, header))
    return paths


def run_child(method: str, paths: list[Path], out_npy: Path, timeout_s: float) -> dict:
    """Run one method in a fresh interpreter; wall time and peak RSS as measured inside it."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cmd = [sys.executable, "-c", CHILD, method, str(out_npy), *map(str, paths)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=True)
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["n_frames"] = len(paths)
    record["rusage_children_maxrss_mb"] = max(
        before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    return dict(record)


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Differences in float32 ulps (of the reference value) and relative."""
    ok = np.isfinite(ref) & np.isfinite(ours)
    diff = np.abs(ours[ok].astype(np.float64) - ref[ok].astype(np.float64))
    ulp = np.spacing(np.abs(ref[ok]).astype(np.float32)).astype(np.float64)
    ulps = diff / ulp
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / np.abs(ref[ok])).max()),
        "max_ulps": float(ulps.max()),
        "n_pixels_over_2_ulps": int(np.count_nonzero(ulps > 2)),
        "fraction_over_2_ulps": float(np.count_nonzero(ulps > 2) / ulps.size),
        "nan_pattern_equal": bool(np.array_equal(np.isnan(ours), np.isnan(ref))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="number of full-size frames")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--ccdproc-timeout", type=float, default=600.0)
    parser.add_argument("--skip-astropy", action="store_true")
    args = parser.parse_args(argv)

    results: dict = {"n_frames": args.n, "shape": FULL_SHAPE, "memory_limit_mb": MEMORY_LIMIT_MB}
    with tempfile.TemporaryDirectory(prefix="bench_stacking_") as tmp:
        tmpdir = Path(tmp)
        t0 = time.perf_counter()
        paths = write_frames(tmpdir, args.n)
        results["write_frames_s"] = time.perf_counter() - t0
        methods: dict = {}
        methods["huntsman"] = run_child("huntsman", paths, tmpdir / "huntsman.npy", 600)
        if not args.skip_astropy:
            methods["astropy"] = run_child("astropy", paths, tmpdir / "astropy.npy", 1200)
        try:
            methods["ccdproc"] = run_child("ccdproc", paths, tmpdir / "ccdproc.npy",
                                           args.ccdproc_timeout)
        except subprocess.TimeoutExpired:
            few = paths[: max(3, args.n // 4)]
            rec = run_child("ccdproc", few, tmpdir / "ccdproc.npy", args.ccdproc_timeout)
            rec["extrapolated_wall_s"] = rec["wall_s"] * args.n / len(few)
            rec["note"] = (f"timed out after {args.ccdproc_timeout}s on {args.n} frames; "
                           f"measured on {len(few)} frames, wall extrapolated linearly")
            methods["ccdproc"] = rec
        except subprocess.CalledProcessError as exc:
            methods["ccdproc"] = {"error": exc.stderr.strip().splitlines()[-1:]}
        results["methods"] = methods

        ours = np.load(tmpdir / "huntsman.npy")
        if "astropy" in methods:
            results["ours_vs_astropy"] = compare(ours, np.load(tmpdir / "astropy.npy"))
        cc = methods["ccdproc"]
        if "wall_s" in cc and cc["n_frames"] == args.n:
            results["ours_vs_ccdproc"] = compare(ours, np.load(tmpdir / "ccdproc.npy"))
        if "wall_s" in cc:
            cc_wall = cc.get("extrapolated_wall_s", cc["wall_s"])
            results["speedup_vs_ccdproc"] = cc_wall / methods["huntsman"]["wall_s"]
        if "astropy" in methods:
            results["speedup_vs_astropy"] = (
                methods["astropy"]["wall_s"] / methods["huntsman"]["wall_s"])

    print(f"{args.n} frames of {FULL_SHAPE[1]}x{FULL_SHAPE[0]} (uint16), "
          f"memory limit {MEMORY_LIMIT_MB} MB")
    print(f"{'method':<10} {'frames':>6} {'wall s':>9} {'peak RSS MB':>12}")
    for name, rec in results["methods"].items():
        if "wall_s" in rec:
            extra = f"  (extrapolated {rec['extrapolated_wall_s']:.1f} s)" \
                if "extrapolated_wall_s" in rec else ""
            print(f"{name:<10} {rec['n_frames']:>6} {rec['wall_s']:>9.2f} "
                  f"{rec['peak_rss_mb']:>12.0f}{extra}")
        else:
            print(f"{name:<10} error: {rec.get('error')}")
    for key in ("speedup_vs_ccdproc", "speedup_vs_astropy"):
        if key in results:
            print(f"{key}: {results[key]:.1f}x")
    for key in ("ours_vs_astropy", "ours_vs_ccdproc"):
        if key in results:
            print(f"{key}: {json.dumps(results[key])}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
