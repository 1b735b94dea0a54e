"""Atomic, idempotent WCS write-back into raw FITS files."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from huntsman.science.wcs_writer import (
    MARKER_KEY,
    WcsWriteRefused,
    cleanup_temp_files,
    is_wcs_keyword,
    read_wcs_marker,
    solution_hash,
    strip_wcs,
    write_wcs_into_raw,
)
from huntsman.testing.starfield import make_tan_sip_wcs
from huntsman.testing.synthetic import huntsman_header, write_raw

SCIENCE = Path(__file__).resolve().parents[1] / "data" / "huntsman-drp" / "raw" / "science_0.fits"


def solution(ra: float, shape: tuple[int, int] = (800, 800), sip: bool = True) -> dict:
    """A WCS keyword dict as solve_field returns it (plain Python values)."""
    coeffs = {"A_2_0": 1e-7, "B_1_1": -5e-8} if sip else None
    header = make_tan_sip_wcs(ra, -55.0, shape, 1.24, 12.0, coeffs).to_header(relax=True)
    return {k: v for k, v in header.items() if k not in ("COMMENT", "HISTORY", "MJDREF")}


def split(path: Path, index: int = 0) -> tuple[bytes, bytes, bytes]:
    """(bytes before the header, header block, everything after it) of HDU ``index``."""
    raw = path.read_bytes()
    with fits.open(path) as hdul:
        info = hdul.fileinfo(index)
    return raw[: info["hdrLoc"]], raw[info["hdrLoc"] : info["datLoc"]], raw[info["datLoc"] :]


def assert_same_solution(header: fits.Header, wcs_header: dict, shape: tuple[int, int]) -> None:
    ny, nx = shape
    yy, xx = np.mgrid[0 : ny : complex(0, 9), 0 : nx : complex(0, 9)]
    a = WCS(header).pixel_to_world(xx.ravel(), yy.ravel())
    b = WCS(fits.Header(wcs_header)).pixel_to_world(xx.ravel(), yy.ravel())
    assert np.max(a.separation(b).arcsec) < 1e-6


@pytest.fixture
def science(tmp_path: Path) -> Path:
    return Path(shutil.copy(SCIENCE, tmp_path / "science_0.fits"))


def test_write_back_keeps_data_bytes_and_keywords(science: Path) -> None:
    before_prefix, _, before_data = split(science)
    original = fits.getheader(science)
    assert read_wcs_marker(science) is None
    new = solution(65.3)
    assert write_wcs_into_raw(science, new, root=science.parent) is True

    prefix, _, data = split(science)
    assert prefix == before_prefix == b""
    assert data == before_data  # pixel data byte-identical (BZERO never decoded)
    header = fits.getheader(science)
    for key in original:
        if key in ("COMMENT", "HISTORY", "") or is_wcs_keyword(key):
            continue
        assert header[key] == original[key], key
    assert list(header["COMMENT"]) == list(original["COMMENT"])
    assert header["BZERO"] == 32768 and header["BITPIX"] == 16
    # the stale astrometry.net SIP terms are gone, replaced by the new ones
    assert "AP_0_0" not in header and "BP_ORDER" not in header and "PC1_1" in header
    assert header["CTYPE1"] == "RA---TAN-SIP"
    assert_same_solution(header, new, (800, 800))
    assert read_wcs_marker(science) == solution_hash(new) == header[MARKER_KEY]
    np.testing.assert_array_equal(fits.getdata(science), fits.getdata(SCIENCE))
    assert not list(science.parent.glob(".*"))


def test_second_call_is_a_no_op(science: Path) -> None:
    new = solution(65.3)
    assert write_wcs_into_raw(science, new, root=science.parent)
    stat, content = science.stat(), science.read_bytes()
    assert write_wcs_into_raw(science, dict(new), root=science.parent) is False
    assert science.read_bytes() == content
    assert science.stat().st_ino == stat.st_ino  # not even replaced
    # a different solution replaces the first; a TAN-only one leaves no SIP behind
    tan = solution(65.4, sip=False)
    assert write_wcs_into_raw(science, tan, root=science.parent) is True
    header = fits.getheader(science)
    assert not [k for k in header if k.startswith(("A_", "B_", "AP_", "BP_"))]
    assert_same_solution(header, tan, (800, 800))
    assert header.count(MARKER_KEY) == 1
    assert split(science)[2] == split(SCIENCE)[2]


def test_strip_wcs_removes_the_solution_only() -> None:
    original = fits.getheader(SCIENCE)
    stripped = strip_wcs(original)
    assert not WCS(stripped).has_celestial
    assert "CD1_1" in original and "A_ORDER" in original  # input untouched
    kept = [k for k in original if not is_wcs_keyword(k)]
    assert all(k in stripped for k in kept)
    assert stripped["RA-MNT"] == original["RA-MNT"] and stripped["BZERO"] == 32768


def test_file_mode_is_preserved(science: Path) -> None:
    science.chmod(0o640)
    write_wcs_into_raw(science, solution(65.3), root=science.parent)
    assert science.stat().st_mode & 0o777 == 0o640


def test_compressed_file_gets_wcs_in_hdu1(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 4095, (200, 300)).astype(np.uint16)
    path = tmp_path / "frame.fits.fz"
    hdr = huntsman_header(observation_type="science")
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=hdr)]).writeto(path)
    before = split(path, 1)
    new = solution(65.3, shape=(200, 300))
    assert write_wcs_into_raw(path, new, root=tmp_path) is True
    after = split(path, 1)
    assert after[0] == before[0] and after[2] == before[2]
    with fits.open(path) as hdul:
        np.testing.assert_array_equal(hdul[1].data, data)
        assert hdul[1].header["CAM-ID"] == "TESTCAM03"
        assert_same_solution(hdul[1].header, new, (200, 300))
    assert read_wcs_marker(path) == solution_hash(new)
    assert write_wcs_into_raw(path, new, root=tmp_path) is False


def test_cleanup_temp_files(tmp_path: Path) -> None:
    (tmp_path / "night").mkdir()
    stale = tmp_path / "night" / ".a.fits.wcs-tmp"
    stale.write_bytes(b"partial")
    keep = tmp_path / "night" / "a.fits"
    keep.write_bytes(b"x")
    assert cleanup_temp_files(tmp_path) == [stale]
    assert keep.exists() and not stale.exists()


CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from huntsman.science.wcs_writer import write_wcs_into_raw
    stop_at, wcs, paths = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
    real_fsync, calls = os.fsync, [0]

    def fsync(fd):  # 2 fsyncs per file: the temp file, then the directory
        real_fsync(fd)
        calls[0] += 1
        if calls[0] == stop_at:  # temp file complete, os.replace not yet done
            os.kill(os.getpid(), signal.SIGSTOP)

    os.fsync = fsync
    print("ready", flush=True)
    for p in paths:
        write_wcs_into_raw(p, wcs, root=os.path.dirname(p))
    """
)


