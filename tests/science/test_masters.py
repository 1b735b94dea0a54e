"""Master bias/dark/flat on synthetic frames with known truth, and on the real samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from huntsman.science.calibration import load_master
from huntsman.science.masters import (
    MASK_DEAD,
    MASK_HOT,
    MasterParams,
    build_master_bias,
    build_master_dark,
    build_master_flat,
)
from huntsman.science.provenance import Provenance, config_hash
from huntsman.testing.synthetic import CameraModel, huntsman_header, render_frame, write_raw

SHAPE = (400, 600)
CAMERA = CameraModel(bias_adu=200.0, dark_e_per_s=0.5)
READ_NOISE_ADU = CAMERA.read_noise_e / CAMERA.gain_e_per_adu
DARK_RATE_ADU = CAMERA.dark_e_per_s / CAMERA.gain_e_per_adu
PARAMS = MasterParams(memory_limit_mb=200)  # several bands even for these small frames
PROV = Provenance(software_version="0.1.0-test", config_hash=config_hash(PARAMS))
SAMPLES = Path(__file__).parents[1] / "data" / "huntsman-drp" / "raw"


class Truth:
    """The true detector of the synthetic camera."""

    def __init__(self) -> None:
        rng = np.random.default_rng(2024)
        ny, nx = SHAPE
        self.bias_pattern = np.broadcast_to(3.0 * np.sin(np.arange(nx) / 17.0), SHAPE).copy()
        n_hot = 25
        self.hot = (rng.integers(0, ny, n_hot), rng.integers(0, nx, n_hot),
                    rng.uniform(5.0, 20.0, n_hot))
        yy, xx = np.mgrid[0:ny, 0:nx]
        r2 = ((yy - ny / 2) ** 2 + (xx - nx / 2) ** 2) / (ny / 2) ** 2
        self.vignetting = 1.0 - 0.12 * r2
        self.flat = self.vignetting * (1.0 + 0.01 * rng.standard_normal(SHAPE))
        self.dead = (rng.integers(10, ny - 10, 12), rng.integers(10, nx - 10, 12))
        self.flat[self.dead] = 0.1


@pytest.fixture(scope="module")
def truth() -> Truth:
    return Truth()


@pytest.fixture(scope="module")
def masters(tmp_path_factory: pytest.TempPathFactory, truth: Truth) -> dict:
    tmp = tmp_path_factory.mktemp("masters")
    out: dict = {}
    bias_paths = [
        write_raw(tmp / f"bias_{i:02d}.fits",
                  render_frame(SHAPE, exptime_s=0.0, camera=CAMERA,
                               bias_pattern=truth.bias_pattern, seed=100 + i),
                  huntsman_header(observation_type="bias"))
        for i in range(16)
    ]
    out["bias"] = build_master_bias(bias_paths, tmp / "master_bias.fits", PARAMS, PROV)
    dark_t = [60.0, 120.0] * 6
    dark_paths = [
        write_raw(tmp / f"dark_{i:02d}.fits",
                  render_frame(SHAPE, exptime_s=t, camera=CAMERA, bias_pattern=truth.bias_pattern,
                               hot_pixels=truth.hot, seed=200 + i),
                  huntsman_header(observation_type="dark", exptime_s=t))
        for i, t in enumerate(dark_t)
    ]
    out["dark"] = build_master_dark(dark_paths, dark_t, tmp / "master_dark.fits",
                                    out["bias"].out_path, PARAMS, PROV)
    flat_t = [5.0, 6.0, 7.0] * 4
    sky = [2600.0, 2300.0, 2000.0] * 4  # flats of different levels, as in twilight
    flat_paths = [
        write_raw(tmp / f"flat_{i:02d}.fits",
                  render_frame(SHAPE, exptime_s=t, camera=CAMERA, sky_adu=s, flat=truth.flat,
                               bias_pattern=truth.bias_pattern, hot_pixels=truth.hot,
                               seed=300 + i),
                  huntsman_header(observation_type="flat", exptime_s=t))
        for i, (t, s) in enumerate(zip(flat_t, sky, strict=True))
    ]
    out["flat"] = build_master_flat(flat_paths, tmp / "master_flat.fits", out["bias"].out_path,
                                    out["dark"].out_path, flat_t, PARAMS, PROV)
    out["flat_sky"] = sky
    return out


def test_master_bias_noise_and_pattern(masters: dict, truth: Truth) -> None:
    result = masters["bias"]
    image, mask = load_master(result.out_path)
    residual = image - (CAMERA.bias_adu + truth.bias_pattern)
    expected = READ_NOISE_ADU / np.sqrt(result.n_frames)
    ratio = residual.std() / expected
    print(f"bias noise ratio {ratio:.3f}")
    assert 0.95 < ratio < 1.1
    assert abs(residual.mean()) < 0.02
    assert result.n_frames == 16 and result.shape == SHAPE
    assert abs(result.statistics.level - CAMERA.bias_adu) < 1.0
    assert not mask.any()


def test_master_file_layout_and_provenance(masters: dict) -> None:
    with fits.open(masters["dark"].out_path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "UNCERT", "NUSED", "MASK"]
        assert hdul[0].data.dtype == np.dtype(">f4") and hdul["UNCERT"].data.dtype.kind == "f"
        assert hdul["NUSED"].data.dtype == np.uint16 and hdul["MASK"].data.dtype == np.uint8
        header = hdul[0].header
        assert header["CALTYPE"] == "dark" and header["BUNIT"] == "adu/s"
        assert header["NCOMBINE"] == 12 and header["NINPUTS"] == 12
        assert header["INPUT012"].endswith("dark_11.fits")
        assert header["MBIAS"] == masters["bias"].out_path
        assert header["CFGHASH"] == PROV.config_hash and header["HNTSVER"] == "0.1.0-test"
        assert header["CAM-ID"] == "TESTCAM03"
        assert hdul["NUSED"].data.max() <= 12 and np.median(hdul["NUSED"].data) >= 11
    assert not list(Path(masters["dark"].out_path).parent.glob(".*.tmp"))


def test_master_dark_rate_and_hot_pixels(masters: dict, truth: Truth) -> None:
    result = masters["dark"]
    image, _ = load_master(result.out_path)
    with fits.open(result.out_path) as hdul:
        bits = hdul["MASK"].data
    rel_err = result.statistics.level / DARK_RATE_ADU - 1.0
    print(f"dark current relative error {rel_err:+.4f}")
    assert abs(rel_err) < 0.05
    hy, hx, rate = truth.hot
    assert np.all(bits[hy, hx] & MASK_HOT)
    np.testing.assert_allclose(image[hy, hx], rate + DARK_RATE_ADU, rtol=0.05)
    assert result.statistics.n_hot <= len(set(zip(hy, hx, strict=True))) + 5


def test_master_flat_pattern_scatter_and_dead_pixels(masters: dict, truth: Truth) -> None:
    result = masters["flat"]
    image, _ = load_master(result.out_path)
    with fits.open(result.out_path) as hdul:
        bits = hdul["MASK"].data
    assert abs(np.median(image) - 1.0) < 1e-6
    good = np.ones(SHAPE, bool)
    good[truth.dead] = False
    good[truth.hot[0], truth.hot[1]] = False
    true_flat = truth.flat / np.median(truth.flat)

    def binned(a: np.ndarray) -> np.ndarray:
        return a.reshape(20, 20, 30, 20).mean(axis=(1, 3))

    pattern_err = np.abs(binned(image) / binned(true_flat) - 1.0).max()
    print(f"flat large-scale pattern max error {pattern_err:.5f}")
    assert pattern_err < 0.002
    # Poisson expectation of the relative error of each pixel of the combined flat.
    level = np.mean(masters["flat_sky"])
    signal_e = level * truth.flat * CAMERA.gain_e_per_adu
    n = result.n_frames
    expected = np.sqrt(signal_e + CAMERA.read_noise_e**2) / signal_e / np.sqrt(n)
    pull = (image / true_flat - 1.0)[good] / expected[good]
    ratio = pull.std()
    print(f"flat per-pixel scatter / Poisson expectation {ratio:.3f}")
    assert 0.9 < ratio < 1.1
    assert np.all(bits[truth.dead] & MASK_DEAD)
    assert result.statistics.n_dead == len(set(zip(*truth.dead, strict=True)))


def test_real_samples_as_one_frame_groups(tmp_path: Path) -> None:
    params = MasterParams()
    bias = build_master_bias([SAMPLES / "bias_0.fits"], tmp_path / "bias.fits", params, PROV)
    dark_t = float(fits.getheader(SAMPLES / "dark_0.fits")["EXPTIME"])
    dark = build_master_dark([SAMPLES / "dark_0.fits"], [dark_t], tmp_path / "dark.fits",
                             bias.out_path, params, PROV)
    flat_t = float(fits.getheader(SAMPLES / "flat_0.fits")["EXPTIME"])
    flat = build_master_flat([SAMPLES / "flat_0.fits"], tmp_path / "flat.fits", bias.out_path,
                             dark.out_path, [flat_t], params, PROV)
    for result in (bias, dark, flat):
        image, _ = load_master(result.out_path)
        assert image.shape == (800, 800) and result.shape == (800, 800)
        assert np.all(np.isfinite(image))
        assert result.n_frames == 1
    assert bias.statistics.level == 32.0
    flat_image, _ = load_master(flat.out_path)
    assert abs(np.median(flat_image) - 1.0) < 1e-3
    assert 0.0 < dark.statistics.level < 1.0  # ADU/s


def test_flat_with_nonpositive_level_is_rejected(tmp_path: Path) -> None:
    header = huntsman_header(observation_type="bias")
    zero = write_raw(tmp_path / "z.fits", np.full((40, 40), 32, np.uint16), header)
    bias = build_master_bias([zero], tmp_path / "b.fits", MasterParams(), PROV)
    with pytest.raises(ValueError, match=r"z\.fits"):
        build_master_flat([zero], tmp_path / "f.fits", bias.out_path, None, [1.0],
                          MasterParams(), PROV)
    assert not (tmp_path / "f.fits").exists()
