"""The ingestion worker on its own: every kind of unreadable input becomes a clear reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from huntsman.models import IngestParams
from huntsman.science.frames import n_pixels
from huntsman.workers.ingest import ingest_file
from tests.conftest import PYTHON, RAW_SAMPLES, ROOT, python_env
from tests.test_worker_faults import corrupt_fz, decompression_bomb, huge_header_frame

FOUR_FRAMES = 4 * 5496 * 3672


@pytest.mark.root  # drops the capabilities that bypass file permissions
def test_unreadable_file_is_a_clear_failure() -> None:
    """A file the service's user may not read.

    Root reads everything, so the worker runs without the capabilities that bypass file
    permissions (util-linux ``setpriv``, present on every Debian system).
    """
    base = Path(tempfile.mkdtemp(prefix="huntsman-unreadable-", dir="/tmp"))
    try:
        base.chmod(0o755)
        target = base / "locked.fits"
        shutil.copyfile(RAW_SAMPLES / "science_0.fits", target)
        target.chmod(0o000)
        code = (
            "import json, sys; from huntsman.workers.ingest import ingest_file; "
            "from huntsman.models import IngestParams; "
            "r = ingest_file(sys.argv[1], IngestParams()); "
            "print(json.dumps({'error': r.error, 'size': r.file_size}))"
        )
        drop = "-dac_override,-dac_read_search"
        run = subprocess.run(
            ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", PYTHON, "-c", code, str(target)],
            cwd="/", env=python_env(), capture_output=True, text=True, timeout=120,
        )
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert "not readable" in result["error"] and "permission denied" in result["error"]
        # The same file readable again ingests normally: the reason was the permission.
        target.chmod(0o644)
        assert ingest_file(str(target), IngestParams()).error is None
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_fifo_named_fits_is_not_read() -> None:
    base = Path(tempfile.mkdtemp(prefix="huntsman-fifo-"))
    try:
        fifo = base / "pipe.fits"
        os.mkfifo(fifo)
        result = ingest_file(str(fifo), IngestParams())
        assert result.error == "not a regular file"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_worker_result_is_small_and_plain() -> None:
    result = ingest_file(str(RAW_SAMPLES / "science_0.fits"), IngestParams())
    assert result.error is None
    encoded = json.dumps({"fields": {k: str(v) for k, v in result.fields.items()}, "m": result.metrics})
    assert len(encoded) < 20_000  # a record, not pixels
    assert ROOT.exists()


def test_corrupt_tile_is_a_reason_with_the_header(tmp_path: Path) -> None:
    result = ingest_file(str(corrupt_fz(tmp_path / "c.fits.fz")), IngestParams())
    assert result.error is not None
    assert result.error.startswith("cannot read pixel data: CfitsioException: decompression error")
    assert result.header is not None and result.header["CAM-ID"] == "TESTCAM03"
    assert result.fields["observation_type"] == "science"


def test_pixel_ceiling_refuses_from_the_header(tmp_path: Path) -> None:
    params = IngestParams(max_pixels=FOUR_FRAMES)
    for path in (huge_header_frame(tmp_path / "h.fits"), decompression_bomb(tmp_path / "b.fits.fz")):
        start = time.perf_counter()
        result = ingest_file(str(path), params)
        assert result.error is not None and result.error.startswith(
            "frame too large: 32768×32768 = 1073.7 Mpx is above the limit of 80.7 Mpx"
        ), result.error
        assert time.perf_counter() - start < 2  # nothing of the 4 GiB was read
        assert result.header is not None and result.header["NAXIS2"] == 32768
    # A cube counts every plane; a full frame passes.
    cube = tmp_path / "cube.fits"
    fits.PrimaryHDU(np.zeros((3, 4, 5), np.uint8)).writeto(cube)
    assert n_pixels(fits.getheader(cube)) == 60
    assert "frame too large" in (ingest_file(str(cube), IngestParams(max_pixels=59)).error or "")
    assert ingest_file(str(RAW_SAMPLES / "science_0.fits"), params).error is None