def _frames(tmp_path: Path, shape: tuple[int, int]) -> list[Path]:
    rng = np.random.default_rng(7)
    return [
        write_raw(
            tmp_path / f"frame_{i:02d}.fits",
            rng.integers(0, 4095, shape).astype(np.uint16),
            huntsman_header(observation_type="science"),
        )
        for i in range(30)
    ]


def _check_files(
    paths: list[Path], data_blocks: dict[Path, bytes], originals: dict[Path, fits.Header],
    allowed: dict[Path, str | None], new: dict, shape: tuple[int, int],
) -> dict[Path, str | None]:
    """Every file is valid FITS with identical pixels and either the old or the new header."""
    markers: dict[Path, str | None] = {}
    for p in paths:
        with fits.open(p) as hdul:
            hdul.verify("exception")
            header = hdul[0].header
            assert hdul[0].data.shape == shape
        assert split(p)[2] == data_blocks[p]
        marker = header.get(MARKER_KEY)
        assert marker in (allowed[p], solution_hash(new))
        if marker == solution_hash(new):
            assert_same_solution(header, new, shape)
        for key in originals[p]:
            if not is_wcs_keyword(key):
                assert header[key] == originals[p][key]
        markers[p] = marker
    return markers


def _run_child(stop_at: int, new: dict, paths: list[Path]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(stop_at), json.dumps(new), *map(str, paths)],
        stdout=subprocess.PIPE, text=True,
    )


