"""Benchmark: local annulus backgrounds of the QC photometry vs photutils, on a full frame.

Usage: ``python benchmarks/bench_photometry.py [--out results.json] [--stars 2000] [--repeats 3]
[--quick]``.

A calibrated 5496x3672 frame (sky 300 ADU, Gaussian noise, Moffat-like stars of FWHM 3 px,
0.1 % bad pixels) and the QC's annulus (7-10 FWHM: 21-30 px, 3σ MAD clipping, 5 passes) around
``--stars`` stars.  Three estimators of the clipped median (and mean) per annulus:

- ``huntsman``: :func:`huntsman.science.photometry.annulus_background` (vectorised over stars);
- ``photutils.LocalBackground``: ``MedianBackground`` with the same ``SigmaClip``;
- ``photutils.ApertureStats``: ``CircularAnnulus`` statistics (``median``, ``mean``) with it.

Prints wall times (medians of the repeats) and the agreement with ours, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from huntsman.science.photometry import annulus_background  # noqa: E402

FULL = (3672, 5496)
FWHM = 3.0
R_IN, R_OUT = 7.0 * FWHM, 10.0 * FWHM
NSIGMA = 3.0


def make_frame(shape: tuple[int, int], n_stars: int, seed: int = 1) -> tuple[np.ndarray, ...]:
    """Frame (float32), bad-pixel mask and star positions (x, y)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    image = rng.normal(300.0, 10.0, shape).astype(np.float32)
    margin = R_OUT + 2
    x = rng.uniform(margin, nx - 1 - margin, n_stars)
    y = rng.uniform(margin, ny - 1 - margin, n_stars)
    # Stars (and 4x as many faint field sources the annuli must reject): Moffat beta 3 stamps.
    alpha = FWHM / (2.0 * np.sqrt(2.0 ** (1.0 / 3.0) - 1.0))
    half = 12
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    n_all = 5 * n_stars
    xs = np.concatenate([x, rng.uniform(half, nx - 1 - half, n_all - n_stars)])
    ys = np.concatenate([y, rng.uniform(half, ny - 1 - half, n_all - n_stars)])
    flux = np.concatenate([10 ** rng.uniform(4.0, 5.5, n_stars),
                           10 ** rng.uniform(2.5, 3.5, n_all - n_stars)])
    for xi, yi, fi in zip(xs, ys, flux, strict=True):
        cx, cy = round(xi), round(yi)
        r2 = (xx + cx - xi) ** 2 + (yy + cy - yi) ** 2
        stamp = (1.0 + r2 / alpha**2) ** -3.0
        stamp *= fi / stamp.sum()
        image[cy - half : cy + half + 1, cx - half : cx + half + 1] += stamp.astype(np.float32)
    bad = rng.random(shape) < 1e-3
    return image, bad, x, y


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def agreement(ours: np.ndarray, other: np.ndarray) -> dict[str, float]:
    d = np.abs(np.asarray(other, float) - ours)
    d = d[np.isfinite(d)]
    return {"max_abs_adu": float(d.max()), "median_abs_adu": float(np.median(d)),
            "frac_within_0.01_adu": float(np.mean(d <= 0.01))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    parser.add_argument("--stars", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small frame, few stars")
    args = parser.parse_args()
    shape = (800, 1200) if args.quick else FULL
    n_stars = 100 if args.quick else args.stars

    from astropy.stats import SigmaClip
    from photutils.aperture import ApertureStats, CircularAnnulus
    from photutils.background import LocalBackground, MedianBackground

    image, bad, x, y = make_frame(shape, n_stars)
    clip = SigmaClip(sigma=NSIGMA, maxiters=5, cenfunc="median", stdfunc="mad_std")

    def ours() -> tuple[np.ndarray, np.ndarray]:
        med, mean, _ = annulus_background(image, bad, x, y, R_IN, R_OUT, NSIGMA)
        return med, mean

    def local_background() -> np.ndarray:
        lb = LocalBackground(R_IN, R_OUT, bkg_estimator=MedianBackground(sigma_clip=clip))
        return np.asarray(lb(image, x, y, mask=bad), float)

    def aperture_stats() -> tuple[np.ndarray, np.ndarray]:
        stats = ApertureStats(image, CircularAnnulus(np.column_stack([x, y]), R_IN, R_OUT),
                              mask=bad, sigma_clip=clip)
        return np.asarray(stats.median, float), np.asarray(stats.mean, float)

    ours()  # warm-up (imports, caches)
    t_ours, (med, mean) = timed(ours, args.repeats)
    t_lb, lb_med = timed(local_background, args.repeats)
    t_as, (as_med, as_mean) = timed(aperture_stats, args.repeats)
    result = {
        "shape": list(shape), "n_stars": n_stars, "annulus_px": [R_IN, R_OUT],
        "repeats": args.repeats, "cpu_count": os.cpu_count(), "load_avg": list(os.getloadavg()),
        "methods": {
            "huntsman": {"wall_s": t_ours},
            "photutils.LocalBackground": {"wall_s": t_lb, "median": agreement(med, lb_med)},
            "photutils.ApertureStats": {"wall_s": t_as, "median": agreement(med, as_med),
                                        "mean": agreement(mean, as_mean)},
        },
        "speedup_vs_local_background": t_lb / t_ours,
        "speedup_vs_aperture_stats": t_as / t_ours,
    }
    print(f"frame {shape[1]}x{shape[0]}, {n_stars} stars, annulus {R_IN:g}-{R_OUT:g} px, "
          f"{NSIGMA:g} sigma MAD clip; medians of {args.repeats} repeats")
    print(f"{'method':<30}{'wall s':>9}{'x ours':>8}{'max |d med| ADU':>17}{'within 0.01':>13}")
    for name, row in result["methods"].items():
        agree = row.get("median", {})
        within = agree.get("frac_within_0.01_adu")
        print(f"{name:<30}{row['wall_s']:>9.3f}{row['wall_s'] / t_ours:>8.1f}"
              f"{agree.get('max_abs_adu', 0.0):>17.4f}"
              f"{'' if within is None else format(within, '.3f'):>13}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
