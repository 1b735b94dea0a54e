"""Frame calibration, master loading and provenance helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from huntsman.science.calibration import calibrate, load_master
from huntsman.science.fitsio import read_raw, write_fits_atomic
from huntsman.science.provenance import Provenance, config_hash, provenance_cards, stamp_header
from huntsman.testing.synthetic import huntsman_header, write_raw


def _inputs(seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    shape = (30, 40)
    bias = 200.0 + rng.normal(0, 2, shape).astype(np.float32)
    dark = (0.1 + 0.05 * rng.random(shape)).astype(np.float32)
    flat = (0.8 + 0.4 * rng.random(shape)).astype(np.float32)
    sky = 1500.0
    raw = np.rint(bias + dark * 100.0 + sky * flat).astype(np.uint16)
    return raw, bias, dark, flat


def test_calibrate_recovers_sky_and_masks() -> None:
    raw, bias, dark, flat = _inputs()
    raw[3, 4] = 4094  # saturated
    bad = np.zeros(raw.shape, bool)
    bad[5, 6] = True
    flat[7, 8] = 0.0  # unusable flat pixel
    copies = [a.copy() for a in (raw, bias, dark, flat, bad)]
    frame = calibrate(raw, 100.0, bias, dark, flat, saturation_adu=4094, bad_mask=bad)
    for before, after in zip(copies, (raw, bias, dark, flat, bad), strict=True):
        np.testing.assert_array_equal(before, after)
    assert frame.data.dtype == np.float32 and frame.mask.dtype == bool
    good = ~frame.mask
    np.testing.assert_allclose(frame.data[good], 1500.0, atol=1.0)
    assert frame.mask[3, 4] and frame.mask[5, 6] and frame.mask[7, 8]
    assert np.isnan(frame.data[7, 8])
    assert frame.mask.sum() == 3


def test_calibrate_rejects_mismatched_shapes() -> None:
    raw, bias, dark, flat = _inputs()
    with pytest.raises(ValueError, match="flat"):
        calibrate(raw, 1.0, bias, dark, flat[:, :-1], saturation_adu=4094)
    with pytest.raises(ValueError, match="exposure"):
        calibrate(raw, -1.0, bias, dark, flat, saturation_adu=4094)


def test_load_master_and_read_raw(tmp_path: Path) -> None:
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    mask = np.zeros((3, 4), np.uint8)
    mask[1, 2] = 2
    path = write_fits_atomic(tmp_path / "sub" / "m.fits", fits.HDUList(
        [fits.PrimaryHDU(image), fits.ImageHDU(mask, name="MASK")]))
    loaded, loaded_mask = load_master(path)
    np.testing.assert_array_equal(loaded, image)
    assert loaded_mask.sum() == 1 and loaded_mask[1, 2]
    raw = np.array([[0, 1], [4094, 65535]], dtype=np.uint16)
    write_raw(tmp_path / "r.fits", raw, huntsman_header(observation_type="dark"))
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(raw, header=huntsman_header(
        observation_type="dark"))]).writeto(tmp_path / "r.fits.fz")
    for name in ("r.fits", "r.fits.fz"):
        data, header = read_raw(tmp_path / name)
        assert data.dtype == np.float32 and header["CAM-ID"] == "TESTCAM03"
        np.testing.assert_array_equal(data, raw.astype(np.float32))


def test_write_fits_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.fits"
    write_fits_atomic(target, fits.HDUList([fits.PrimaryHDU(np.zeros((2, 2), np.float32))]))
    write_fits_atomic(target, fits.HDUList([fits.PrimaryHDU(np.ones((2, 2), np.float32))]))
    assert fits.getdata(target).sum() == 4
    assert [p.name for p in tmp_path.iterdir()] == ["x.fits"]


def test_provenance_cards_fit_fits_and_hash_is_canonical(tmp_path: Path) -> None:
    inputs = [f"/data/raw/very/long/directory/name/for/camera/TESTCAM03/frame_{i:04d}.fits.fz"
              for i in range(150)]
    cards = provenance_cards("1.2.3", "abc", inputs, {"bias": "/m/bias.fits"})
    keys = [k for k, _, _ in cards]
    assert keys[:3] == ["HNTSVER", "CFGHASH", "NINPUTS"] and "INPUT150" in keys
    assert all(len(k) <= 8 for k in keys)
    header = stamp_header(fits.Header(), Provenance("1.2.3", "abc"), inputs, {"dark": "/m/d"})
    path = tmp_path / "p.fits"
    fits.PrimaryHDU(np.zeros((2, 2), np.float32), header=header).writeto(path)
    back = fits.getheader(path)
    assert back["INPUT150"] == inputs[-1] and back["NINPUTS"] == 150 and back["MDARK"] == "/m/d"
    with pytest.raises(ValueError, match="999"):
        provenance_cards("1", "x", ["a"] * 1000, None)
    assert config_hash({"b": 1, "a": (1, 2)}) == config_hash({"a": [1, 2], "b": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert len(config_hash(Provenance("1", "2"))) == 12