@pytest.mark.slow  # kills writer processes at random moments: not an edit-loop test
def test_sigkill_at_random_moments_never_corrupts(tmp_path: Path) -> None:
    shape = (1000, 1000)  # 2 MB files: ~10 ms per write-back, 30 files ~0.3 s
    paths = _frames(tmp_path, shape)
    data_blocks = {p: split(p)[2] for p in paths}
    originals = {p: fits.getheader(p) for p in paths}
    markers: dict[Path, str | None] = dict.fromkeys(paths)
    chooser = random.Random(11)
    for round_no in range(8):
        new = solution(60.0 + round_no, shape=shape)
        child = _run_child(0, new, paths)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        try:  # the kill deadline is the random moment, not a wait for something to happen
            child.wait(timeout=chooser.uniform(0.0, 0.25))
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        child.stdout.close()
        markers = _check_files(paths, data_blocks, originals, markers, new, shape)
        cleanup_temp_files(tmp_path)
        assert not list(tmp_path.glob(".*"))


def test_sigkill_between_temp_write_and_rename(tmp_path: Path) -> None:
    shape = (200, 200)
    paths = _frames(tmp_path, shape)
    data_blocks = {p: split(p)[2] for p in paths}
    originals = {p: fits.getheader(p) for p in paths}
    new = solution(61.0, shape=shape)
    stop_file = 17
    child = _run_child(2 * stop_file + 1, new, paths)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    _, status = os.waitpid(child.pid, os.WUNTRACED)  # until it stops itself
    assert os.WIFSTOPPED(status)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    markers = _check_files(paths, data_blocks, originals, dict.fromkeys(paths), new, shape)
    assert [markers[p] is not None for p in paths] == [i < stop_file for i in range(30)]
    temps = sorted(tmp_path.rglob(f".{paths[stop_file].name}.*.wcs-tmp"))
    assert len(temps) == 1  # complete new file, never renamed: the original stays valid
    assert cleanup_temp_files(tmp_path) == temps
    assert write_wcs_into_raw(paths[stop_file], new, root=tmp_path) is True  # the service retries later
    assert read_wcs_marker(paths[stop_file]) == solution_hash(new)


# -- nothing written where it must not be -----------------------------------------------------
def test_planted_temp_name_link_is_not_followed(science: Path, tmp_path: Path) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-victim"
    outside.write_bytes(b"precious")
    try:
        planted = science.parent / f".{science.name}.wcs-tmp"  # the old fixed temporary name
        planted.symlink_to(outside)
        new = solution(64.9)
        assert write_wcs_into_raw(science, new, root=science.parent) is True
        assert outside.read_bytes() == b"precious"
        assert read_wcs_marker(science) == solution_hash(new)  # the raw file got its WCS
        assert planted.is_symlink()
        assert cleanup_temp_files(science.parent) == [planted]  # the link goes, never its target
        assert outside.read_bytes() == b"precious"
    finally:
        outside.unlink()


def test_links_and_files_outside_the_root_are_refused(science: Path, tmp_path: Path) -> None:
    new = solution(64.9)
    original = science.read_bytes()
    link = tmp_path / "link.fits"
    link.symlink_to(science)
    with pytest.raises(WcsWriteRefused, match="symbolic link"):
        write_wcs_into_raw(link, new, root=tmp_path)
    hard = tmp_path / "hard.fits"
    os.link(science, hard)
    with pytest.raises(WcsWriteRefused, match="2 hard links"):
        write_wcs_into_raw(science, new, root=tmp_path)
    hard.unlink()
    with pytest.raises(WcsWriteRefused, match="outside the raw root"):
        write_wcs_into_raw(science, new, root=tmp_path / "raw")
    with pytest.raises(WcsWriteRefused, match="no raw root"):
        write_wcs_into_raw(science, new, root=None)
    assert science.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.fits", "science_0.fits"]


@pytest.mark.root  # to give the file another owner
def test_owner_group_and_mode_are_kept(science: Path) -> None:
    os.chown(science, 1234, 4321)
    os.chmod(science, 0o640)
    assert write_wcs_into_raw(science, solution(64.9), root=science.parent) is True
    info = science.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (1234, 4321, 0o640)


def test_cleanup_does_not_descend_into_links(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / ".b.fits.wcs-tmp"
    victim.write_bytes(b"not ours")
    root = tmp_path / "raw"
    root.mkdir()
    (root / "linked").symlink_to(elsewhere)
    assert cleanup_temp_files(root) == []
    assert victim.exists()
