"""Benchmark: per-frame metrics + PSF on a full-size synthetic science frame, vs SExtractor+PSFEx.

Usage: ``python benchmarks/bench_metrics.py [--out results.json] [--repeats N]``.
Prints a table (our CPU/wall time and FWHM, PSFEx's, and the true image FWHM) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support, and huntsman without an install

from huntsman.models import DetectorConstants  # noqa: E402
from huntsman.science.metrics import MetricParams, compute_metrics  # noqa: E402
from huntsman.science.psf import true_image_fwhm  # noqa: E402
from huntsman.testing import synthetic as syn  # noqa: E402
from tests.support.psfex_runner import psfex_available, run_psfex  # noqa: E402


def _frame(seed: int) -> tuple[np.ndarray, syn.MoffatPSF]:
    rng = np.random.default_rng(seed)
    n = 3000
    shape = syn.FULL_SHAPE
    stars = syn.StarField(
        rng.uniform(0, shape[1], n), rng.uniform(0, shape[0], n), 10 ** rng.uniform(2.5, 5.4, n)
    )
    psf = syn.MoffatPSF(fwhm_px=3.0 / 1.24, beta=3.2, axis_ratio=0.92, theta_deg=35.0)
    img = syn.render_frame(shape, exptime_s=300, sky_adu=400, stars=stars, psf=psf, seed=seed)
    return img, psf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    img, psf = _frame(args.seed)
    true = true_image_fwhm(psf.fwhm_px, psf.beta, psf.axis_ratio, psf.theta_deg)
    params = MetricParams(DetectorConstants(), exptime_s=300.0)
    compute_metrics(img[:512, :512], "science", params=params)  # warm-up: lazy imports

    cpu, wall = [], []
    result = None
    for _ in range(args.repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        result = compute_metrics(img, "science", params=params)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    assert result is not None
    ours = result.to_dict()

    rows: list[dict[str, object]] = [
        {
            "tool": "huntsman.compute_metrics",
            "cpu_s": statistics.median(cpu),
            "wall_s": statistics.median(wall),
            "fwhm_px": ours["fwhm_px"],
            "fwhm_err_pct": 100 * (ours["fwhm_px"] / true - 1) if ours["fwhm_px"] else None,
            "ellipticity": ours["ellipticity"],
            "n_stars": ours["psf_n_stars"],
        }
    ]
    if psfex_available():
        with tempfile.TemporaryDirectory() as tmp:
            path = syn.write_raw(
                Path(tmp) / "frame.fits", img, syn.huntsman_header(observation_type="science")
            )
            w0 = time.perf_counter()
            ref = run_psfex(path)
            rows.append(
                {
                    "tool": "source-extractor + psfex",
                    "cpu_s": None,
                    "wall_s": time.perf_counter() - w0,
                    "fwhm_px": ref.fwhm_px,
                    "fwhm_err_pct": 100 * (ref.fwhm_px / true - 1),
                    "ellipticity": ref.ellipticity,
                    "n_stars": ref.n_stars_accepted,
                }
            )
    else:
        print("source-extractor/psfex not on PATH: reference skipped")

    print(f"full frame {img.shape[1]}x{img.shape[0]}, true image FWHM {true:.4f} px "
          f"(intrinsic {psf.fwhm_px:.4f} px, beta {psf.beta}, e {1 - psf.axis_ratio:.2f}); "
          f"{args.repeats} repeats, medians")
    header = f"{'tool':<28}{'cpu s':>8}{'wall s':>8}{'FWHM px':>10}{'err %':>8}{'ell':>7}{'stars':>7}"
    print(header)
    print("-" * len(header))

    def fmt(v: object, spec: str) -> str:
        return format(v, spec) if isinstance(v, int | float) else "-"

    for r in rows:
        print(f"{r['tool']!s:<28}{fmt(r['cpu_s'], '8.3f')}{fmt(r['wall_s'], '8.3f')}"
              f"{fmt(r['fwhm_px'], '10.4f')}{fmt(r['fwhm_err_pct'], '+8.2f')}"
              f"{fmt(r['ellipticity'], '7.3f')}{fmt(r['n_stars'], '7d')}")
    out = {
        "shape": list(img.shape),
        "true_image_fwhm_px": true,
        "true_ellipticity": 1 - psf.axis_ratio,
        "cpu_s_all": cpu,
        "wall_s_all": wall,
        "rows": rows,
        "metrics": ours,
    }
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
